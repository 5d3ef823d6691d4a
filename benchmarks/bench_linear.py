"""Linear-layer rules (``aten.linear``, ``aten.addmm``) against the torch.func fallback.

    python benchmarks/bench_linear.py                      # GPU if available (large shapes), else small CPU shapes
    python benchmarks/bench_linear.py --size small --k 4 --json out.json

Columns and options: see ``benchmarks/rule_bench.py`` and ``benchmarks/README.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).parent))
import rule_bench  # noqa: E402

aten = torch.ops.aten
T, F = True, False


def linear(m, i, o, bias=True):
    def build(dev, dt):
        x = torch.randn(m, i, device=dev, dtype=dt)
        w = torch.randn(o, i, device=dev, dtype=dt) / i**0.5
        b = torch.randn(o, device=dev, dtype=dt) if bias else None
        return x, w, b

    return build


def addmm(m, i, o):
    def build(dev, dt):
        b = torch.randn(o, device=dev, dtype=dt)
        x = torch.randn(m, i, device=dev, dtype=dt)
        wt = torch.randn(i, o, device=dev, dtype=dt) / i**0.5
        return b, x, wt, 1, 1

    return build


CASES = {
    "small": [
        ("linear 128×256→256", aten.linear.default, linear(128, 256, 256), (T, T, T)),
        ("linear 128×256→256, weight only", aten.linear.default, linear(128, 256, 256), (F, T, T)),
        ("addmm 128×256→256", aten.addmm.default, addmm(128, 256, 256), (T, T, T, F, F)),
    ],
    "large": [
        ("linear 8192×4096→4096", aten.linear.default, linear(8192, 4096, 4096), (T, T, T)),
        (
            "linear 8192×4096→4096, weight only",
            aten.linear.default,
            linear(8192, 4096, 4096),
            (F, T, T),
        ),
        (
            "linear 8192×4096→4096, input only",
            aten.linear.default,
            linear(8192, 4096, 4096),
            (T, F, F),
        ),
        ("linear 8192×4096→11008", aten.linear.default, linear(8192, 4096, 11008, F), (T, T, F)),
        ("linear 1024×1024→1024", aten.linear.default, linear(1024, 1024, 1024), (T, T, T)),
        ("addmm 8192×4096→4096", aten.addmm.default, addmm(8192, 4096, 4096), (T, T, T, F, F)),
    ],
}


def flops(args, active, k, mode):
    """Floating-point operations of one ``hvp``/``ggn`` of the torch rule on ``args``, counted by
    ``FlopCounterMode`` (the GEMMs; the FLOP model the TFLOP/s column divides by)."""
    op = aten.linear.default if len(args) == 3 else aten.addmm.default
    call = rule_bench.make_call(op, args, active, k)
    g, gdot = rule_bench.make_cotangents(rule_bench.invoke(op, args), k)
    rule = rule_bench.registered_rule(op)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        rule.bwd_jvp(rule.fwd_jvp(call)[2], g if mode == "hvp" else None, gdot)
    return counter.get_total_flops()


def main(argv=None):
    return rule_bench.main("linear", CASES, __doc__, argv, flops=flops)


if __name__ == "__main__":
    main()
