"""``hessfast analyze`` on the command line: its options, everything up to the operator (each
bad input a :class:`UsageError`), the analysis, the report; ``torchrun`` support."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..algorithms.lanczos import CRITERIA
from .analysis import analyze, version
from .entry import (
    CLASSIFICATION,
    DTYPES,
    LOSSES,
    CastBatches,
    UsageError,
    call_entry_point,
    check_model_data,
    load_checkpoint,
    load_entry_point,
    resolve_device,
    resolve_loss,
)
from .report import check_out_folder, format_summary, write_report


def _distributed_hooks() -> tuple[Callable[[Any], Any], bool, bool]:
    """``torchrun`` support: ``(shard, is_main, distributed)``.

    Initialises the default process group from torchrun's environment variables
    (:func:`hessfast.distributed.init_from_env`; nothing happens in a plain run). In a distributed
    job each rank keeps its shard of the data (:func:`hessfast.distributed.shard`), the operators
    sum the ranks' products (one all-reduce per product), every rank computes the same report, and
    only the main process writes and prints it. Outside one: the identity, ``True``, ``False``.
    """
    from .. import distributed as hd

    hd.init_from_env()
    if hd.is_initialized():
        return hd.shard, hd.is_main_process(), True
    return (lambda data: data), True, False


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "analyze",
        help="Hessian / GGN analysis of your model on your data, with report.json and spectrum.png",
        description="Top eigenvalues, lambda_min, condition number, trace, spectral density and "
        "per-layer curvature of a model's loss over a dataset, and with --landscape the loss along "
        "the top eigenvectors. Exit code 0 on success, 2 for bad "
        "input (entry point, checkpoint, device, shapes), 1 when the analysis fails.",
    )
    p.add_argument("--model", required=True, help="module:function (or file.py:function) -> model")
    p.add_argument(
        "--data",
        required=True,
        help="module:function (or file.py:function) -> iterable of (inputs, targets) batches",
    )
    p.add_argument(
        "--loss",
        default="cross_entropy",
        help=f"{', '.join(LOSSES)} or module:function (default: cross_entropy)",
    )
    p.add_argument("--checkpoint", default=None, help="a state dict to load into the model")
    p.add_argument(
        "--params", default=None, help="glob pattern(s), comma-separated, of the parameters"
    )
    p.add_argument("--curvature", choices=["hessian", "ggn"], default="hessian")
    p.add_argument("--top-k", type=int, default=20, help="top eigenvalues (default: 20)")
    p.add_argument("--density", action="store_true", help="the spectral density (SLQ)")
    p.add_argument("--trace", action="store_true", help="the trace (Hutch++)")
    p.add_argument("--layerwise", action="store_true", help="per-module lambda_max and trace")
    p.add_argument("--no-lambda-min", action="store_true", help="skip lambda_min")
    p.add_argument(
        "--landscape",
        choices=["1d", "2d"],
        default=None,
        help="the loss over the data along the top eigenvector (1d) or the top two (2d), beside "
        "the quadratic model of their eigenvalues: landscape_1d.png / landscape_2d.png",
    )
    p.add_argument(
        "--landscape-span",
        default="auto",
        metavar="S",
        help="half-width of the slice in parameter space, or auto: where 1/2 lambda_max t^2 "
        "reaches the loss (default: auto)",
    )
    p.add_argument(
        "--landscape-steps",
        type=int,
        default=None,
        metavar="N",
        help="points per axis of the slice (default: 21 for 1d, 15 for 2d)",
    )
    p.add_argument(
        "--decompose",
        action="store_true",
        help="the Gauss-Newton decomposition H = G + R: top eigenvalues, lambda_min, traces and "
        "densities of H, G and R, the overlap of H's and G's top eigenspaces (decomposition.png)",
    )
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--max-batch-size", type=int, default=None, help="micro-batch size")
    p.add_argument(
        "--train-mode",
        action="store_true",
        help="keep the model in training mode (BatchNorm batch statistics; default: eval mode)",
    )
    p.add_argument("--tol", type=float, default=1e-5, help="Lanczos tolerance (default: 1e-5)")
    p.add_argument(
        "--criterion",
        choices=CRITERIA,
        default="residual",
        help="what --tol bounds in the top-eigenvalue and lambda_min runs: the residual norm "
        "(default; accurate eigenvectors too) or a bound on the eigenvalue error (fewer products "
        "when only the eigenvalues matter)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="hessfast-analysis", help="output folder")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bars (none when not a terminal)"
    )
    return p


def _prepare(args) -> tuple[Any, dict]:
    """Everything up to the operator, every bad input turned into a ``UsageError``."""
    from ..operators import GGNOperator, HessianOperator

    dev = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    if args.max_batch_size is not None and args.max_batch_size < 1:
        raise UsageError(f"--max-batch-size must be at least 1, got {args.max_batch_size}")
    landscape = _landscape_options(args)
    build = load_entry_point(args.model, "--model")
    get_data = load_entry_point(args.data, "--data")
    loss_fn = resolve_loss(args.loss)
    model = call_entry_point(build, args.model, "--model")
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"--model {args.model!r}: returned {type(model).__name__}, not a torch.nn.Module"
        )
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    model = model.to(dev, dtype)
    if not args.train_mode:
        model.eval()
    raw = call_entry_point(get_data, args.data, "--data")
    if not (_is_pair(raw) or isinstance(raw, Iterable)):
        raise UsageError(
            f"--data {args.data!r}: returned {type(raw).__name__}, not an iterable of "
            "(inputs, targets) batches"
        )
    shard, is_main, distributed = _distributed_hooks()
    if distributed and landscape:
        raise UsageError(
            "--landscape is evaluated in one process on the whole data: run it without torchrun"
        )
    raw = shard(raw)
    if _is_pair(raw):
        raw = [raw]
    data = CastBatches(raw, dev, dtype)
    # a rank may hold no batch in a distributed job (the operator allows it)
    out_shape, n_batches = check_model_data(
        model, loss_fn, data, args.loss, allow_empty=distributed
    )
    params = [s.strip() for s in args.params.split(",") if s.strip()] if args.params else None
    cls = GGNOperator if args.curvature == "ggn" else HessianOperator
    try:
        op = cls(
            model,
            loss_fn,
            data,
            params=params,
            max_batch_size=args.max_batch_size,
            progress=_progress(args) and (n_batches or 2) > 1,
        )
    except ValueError as e:
        raise UsageError(str(e)) from e
    classes = (
        out_shape[-1]
        if out_shape is not None and args.loss in CLASSIFICATION and len(out_shape) >= 2
        else None
    )
    meta = {
        "command": "analyze",
        "argv": list(getattr(args, "argv", []) or []),
        "model": {
            "entry_point": args.model,
            "class": type(model).__name__,
            "checkpoint": args.checkpoint,
            "parameters": sum(p.numel() for p in model.parameters()),
            "analysed_parameters": op.shape[0],
            "params": params,
            "mode": "train" if args.train_mode else "eval",
            "output_shape": list(out_shape) if out_shape is not None else None,
        },
        "data": {"entry_point": args.data, "batches": n_batches},
        "loss": args.loss,
        "curvature": args.curvature,
        "world_size": torch.distributed.get_world_size() if distributed else 1,
        "_classes": classes,
        "_is_main": is_main,
        "_landscape": landscape,
    }
    return op, meta


def _landscape_options(args) -> dict:
    """``analyze``'s landscape arguments from ``--landscape``, ``--landscape-span`` and
    ``--landscape-steps`` (empty without ``--landscape``); ``UsageError`` for a bad value."""
    extra = [f for f, v in (("--landscape-steps", args.landscape_steps),) if v is not None]
    if args.landscape_span != "auto":
        extra.append("--landscape-span")
    if args.landscape is None:
        if extra:
            raise UsageError(f"{' and '.join(extra)} without --landscape 1d|2d: add it")
        return {}
    ndim = int(args.landscape[0])
    span: float | str = args.landscape_span
    if span != "auto":
        try:
            span = float(span)
        except ValueError:
            span = math.nan
        if not (math.isfinite(span) and span > 0):
            raise UsageError(
                f"--landscape-span {args.landscape_span}: a positive number (a distance in "
                "parameter space along the unit eigenvectors) or auto"
            )
    if ndim > args.top_k:
        raise UsageError("--landscape 2d needs the top two eigenvectors: --top-k 2 or more")
    steps = args.landscape_steps
    if steps is not None and steps < 2:
        raise UsageError(f"--landscape-steps must be at least 2, got {steps}")
    return {"landscape": ndim, "landscape_span": span, "landscape_steps": steps}


def _progress(args) -> bool:
    """Progress bars unless ``--no-progress`` or stderr is not a terminal (a log file)."""
    return not args.no_progress and sys.stderr.isatty()


def _is_pair(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], torch.Tensor)


def main(args) -> int:
    """``hessfast analyze`` with parsed ``args``; returns the exit code."""
    t0 = time.perf_counter()
    try:
        check_out_folder(args.out)
        op, meta = _prepare(args)
    except UsageError as e:
        print(f"hessfast analyze: error: {e}", file=sys.stderr)
        return 2
    classes = meta.pop("_classes")
    is_main = meta.pop("_is_main")
    landscape = meta.pop("_landscape")
    try:
        report = analyze(
            op,
            top_k=args.top_k,
            lambda_min=not args.no_lambda_min,
            trace=args.trace,
            density=args.density,
            layerwise=args.layerwise,
            classes=classes,
            tol=args.tol,
            criterion=args.criterion,
            seed=args.seed,
            progress=_progress(args),
            extra=meta,
            **landscape,
            decompose=args.decompose,
        )
    except UsageError as e:
        print(f"hessfast analyze: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        print(f"hessfast analyze: the analysis failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if not is_main:
        return 0
    try:
        js, png = write_report(report, args.out)
    except OSError as e:
        print(f"hessfast analyze: cannot write the report to {args.out}: {e}", file=sys.stderr)
        return 1
    m = meta["model"]
    print(f"hessfast {version()} analyze: {m['entry_point']} on {args.data} ({args.loss})")
    print(
        f"  model: {m['class']}, {m['parameters']:,} parameters ({m['analysed_parameters']:,} "
        f"analysed), {m['mode']} mode; {op.device}, {args.dtype}"
    )
    print(format_summary(report))
    files = [str(js), str(png)] + [
        report["files"][k] for k in ("landscape", "decomposition") if k in report["files"]
    ]
    written = ", ".join(files[:-1]) + " and " + files[-1]
    print(f"  wrote {written} ({time.perf_counter() - t0:.1f} s in all)")
    return 0
