"""Convolution rules (``aten.conv1d``, ``aten.conv2d``) against the torch.func fallback.

    python benchmarks/bench_conv.py                      # GPU if available (large shapes), else small CPU shapes
    python benchmarks/bench_conv.py --size small --k 4 --json out.json

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

C1 = aten.conv1d.default
C2 = aten.conv2d.default
ALL3 = (T, T, T, F, F, F, F)
XW = (T, T, F, F, F, F, F)


def conv(x_shape, w_shape, bias=True, stride=1, padding=0, groups=1):
    nd = len(x_shape) - 2

    def build(dev, dt):
        x = torch.randn(x_shape, device=dev, dtype=dt)
        fan_in = w_shape[1] * int(torch.tensor(w_shape[2:]).prod())
        w = torch.randn(w_shape, device=dev, dtype=dt) / fan_in**0.5
        b = torch.randn(w_shape[0], device=dev, dtype=dt) if bias else None
        return x, w, b, [stride] * nd, [padding] * nd, [1] * nd, groups

    return build


CASES = {
    "small": [
        ("conv2d 3×3, 8×16×16×16 → 16", C2, conv((8, 16, 16, 16), (16, 16, 3, 3), padding=1), ALL3),
        (
            "conv2d 3×3 stride 2, 8×16×16×16 → 32",
            C2,
            conv((8, 16, 16, 16), (32, 16, 3, 3), False, stride=2, padding=1),
            XW,
        ),
        ("conv1d k3, 8×16×64 → 32", C1, conv((8, 16, 64), (32, 16, 3), padding=1), ALL3),
    ],
    "large": [
        (
            "conv2d 3×3, 256×64×32×32 → 64",
            C2,
            conv((256, 64, 32, 32), (64, 64, 3, 3), False, padding=1),
            XW,
        ),
        (
            "conv2d 3×3 stride 2, 256×128×16×16 → 256",
            C2,
            conv((256, 128, 16, 16), (256, 128, 3, 3), False, stride=2, padding=1),
            XW,
        ),
        (
            "conv2d 1×1 stride 2, 256×64×32×32 → 128",
            C2,
            conv((256, 64, 32, 32), (128, 64, 1, 1), False, stride=2),
            XW,
        ),
        (
            "conv2d 3×3 + bias, 64×3×224×224 → 64",
            C2,
            conv((64, 3, 224, 224), (64, 3, 3, 3), padding=1),
            ALL3,
        ),
    ],
}


def main(argv=None):
    return rule_bench.main("conv", CASES, __doc__, argv)


if __name__ == "__main__":
    main()
