"""Matmul rules (``aten.mm``, ``aten.bmm``, ``aten.matmul``) against the torch.func fallback.

    python benchmarks/bench_matmul.py                      # GPU if available (large shapes), else small CPU shapes
    python benchmarks/bench_matmul.py --size small --k 4 --json out.json

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


def pair(a_shape, b_shape):
    def build(dev, dt):
        a = torch.randn(a_shape, device=dev, dtype=dt)
        b = torch.randn(b_shape, device=dev, dtype=dt) / a_shape[-1] ** 0.5
        return a, b

    return build


CASES = {
    "small": [
        ("mm 128×128 @ 128×128", aten.mm.default, pair((128, 128), (128, 128)), (T, T)),
        ("bmm 8×64×32 @ 8×32×64", aten.bmm.default, pair((8, 64, 32), (8, 32, 64)), (T, T)),
        (
            "matmul 4×64×128 @ 128×128",
            aten.matmul.default,
            pair((4, 64, 128), (128, 128)),
            (T, T),
        ),
        (
            "matmul 2×4×64×32 @ 2×4×32×64",
            aten.matmul.default,
            pair((2, 4, 64, 32), (2, 4, 32, 64)),
            (T, T),
        ),
    ],
    "large": [
        ("mm 8192×4096 @ 4096×4096", aten.mm.default, pair((8192, 4096), (4096, 4096)), (T, T)),
        (
            "bmm 48×1024×64 @ 48×64×1024 (QKᵀ)",
            aten.bmm.default,
            pair((48, 1024, 64), (48, 64, 1024)),
            (T, T),
        ),
        (
            "matmul 8×1024×4096 @ 4096×4096",
            aten.matmul.default,
            pair((8, 1024, 4096), (4096, 4096)),
            (T, T),
        ),
        (
            "matmul 4×12×1024×64 @ 4×12×64×1024",
            aten.matmul.default,
            pair((4, 12, 1024, 64), (4, 12, 64, 1024)),
            (T, T),
        ),
    ],
}


def main(argv=None):
    return rule_bench.main("matmul", CASES, __doc__, argv)


if __name__ == "__main__":
    main()
