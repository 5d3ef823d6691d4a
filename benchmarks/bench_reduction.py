"""Reduction rules (``aten.sum``, ``aten.mean``) against the torch.func fallback.

    python benchmarks/bench_reduction.py                      # GPU if available (large shapes), else small CPU shapes
    python benchmarks/bench_reduction.py --size small --k 4 --json out.json

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

A4 = (T, F, F, F)


def red(shape, *extra):
    def build(dev, dt):
        return (torch.randn(shape, device=dev, dtype=dt), *extra)

    return build


CASES = {
    "small": [
        ("sum 512×512, last dim", aten.sum.dim_IntList, red((512, 512), [-1], False, None), A4),
        ("mean 8×64×256, dim 1", aten.mean.dim, red((8, 64, 256), [1], False, None), A4),
        ("sum 512×512, all", aten.sum.default, red((512, 512), None), (T, F)),
    ],
    "large": [
        (
            "sum 8192×4096, last dim",
            aten.sum.dim_IntList,
            red((8192, 4096), [-1], False, None),
            A4,
        ),
        ("mean 8×1024×4096, dim 1", aten.mean.dim, red((8, 1024, 4096), [1], False, None), A4),
        ("sum 8192×4096, all", aten.sum.default, red((8192, 4096), None), (T, F)),
    ],
}


def main(argv=None):
    return rule_bench.main("reduction", CASES, __doc__, argv)


if __name__ == "__main__":
    main()
