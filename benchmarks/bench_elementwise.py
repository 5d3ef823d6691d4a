"""Elementwise binary rules (mul, div, add, with broadcasting) against the torch.func fallback.

    python benchmarks/bench_elementwise.py                      # GPU if available (large shapes), else small CPU shapes
    python benchmarks/bench_elementwise.py --size small --k 4 --json out.json

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

MUL = aten.mul.Tensor
DIV = aten.div.Tensor
ADD = aten.add.Tensor


def binary(a_shape, b_shape, positive_b=False, alpha=None):
    def build(dev, dt):
        a = torch.randn(a_shape, device=dev, dtype=dt)
        b = torch.randn(b_shape, device=dev, dtype=dt)
        if positive_b:
            b = b.abs() + 0.5
        return (a, b) if alpha is None else (a, b, alpha)

    return build


def cases(b, t, d):
    x, row = (b, t, d), (d,)
    n = "×".join(map(str, x))
    return [
        (f"mul {n} * {n}", MUL, binary(x, x), (T, T)),
        (f"mul {n} * [{d}] (broadcast)", MUL, binary(x, row), (T, T)),
        (f"div {n} / {n}", DIV, binary(x, x, positive_b=True), (T, T)),
        (f"div {n} / [{d}] (broadcast)", DIV, binary(x, row, positive_b=True), (T, T)),
        (f"add {n} + [{d}] (broadcast)", ADD, binary(x, row, alpha=1), (T, T, F)),
    ]


CASES = {"small": cases(8, 64, 256), "large": cases(8, 1024, 4096)}


def main(argv=None):
    return rule_bench.main("elementwise", CASES, __doc__, argv)


if __name__ == "__main__":
    main()
