"""Softmax rules (``aten.softmax``, ``aten.log_softmax``) against the torch.func fallback.

    python benchmarks/bench_softmax.py                      # GPU if available (large shapes), else small CPU shapes
    python benchmarks/bench_softmax.py --size small --k 4 --json out.json

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

SM = aten.softmax.int
LSM = aten.log_softmax.int


def sm(shape, dim=-1):
    def build(dev, dt):
        return torch.randn(shape, device=dev, dtype=dt), dim, None

    return build


A = (T, F, F)
CASES = {
    "small": [
        ("softmax 256×512, last dim", SM, sm((256, 512)), A),
        ("log_softmax 256×512, last dim", LSM, sm((256, 512)), A),
    ],
    "large": [
        ("softmax 48×1024×1024 (attention probs)", SM, sm((48, 1024, 1024)), A),
        ("softmax 8192×4096", SM, sm((8192, 4096)), A),
        ("log_softmax 4096×32000 (vocab)", LSM, sm((4096, 32000)), A),
        ("log_softmax 8192×4096", LSM, sm((8192, 4096)), A),
    ],
}


def main(argv=None):
    return rule_bench.main("softmax", CASES, __doc__, argv)


if __name__ == "__main__":
    main()
