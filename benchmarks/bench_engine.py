"""Whole-model benchmark: a thin wrapper over ``hessfast bench`` (``hessfast/bench.py``).

    python benchmarks/bench_engine.py                      # GPU if available (full shapes), else small CPU shapes
    python benchmarks/bench_engine.py --size small --models mlp,resnet18 --json out.json

Kept for the commands of older results files: ``--models`` is ``hessfast bench --model``, and
without ``--size`` the CPU default is ``small`` (``hessfast bench`` defaults to ``tiny`` on CPU).
Every other option is passed to ``hessfast bench`` as it is; see ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import sys

import torch

from hessfast.bench import measure, provenance  # noqa: F401  (the old names of this module)
from hessfast.cli import main as cli_main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--models", "--model", dest="models", default=None)
    ap.add_argument("--size", default=None)
    ap.add_argument("--device", default=None)
    known, rest = ap.parse_known_args(argv)
    device = known.device or ("cuda" if torch.cuda.is_available() else "cpu")
    size = known.size or ("full" if device.startswith("cuda") else "small")
    args = ["bench", "--device", device, "--size", size, *rest]
    if known.models:
        args += ["--model", known.models]
    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
