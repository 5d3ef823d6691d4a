"""Batch-norm rule (``aten.batch_norm``, eval and train) against the torch.func fallback.

    python benchmarks/bench_batch_norm.py                      # GPU if available (large shapes), else small CPU shapes
    python benchmarks/bench_batch_norm.py --size small --k 4 --json out.json

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

BN = aten.batch_norm.default
ACTIVE = (T, T, T, F, F, F, F, F, F)


def bn(shape, training):
    def build(dev, dt):
        c = shape[1]
        x = torch.randn(shape, device=dev, dtype=dt)
        w = 1 + 0.1 * torch.randn(c, device=dev, dtype=dt)
        b = 0.1 * torch.randn(c, device=dev, dtype=dt)
        if training:  # batch statistics, running statistics untouched (as the engine)
            rm = rv = None
        else:
            rm = 0.1 * torch.randn(c, device=dev, dtype=dt)
            rv = torch.rand(c, device=dev, dtype=dt) + 0.5
        return x, w, b, rm, rv, training, 0.1, 1e-5, False

    return build


CASES = {
    "small": [
        ("eval 16×16×16×16", BN, bn((16, 16, 16, 16), False), ACTIVE),
        ("train 16×16×16×16", BN, bn((16, 16, 16, 16), True), ACTIVE),
    ],
    "large": [
        ("eval 256×64×32×32", BN, bn((256, 64, 32, 32), False), ACTIVE),
        ("train 256×64×32×32", BN, bn((256, 64, 32, 32), True), ACTIVE),
        ("eval 256×256×8×8", BN, bn((256, 256, 8, 8), False), ACTIVE),
        ("train 256×256×8×8", BN, bn((256, 256, 8, 8), True), ACTIVE),
    ],
}


def main(argv=None):
    return rule_bench.main("batch_norm", CASES, __doc__, argv)


if __name__ == "__main__":
    main()
