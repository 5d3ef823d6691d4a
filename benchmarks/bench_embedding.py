"""Embedding rule (``aten.embedding``) against the torch.func fallback.

    python benchmarks/bench_embedding.py                      # GPU if available (large shapes), else small CPU shapes
    python benchmarks/bench_embedding.py --size small --k 4 --json out.json

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

EMB = aten.embedding.default
ACTIVE = (T, F, F, F, F)


def emb(vocab, dim, idx_shape):
    def build(dev, dt):
        w = torch.randn(vocab, dim, device=dev, dtype=dt)
        idx = torch.randint(0, vocab, idx_shape, device=dev)
        return w, idx, -1, False, False

    return build


CASES = {
    "small": [
        ("vocab 1000 × 64, indices 8×64", EMB, emb(1000, 64, (8, 64)), ACTIVE),
    ],
    "large": [
        ("GPT-2: vocab 50304 × 768, indices 8×1024", EMB, emb(50304, 768, (8, 1024)), ACTIVE),
        ("Llama: vocab 32000 × 4096, indices 4×2048", EMB, emb(32000, 4096, (4, 2048)), ACTIVE),
    ],
}


def main(argv=None):
    return rule_bench.main("embedding", CASES, __doc__, argv)


if __name__ == "__main__":
    main()
