"""Shape rules (``aten.view``, ``aten.permute``, ``aten.cat``) against the torch.func fallback.

    python benchmarks/bench_shape.py                      # GPU if available (large shapes), else small CPU shapes
    python benchmarks/bench_shape.py --size small --k 4 --json out.json

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


def one(shape, *extra):
    def build(dev, dt):
        return (torch.randn(shape, device=dev, dtype=dt), *extra)

    return build


def cat(shapes, dim):
    def build(dev, dt):
        return [torch.randn(s, device=dev, dtype=dt) for s in shapes], dim

    return build


CASES = {
    "small": [
        ("view 8×64×256 → 512×256", aten.view.default, one((8, 64, 256), [512, 256]), (T, F)),
        (
            "permute 8×64×8×32 → (0, 2, 1, 3)",
            aten.permute.default,
            one((8, 64, 8, 32), [0, 2, 1, 3]),
            (T, F),
        ),
        ("cat 3 × 512×256, last dim", aten.cat.default, cat([(512, 256)] * 3, -1), ([T, T, T], F)),
    ],
    "large": [
        (
            "view 8×1024×4096 → 8192×4096",
            aten.view.default,
            one((8, 1024, 4096), [8192, 4096]),
            (T, F),
        ),
        (
            "permute 8×1024×32×128 → (0, 2, 1, 3)",
            aten.permute.default,
            one((8, 1024, 32, 128), [0, 2, 1, 3]),
            (T, F),
        ),
        (
            "cat 3 × 8192×4096, last dim",
            aten.cat.default,
            cat([(8192, 4096)] * 3, -1),
            ([T, T, T], F),
        ),
    ],
}


def main(argv=None):
    return rule_bench.main("shape", CASES, __doc__, argv)


if __name__ == "__main__":
    main()
