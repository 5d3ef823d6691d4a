"""The ``hessfast`` command line."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The parser of every ``hessfast`` command."""
    parser = argparse.ArgumentParser(prog="hessfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train a small MLP on built-in data and analyse its Hessian (report.json, "
        "spectrum.png, landscape_1d.png, decomposition.png)",
        description="Train a GELU MLP briefly on a synthetic 10-class Gaussian mixture, then "
        "analyse the Hessian of its training loss: top eigenvalues and outliers, lambda_min, "
        "condition number, trace, spectral density, per-layer curvature, the loss along the top "
        "eigenvector, the Gauss-Newton decomposition H = G + R, and the first HVP "
        "checked and timed against torch.func. Writes report.json, spectrum.png and "
        "landscape_1d.png and decomposition.png.",
    )
    demo.add_argument(
        "--out", default="hessfast-demo", help="output folder (default: hessfast-demo)"
    )
    demo.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    demo.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    demo.add_argument("--quick", action="store_true", help="a smaller model, in a few seconds")
    demo.add_argument("--seed", type=int, default=0, help="seed of data, model and analysis")
    demo.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: 1 on the CPU)"
    )
    backends = sub.add_parser(
        "backends",
        help="list the rule backends (cuda, triton, torch), whether they can run here and why not",
        description="List hessfast's rule backends in dispatch order, whether each can run in "
        "this process (and why not), and the ops each implements.",
    )
    backends.add_argument("--ops", action="store_true", help="also list every implemented op")
    from . import analyze, bench, profile
    from .selftest import add_parser as add_selftest

    analyze.add_parser(sub)
    bench.add_parser(sub)
    profile.add_parser(sub)
    add_selftest(sub)
    return parser


def subcommand(name: str) -> argparse.ArgumentParser:
    """The parser of ``hessfast <name>``."""
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


def main(argv: list[str] | None = None) -> int:
    """Run ``hessfast <command>``; returns the exit code: 0 on success, 1 when a check or the
    analysis fails, 2 for bad input (one line on stderr, checked before any long work), 130
    after Ctrl-C (one line, no traceback, no partial report)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(parser, args)
    except KeyboardInterrupt:
        print(f"hessfast {args.command}: interrupted", file=sys.stderr)
        return 130


def _usage(command: str, message: str) -> int:
    print(f"hessfast {command}: error: {message}", file=sys.stderr)
    return 2


def _check_models(spec: str | None) -> None:
    """``UsageError`` unless every name of ``--model`` is a built-in model or an importable
    ``module:function`` (imported here, once, as the command would import it)."""
    from .analyze import UsageError
    from .bench_models import BUILTIN, load_function

    for name in (spec or "").split(","):
        name = name.strip()
        if not name or name in BUILTIN:
            continue
        if ":" not in name:
            raise UsageError(
                f"--model {name}: not a built-in model ({', '.join(BUILTIN)}); a model of your "
                "own is module:function or path/to/file.py:function"
            )
        try:
            load_function(name)
        except ImportError as e:
            raise UsageError(f"--model {name}: cannot import it ({e})") from None
        except Exception as e:  # the user's module may raise anything on import
            raise UsageError(f"--model {name}: {type(e).__name__}: {e}") from None


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from . import analyze, bench, profile

    if args.command == "demo":
        from .demo import run

        try:
            analyze.resolve_device(args.device)
        except analyze.UsageError as e:
            parser.error(str(e))
        try:
            analyze.check_out_folder(args.out)
        except analyze.UsageError as e:
            return _usage("demo", str(e))
        if args.threads is not None and args.threads < 1:
            parser.error(f"--threads must be at least 1, got {args.threads}")
        return run(args.out, args.device, args.quick, args.seed, args.dtype, threads=args.threads)
    if args.command == "backends":
        return _backends(args.ops)
    if args.command == "selftest":
        from .selftest import main as selftest_main

        try:
            return selftest_main(args)
        except SystemExit as e:  # raise SystemExit("message"): a usage error, exit 2
            if isinstance(e.code, str):
                return _usage("selftest", e.code)
            raise
    if args.command == "analyze":
        return analyze.main(args)
    if args.command in ("bench", "profile"):
        try:
            _check_models(args.model)
        except analyze.UsageError as e:
            return _usage(args.command, str(e))
        try:
            return (bench if args.command == "bench" else profile).main(args)
        except SystemExit as e:  # raise SystemExit("message"): a usage error, exit 2
            if isinstance(e.code, str):
                return _usage(args.command, e.code)
            raise
    return 2


def _backends(list_ops: bool) -> int:
    from .dispatch import backends, requested

    print(f"requested: {requested()} (HESSFAST_BACKEND / use_backend / backend=)")
    for info in backends().values():
        print(info)
        if list_ops:
            for op in info.ops:
                print(f"    {op}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
