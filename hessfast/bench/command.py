"""``hessfast bench`` on the command line: the options (shared with ``hessfast profile``), their
checks, and :func:`main`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from ..dispatch import backends as _backends
from .environment import provenance
from .run import bench_workload
from .tables import default_json_path, json_safe, render
from .timing import free_memory, threads
from .workloads import BUILTIN, DTYPES, SIZES, build_workload


def add_common_arguments(p, *, several_models: bool, k: int, repeats: int) -> None:
    """The workload options shared by ``hessfast bench`` and ``hessfast profile``."""
    what = "built-in model(s), comma-separated" if several_models else "built-in model"
    p.add_argument(
        "--model",
        default=None,
        help=f"{what}: {', '.join(BUILTIN)} (default: "
        + ("all" if several_models else "mlp")
        + "); or module:function returning (model, loss_fn, inputs, targets)",
    )
    p.add_argument(
        "--size",
        choices=SIZES,
        default=None,
        help="size preset of the built-in models (default: full on CUDA, tiny on CPU)",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls and convolutions")
    p.add_argument("--k", type=int, default=None, help=f"vectors at once (default: {k})")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (gpt2)")
    p.add_argument("--batch-size", type=int, default=None, help="batch size (every model)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--repeats", type=int, default=None, help=f"timed calls (default: {repeats})")
    p.add_argument("--json", default=None, help="write the results with provenance here")
    p.add_argument(
        "--backends",
        default=None,
        help="comma-separated hessfast backends to time: auto, cuda, triton, torch (default: "
        "torch on the CPU; on a GPU torch, auto and every available accelerated backend)",
    )


def parse_backends(text: str | None, dev: torch.device) -> list[str] | None:
    """``--backends`` as a list (``None``: :func:`available_backends`); unknown names and
    backends that cannot run on ``dev`` are usage errors."""
    if text is None:
        return None
    names = [b.strip().lower() for b in text.split(",") if b.strip()]
    info = _backends()
    can = {"torch", "auto"} | {b for b in ("triton", "cuda") if info[b].available}
    for b in names:
        if b not in ("auto", "cuda", "triton", "torch"):
            raise SystemExit(f"--backends: unknown backend {b!r} (auto, cuda, triton, torch)")
        if b not in can:
            raise SystemExit(f"--backends: {b} cannot run here: {info[b].reason}")
    return names


#: ``--modes`` names and the ``compile=`` value each stands for.
MODE_NAMES = {
    "traced": None,
    "interpret": "interpret",
    "inductor": "inductor",
    "cudagraphs": "cudagraphs",
}


def parse_modes(text: str | None, compile: bool, dev: torch.device) -> list[str] | None:
    """``--modes`` as a list (``None``: the default of :func:`build_methods`, which adds the
    compiled modes with ``--compile``; given explicitly, the list is what runs); unknown names and
    ``cudagraphs`` off CUDA are usage errors."""
    if text is None:
        return None
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    for m in names:
        if m not in MODE_NAMES:
            raise SystemExit(f"--modes: unknown mode {m!r} ({', '.join(MODE_NAMES)})")
        if m == "cudagraphs" and dev.type != "cuda":
            raise SystemExit("--modes: cudagraphs needs a CUDA device")
    return names


def resolve_device(name: str | None) -> torch.device:
    dev = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch sees no CUDA device")
    return dev


def main(args) -> int:
    """``hessfast bench`` with parsed ``args``; returns the exit code (1 if a hessfast method
    fails its correctness check)."""
    dev = resolve_device(args.device)
    size = args.size or ("full" if dev.type == "cuda" else "tiny")
    models = (args.model or ",".join(BUILTIN)).split(",")
    backends = parse_backends(args.backends, dev)
    dtype = DTYPES[args.dtype]
    k = args.k or 8
    repeats = args.repeats or 5
    results = []
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.verbose else None
    with threads(args.threads):
        prov = provenance(dev, args.dtype)
        prov.update(
            tf32=bool(args.tf32),  # matmuls and cuDNN convolutions, while the methods run
            tf32_requested=bool(args.tf32),
            size=size,
            k=k,
            repeats=repeats,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            compile=bool(args.compile),
            modes=parse_modes(args.modes, args.compile, dev),
            peers=not args.no_peers,
            argv=list(getattr(args, "argv", []) or []),
        )
        for name in models:
            if log:
                log(f"{name} ({size})")
            torch.manual_seed(0)
            w = build_workload(
                name,
                size,
                dev,
                dtype,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
                n_batches=3,
            )
            results.append(
                bench_workload(
                    w,
                    dev,
                    k=k,
                    repeats=repeats,
                    compile=args.compile,
                    tol=args.tol,
                    use_tf32=args.tf32,
                    backends=backends,
                    peers=not args.no_peers,
                    log=log,
                    modes=parse_modes(args.modes, args.compile, dev),
                )
            )
            del w
            free_memory(dev)
    text = render(results, prov)
    print(text)
    path = Path(args.json) if args.json else default_json_path(models, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(json_safe({"provenance": prov, "results": results}), indent=1, allow_nan=False)
        + "\n"
    )
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(text + "\n")
    print(f"\nresults: {path}")
    bad = [
        f"{res['model']}: {r['method']} ({r.get('error', r['status'])})"
        for res in results
        for r in res["rows"]
        if r["hessfast"] and r["status"] != "pass"
    ]
    if bad:
        print("hessfast failed its correctness check:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="time hessfast against torch.func, double backward and peers, checked first",
        description="Time hessfast's gradient, HVP, GGN-VP and K-vector HVPs against "
        "torch.func, double backward, torch.compile and installed peers, each checked against a "
        "float64 (GPU: float32) torch.func reference before it is timed. Writes a JSON file with "
        "provenance; exits 1 if a hessfast method fails its check.",
    )
    add_common_arguments(p, several_models=True, k=8, repeats=5)
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time hessfast with compile='inductor' (and 'cudagraphs' on CUDA) and "
        "torch.compile of the torch.func HVP and GGN-VP; compile time shows in the first calls",
    )
    p.add_argument(
        "--modes",
        default=None,
        help="comma-separated hessfast execution modes to time: traced (the default: the "
        "product's traced graph), interpret (the node-by-node interpreter), inductor, cudagraphs",
    )
    p.add_argument(
        "--no-peers", action="store_true", help="skip PyHessian and curvlinops even if installed"
    )
    p.add_argument("--tol", type=float, default=None, help="relative-error tolerance override")
    p.add_argument("--markdown", default=None, help="also write the printed tables here")
    p.add_argument("--verbose", action="store_true", help="log each method as it finishes")
