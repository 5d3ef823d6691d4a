"""Normalisation rules (``aten.layer_norm``, ``aten.rms_norm``) against the torch.func fallback.

    python benchmarks/bench_layer_norm.py                      # GPU if available (large shapes), else small CPU shapes
    python benchmarks/bench_layer_norm.py --size small --k 4 --json out.json

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

LN = aten.layer_norm.default
RMS = aten.rms_norm.default


def ln(rows, hidden):
    def build(dev, dt):
        x = torch.randn(rows, hidden, device=dev, dtype=dt)
        w = 1 + 0.1 * torch.randn(hidden, device=dev, dtype=dt)
        b = 0.1 * torch.randn(hidden, device=dev, dtype=dt)
        return x, [hidden], w, b, 1e-5, True

    return build


def rms(rows, hidden):
    def build(dev, dt):
        x = torch.randn(rows, hidden, device=dev, dtype=dt)
        w = 1 + 0.1 * torch.randn(hidden, device=dev, dtype=dt)
        return x, [hidden], w, 1e-6

    return build


CASES = {
    "small": [
        ("layer_norm 512×256", LN, ln(512, 256), (T, F, T, T, F, F)),
        ("rms_norm 512×256", RMS, rms(512, 256), (T, F, T, F)),
    ],
    "large": [
        ("layer_norm 8192×4096", LN, ln(8192, 4096), (T, F, T, T, F, F)),
        ("layer_norm 8192×768", LN, ln(8192, 768), (T, F, T, T, F, F)),
        ("rms_norm 8192×4096", RMS, rms(8192, 4096), (T, F, T, F)),
        ("rms_norm 8192×5120 (row not a power of two)", RMS, rms(8192, 5120), (T, F, T, F)),
    ],
}


def main(argv=None):
    return rule_bench.main("layer_norm", CASES, __doc__, argv)


if __name__ == "__main__":
    main()
