"""Group-norm rule (``aten.group_norm``) against the torch.func fallback it replaced.

    python benchmarks/bench_group_norm.py                      # GPU if available (large shapes), else small CPU shapes
    python benchmarks/bench_group_norm.py --size small --k 4 --json out.json

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

GN = aten.group_norm.default


def gn(shape, groups):
    def build(dev, dt):
        c = shape[1]
        x = torch.randn(shape, device=dev, dtype=dt)
        w = 1 + 0.1 * torch.randn(c, device=dev, dtype=dt)
        b = 0.1 * torch.randn(c, device=dev, dtype=dt)
        return x, groups, w, b, 1e-5, False

    return build


ALL = (T, F, T, T, F, F)
CASES = {
    "small": [
        ("group_norm G=8, 16×64×32×32", GN, gn((16, 64, 32, 32), 8), ALL),
        ("group_norm G=4, 32×32×256 (Conv1d)", GN, gn((32, 32, 256), 4), ALL),
    ],
    "large": [
        ("group_norm G=32, 64×256×64×64 (diffusion U-Net)", GN, gn((64, 256, 64, 64), 32), ALL),
        ("group_norm G=32, 32×512×32×32", GN, gn((32, 512, 32, 32), 32), ALL),
    ],
}


def main(argv=None):
    return rule_bench.main("group_norm", CASES, __doc__, argv)


if __name__ == "__main__":
    main()
