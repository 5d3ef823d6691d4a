"""The ``hessfast`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hessfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="one HVP of a built-in model, checked against autograd, with timings"
    )
    demo.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    demo.add_argument("--k", type=int, default=1, help="number of vectors at once (default: 1)")
    demo.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    demo.add_argument("--batch-size", type=int, default=512)
    from . import bench, profile

    bench.add_parser(sub)
    profile.add_parser(sub)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command == "demo":
        from .demo import run

        if args.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                parser.error(f"--device {args.device}: torch sees no CUDA device")
        return run(args.device, args.k, args.dtype, args.batch_size)
    if args.command == "bench":
        return bench.main(args)
    if args.command == "profile":
        return profile.main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
