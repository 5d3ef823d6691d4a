"""Pooling rules (``aten.max_pool2d``, ``avg_pool2d``, ``adaptive_avg_pool2d``) against the
torch.func fallback they replaced.

    python benchmarks/bench_pool.py                      # GPU if available (large shapes), else small CPU shapes
    python benchmarks/bench_pool.py --size small --k 4 --json out.json

Columns and options: see ``benchmarks/rule_bench.py`` and ``benchmarks/README.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import rule_bench  # noqa: E402

aten = torch.ops.aten
T, F = True, False

MAX = aten.max_pool2d.default
AVG = aten.avg_pool2d.default
ADAPT = aten.adaptive_avg_pool2d.default


def max_pool(shape, k=3, s=2, p=1):
    def build(dev, dt):
        return torch.randn(shape, device=dev, dtype=dt), [k, k], [s, s], [p, p], [1, 1], False

    return build


def avg_pool(shape, k=2):
    def build(dev, dt):
        return torch.randn(shape, device=dev, dtype=dt), [k, k], [k, k], [0, 0], False, True, None

    return build


def adaptive(shape, out=1):
    def build(dev, dt):
        return torch.randn(shape, device=dev, dtype=dt), [out, out]

    return build


CASES = {
    "small": [
        (
            "max_pool2d 3×3/2, 16×64×32×32 (ResNet stem)",
            MAX,
            max_pool((16, 64, 32, 32)),
            (T, F, F, F, F, F),
        ),
        ("avg_pool2d 2×2, 16×64×32×32", AVG, avg_pool((16, 64, 32, 32)), (T, F, F, F, F, F, F)),
        ("adaptive_avg_pool2d →1, 16×256×8×8", ADAPT, adaptive((16, 256, 8, 8)), (T, F)),
    ],
    "large": [
        (
            "max_pool2d 3×3/2, 256×64×112×112 (ResNet stem)",
            MAX,
            max_pool((256, 64, 112, 112)),
            (T, F, F, F, F, F),
        ),
        ("avg_pool2d 2×2, 256×256×56×56", AVG, avg_pool((256, 256, 56, 56)), (T, F, F, F, F, F, F)),
        ("adaptive_avg_pool2d →1, 256×2048×7×7", ADAPT, adaptive((256, 2048, 7, 7)), (T, F)),
    ],
}


def main(argv=None):
    return rule_bench.main("pool", CASES, __doc__, argv)


if __name__ == "__main__":
    main()
