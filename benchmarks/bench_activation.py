"""Elementwise activation rules (relu, gelu erf/tanh, silu, tanh, sigmoid, hardswish) against the
torch.func fallback.

    python benchmarks/bench_activation.py                      # GPU if available (large shapes), else small CPU shapes
    python benchmarks/bench_activation.py --size small --k 4 --json out.json

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


def act(shape, *extra):
    def build(dev, dt):
        return (2 * torch.randn(shape, device=dev, dtype=dt), *extra)

    return build


def cases(shape):
    n = "×".join(map(str, shape))
    one, two = (T,), (T, F)
    return [
        (f"relu {n}", aten.relu.default, act(shape), one),
        (f"gelu erf {n}", aten.gelu.default, act(shape, "none"), two),
        (f"gelu tanh {n}", aten.gelu.default, act(shape, "tanh"), two),
        (f"silu {n}", aten.silu.default, act(shape), one),
        (f"tanh {n}", aten.tanh.default, act(shape), one),
        (f"sigmoid {n}", aten.sigmoid.default, act(shape), one),
        (f"hardswish {n}", aten.hardswish.default, act(shape), one),
    ]


# large: batch·tokens 8192 × hidden 4096
CASES = {"small": cases((256, 512)), "large": cases((8192, 4096))}


def main(argv=None):
    return rule_bench.main("activation", CASES, __doc__, argv)


if __name__ == "__main__":
    main()
