"""Attention rule (``aten.scaled_dot_product_attention``: causal, GQA) against the torch.func fallback.

    python benchmarks/bench_attention.py                      # GPU if available (large shapes), else small CPU shapes
    python benchmarks/bench_attention.py --size small --k 4 --json out.json

Columns and options: see ``benchmarks/rule_bench.py`` and ``benchmarks/README.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
import rule_bench  # noqa: E402

aten = torch.ops.aten
T, F = True, False

SDPA = aten.scaled_dot_product_attention.default
QKV = (T, T, T, F, F, F, F, F)


def attn(b, h, hkv, t, d, causal=True):
    def build(dev, dt):
        q = torch.randn(b, h, t, d, device=dev, dtype=dt)
        k = torch.randn(b, hkv, t, d, device=dev, dtype=dt)
        v = torch.randn(b, hkv, t, d, device=dev, dtype=dt)
        return q, k, v, None, 0.0, causal, None, h != hkv

    return build


def math_backend():
    """The math SDPA backend (softmax(QKᵀ)V written out), which autograd and torch.func can
    differentiate twice; with the default (fused) kernels the fallback has no forward-mode or
    double-backward derivative to use and fails."""
    return sdpa_kernel([SDPBackend.MATH])


def both(label, build):
    """Each shape twice: the default backend, and everything under the math backend."""
    return [
        (label, SDPA, build, QKV),
        (label + ", math backend", SDPA, build, QKV, math_backend),
    ]


CASES = {
    "small": [
        *both("causal B1 H4 T64 D32", attn(1, 4, 4, 64, 32)),
        *both("GQA causal B1 H8/2 T64 D32", attn(1, 8, 2, 64, 32)),
    ],
    "large": [
        *both("GPT-2 causal B4 H12 T1024 D64", attn(4, 12, 12, 1024, 64)),
        *both("Llama GQA causal B1 H32/8 T2048 D128", attn(1, 32, 8, 2048, 128)),
    ],
}


def main(argv=None):
    return rule_bench.main("attention", CASES, __doc__, argv)


if __name__ == "__main__":
    main()
