"""``hessfast bench``: hessfast against what users do today, on one model, in one process.

For a workload (:mod:`hessfast.bench_models`: a built-in ``mlp`` / ``resnet18`` / ``gpt2`` at a
size preset, or a user's ``module:function``) it runs, on one device:

- ``gradient (autograd)``: the reference every time is divided by (``× gradient``);
- hessfast, for each backend that can run on the device (:func:`available_backends`: ``torch``
  everywhere; on a GPU also ``auto`` — the per-call dispatch — and ``triton`` / ``cuda`` where
  :func:`hessfast.backends` says they are available): ``grad``, exact ``hvp``, ``ggn_vp`` and
  ``hvp`` with K vectors at once, each run inside :func:`hessfast.use_backend`;
- ``torch.func jvp(grad)`` (forward-over-reverse), ``double backward``, ``torch.func`` GGN-VP
  (``jvp`` + ``vjp``) and ``torch.func vmap`` over K vectors; on a model that calls
  ``F.scaled_dot_product_attention`` these fail with the fused kernels (no forward-mode derivative,
  no double backward), so they are repeated under the math backend (``, math attention``);
- hessfast's execution modes (``modes``, :data:`hessfast.traced.MODES`): ``traced`` (the default,
  the product's traced graph replayed), ``interpret`` (the node-by-node interpreter),
  ``inductor`` (the traced graph through ``torch.compile``) and ``cudagraphs`` (CUDA only);
- with ``compile=True``: hessfast with ``compile="inductor"`` (and ``"cudagraphs"`` on CUDA) and
  ``torch.compile`` of the ``torch.func`` HVP and GGN-VP (a compile failure is a result); compile
  time is in the first calls, reported separately (``first calls``), never in the median;
- when importable: PyHessian's HVP and curvlinops' Hessian and GGN operators (else reported as
  not installed; they are not dependencies of hessfast).

Protocol: per method, one call on batch 0 is checked against the reference (max over the vectors of ``‖result − reference‖ /
‖reference‖``, the parameters flattened into one vector) before any timing; then one warm-up call
(which also measures peak memory: CUDA max allocated above what was allocated before the call);
the two are timed together as the ``first calls`` (tracing, on a signature's second product, and
compiling happen there).
Then ``repeats`` rounds, **interleaved**: every method once per round, in table order, cycling
through the other batches (inputs rotated: every call sees different data of the same shape), so
that a slow phase of the machine hits every method alike. Times are medians over the rounds, taken
with CUDA events on GPU and ``time.perf_counter`` on CPU. The reference is ``torch.func``'s HVP / GGN-VP /
gradient of a float64 copy of the model on CPU (float32 on GPU, TF32 off), always under the math
SDPA backend. A method that raises is reported with its error, not dropped; a method whose error
exceeds the tolerance is reported as wrong (and still timed).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import losses
from .bench_models import BUILTIN, SIZES, Workload
from .bench_models import build as build_workload
from .dispatch import backends as _backends
from .dispatch import use_backend

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def available_backends(device: torch.device | None = None) -> list[str]:
    """The hessfast backends worth timing on ``device``: ``torch`` always; on a CUDA device also
    ``auto`` and every accelerated backend :func:`hessfast.backends` reports available."""
    out = ["torch"]
    if device is not None and torch.device(device).type == "cuda":
        out.append("auto")
        info = _backends()
        out += [b for b in ("triton", "cuda") if info[b].available]
    return out


def backend_context(name: str) -> Callable[[], Any]:
    """Factory of the context under which hessfast runs on backend ``name``."""
    return lambda: use_backend(name)


def default_tolerance(dtype: torch.dtype, tf32: bool = False) -> float:
    """Relative-error tolerance of the correctness check for results computed in ``dtype``."""
    if dtype == torch.bfloat16:
        return 5e-2
    if dtype == torch.float64:
        return 1e-10
    return 1e-2 if tf32 else 1e-4


# ------------------------------------------------------------------------------ provenance


def git_commit(start: Path | None = None) -> str | None:
    """The commit checked out in the repository holding ``start`` (default: this package), read
    from ``.git`` without running git; ``None`` outside a repository."""
    for base in (start or Path(__file__).resolve().parent, Path.cwd()):
        for d in (base, *base.parents):
            git = d / ".git"
            if git.is_file():  # a worktree: "gitdir: <path>"
                m = re.match(r"gitdir:\s*(.+)", git.read_text().strip())
                git = (d / m.group(1)).resolve() if m else git
            if not git.is_dir():
                continue
            try:
                head = (git / "HEAD").read_text().strip()
                if not head.startswith("ref:"):
                    return head[:12]
                ref = head[4:].strip()
                common = git
                if (git / "commondir").exists():
                    common = (git / (git / "commondir").read_text().strip()).resolve()
                for root in (git, common):
                    if (root / ref).exists():
                        return (root / ref).read_text().strip()[:12]
                    packed = root / "packed-refs"
                    if packed.exists():
                        for line in packed.read_text().splitlines():
                            if line.endswith(" " + ref):
                                return line.split()[0][:12]
            except OSError:
                return None
            return None
    return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(dev: torch.device, dtype: str = "float32") -> dict:
    """Where and with what a number was measured."""
    import hessfast

    dev = torch.device(dev)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = dev.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(dev) if cuda else _cpu_name(),
        "device_type": dev.type,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": triton_version,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "dtype": dtype,
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "date": datetime.date.today().isoformat(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "hessfast": hessfast.__version__,
        "backends": available_backends(dev),
    }


# --------------------------------------------------------------------------------- timing


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def timed_call(fn: Callable[[], Any], dev: torch.device) -> tuple[float, Any]:
    """``(seconds, result)`` of one call: CUDA events on GPU, ``perf_counter`` on CPU."""
    if dev.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        _sync(dev)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, out
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def peak_call(fn: Callable[[], Any], dev: torch.device) -> tuple[int | None, Any]:
    """``(peak bytes above the allocation before the call, result)``; ``None`` off CUDA."""
    if dev.type != "cuda":
        return None, fn()
    _sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    out = fn()
    _sync(dev)
    return torch.cuda.max_memory_allocated(dev) - base, out


def measure(fn: Callable[[], Any], dev, repeats: int):
    """``(median seconds, peak bytes or None, result)`` of ``fn()`` after one warm-up call (the
    warm-up also measures the peak memory). Kept for ``benchmarks/rule_bench.py``."""
    dev = torch.device(dev)
    peak, out = peak_call(fn, dev)
    times = [timed_call(fn, dev)[0] for _ in range(repeats)]
    return statistics.median(times), peak, out


# --------------------------------------------------------------------------------- methods


@dataclass
class Method:
    """One way of computing one quantity. ``fn(i)`` runs it on batch ``i`` and returns
    ``{parameter name: tensor}``, with a leading K axis for ``kind == "hvpK"``."""

    label: str
    family: str  # autograd | hessfast | torch.func | torch.compile | peer
    kind: str  # grad | hvp | ggn | hvpK
    vectors: int
    fn: Callable[[int], dict] | None
    backend: str | None = None
    unavailable: str | None = None  # why it was not run (e.g. a peer that is not installed)
    hessfast: bool = False


def autograd_loss(loss_fn: Callable, out_shape: tuple, targets: Any) -> Callable:
    """``loss_fn`` as hessfast reads it: cross-entropy / NLL on ``[B, T, C]`` logits with
    ``[B, T]`` targets is the mean over all tokens, ``loss_fn(z.flatten(0, -2), y.flatten())``
    (torch itself would read dim 1 as the classes); anything else is ``loss_fn(z, targets)``."""
    if needs_flatten(loss_fn, out_shape, targets):

        def flat(z, t):
            return loss_fn(z.flatten(0, -2), t.flatten())

        return flat
    return loss_fn


def needs_flatten(loss_fn: Callable, out_shape: tuple, targets: Any) -> bool:
    fn, _ = losses._identify(loss_fn)
    if fn not in (F.cross_entropy, F.nll_loss) or not isinstance(targets, torch.Tensor):
        return False
    if targets.is_floating_point() or len(out_shape) < 3:
        return False
    t = tuple(targets.shape)
    return t == tuple(out_shape[:-1]) and t != (out_shape[0], *out_shape[2:])


class _SDPASpy(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "scaled_dot_product_attention":
            self.seen = True
        return func(*args, **(kwargs or {}))


def probe(model: nn.Module, inputs: tuple) -> tuple[tuple, bool]:
    """``(output shape, whether the forward calls F.scaled_dot_product_attention)``."""
    spy = _SDPASpy()
    with torch.no_grad(), spy:
        out = model(*inputs)
    if not isinstance(out, torch.Tensor):
        raise ValueError("the model must return one tensor (the loss input)")
    return tuple(out.shape), spy.seen


def _math():
    return sdpa_kernel([SDPBackend.MATH])


def _in(ctx: Callable[[], Any], fn: Callable[[int], Any]) -> Callable[[int], Any]:
    def run(i):
        with ctx():
            return fn(i)

    return run


def _quiet(fn: Callable[[int], Any]) -> Callable[[int], Any]:
    """Run a peer without its warnings (PyHessian's ``backward(create_graph=True)`` warns)."""

    def run(i):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(i)

    return run


def _loss_module(loss_fn: Callable) -> nn.Module:
    if isinstance(loss_fn, nn.Module):
        return loss_fn
    fn, kw = losses._identify(loss_fn)
    red = kw.get("reduction", "mean")
    if fn is F.cross_entropy:
        return nn.CrossEntropyLoss(
            weight=kw.get("weight"),
            ignore_index=kw.get("ignore_index", -100),
            reduction=red,
            label_smoothing=kw.get("label_smoothing", 0.0),
        )
    if fn is F.nll_loss:
        return nn.NLLLoss(weight=kw.get("weight"), ignore_index=kw.get("ignore_index", -100))
    if fn is F.mse_loss:
        return nn.MSELoss(reduction=red)
    if fn is F.binary_cross_entropy_with_logits:
        return nn.BCEWithLogitsLoss(
            weight=kw.get("weight"), reduction=red, pos_weight=kw.get("pos_weight")
        )

    class _Loss(nn.Module):
        def forward(self, z, t):
            return loss_fn(z, t)

    return _Loss()


class _Flatten(nn.Module):
    """Classes-last sequence logits as rows, for peers that read torch's layout."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).flatten(0, -2)


def _importable(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def build_methods(
    w: Workload,
    V: dict[str, torch.Tensor],
    names: list[str],
    lf: Callable,
    uses_sdpa: bool,
    flatten: bool,
    k: int,
    compile: bool = False,
    backends: list[str] | None = None,
    dev: torch.device | None = None,
    peers: bool = True,
    modes: list[str] | None = None,
) -> list[Method]:
    """Every method of the benchmark, in table order. ``modes``: hessfast's execution modes to
    time (``traced``, ``interpret``, ``inductor``, ``cudagraphs``; default ``traced``, plus
    ``inductor`` — and ``cudagraphs`` on CUDA — with ``compile``)."""
    import hessfast

    model, loss_fn, batches = w.model, w.loss_fn, w.batches
    named = dict(model.named_parameters())
    plist = [named[n] for n in names]
    params = {n: p.detach() for n, p in zip(names, plist)}
    v1 = {n: V[n][0] for n in names}
    v1_list = [v1[n] for n in names]
    dev = dev or plist[0].device

    def as_dict(ts):
        return {n: t for n, t in zip(names, ts)}

    def L(p, i):
        x, y = batches[i]
        return lf(functional_call(model, p, x), y)

    def autograd_grad(i):
        x, y = batches[i]
        return as_dict(torch.autograd.grad(lf(model(*x), y), plist))

    def func_hvp(i):
        return jvp(grad(lambda p: L(p, i)), (params,), (v1,))[1]

    def double_backward(i):
        x, y = batches[i]
        g = torch.autograd.grad(lf(model(*x), y), plist, create_graph=True)
        return as_dict(torch.autograd.grad(g, plist, v1_list))

    def func_ggn(i):
        x, y = batches[i]

        def z_of(p):
            return functional_call(model, p, x)

        out, pull = vjp(z_of, params)
        _, jv = jvp(z_of, (params,), (v1,))
        _, hjv = jvp(grad(lambda o: lf(o, y)), (out,), (jv,))
        return pull(hjv)[0]

    def func_vmap_k(i):
        return vmap(lambda t: jvp(grad(lambda p: L(p, i)), (params,), (t,))[1])(V)

    methods = [Method("gradient (autograd)", "autograd", "grad", 1, autograd_grad)]
    if modes is None:
        modes = ["traced"]
        if compile:
            modes += ["inductor"] + (["cudagraphs"] if dev.type == "cuda" else [])
    for b in backends if backends is not None else available_backends(dev):
        ctx = backend_context(b)
        for mode in modes:
            c = None if mode == "traced" else mode
            tag = f"[{b}]" if mode == "traced" else f"[{b}, {mode}]"

            def h_grad(i, c=c):
                x, y = batches[i]
                return hessfast.grad(model, loss_fn, x, y, compile=c)

            def h_hvp(i, c=c):
                x, y = batches[i]
                return hessfast.hvp(model, loss_fn, x, y, v1, compile=c)

            def h_ggn(i, c=c):
                x, y = batches[i]
                return hessfast.ggn_vp(model, loss_fn, x, y, v1, compile=c)

            def h_hvp_k(i, c=c):
                x, y = batches[i]
                return hessfast.hvp(model, loss_fn, x, y, V, compile=c)

            for label, kind, per, fn in (
                ("hessfast.grad", "grad", 1, h_grad),
                ("hessfast.hvp", "hvp", 1, h_hvp),
                ("hessfast.ggn_vp", "ggn", 1, h_ggn),
                (f"hessfast.hvp K={k}", "hvpK", k, h_hvp_k),
            ):
                methods.append(
                    Method(
                        f"{label} {tag}",
                        "hessfast",
                        kind,
                        per,
                        _in(ctx, fn),
                        backend=b,
                        hessfast=True,
                    )
                )

    autograd = [
        ("torch.func jvp(grad)", "torch.func", "hvp", 1, func_hvp),
        ("double backward", "autograd", "hvp", 1, double_backward),
        ("torch.func GGN (jvp+vjp)", "torch.func", "ggn", 1, func_ggn),
        (f"torch.func vmap K={k}", "torch.func", "hvpK", k, func_vmap_k),
    ]
    for label, fam, kind, per, fn in autograd:
        methods.append(Method(label, fam, kind, per, fn))
    if uses_sdpa:
        methods.append(
            Method(
                "gradient (autograd), math attention",
                "autograd",
                "grad",
                1,
                _in(_math, autograd_grad),
            )
        )
        for label, fam, kind, per, fn in autograd:
            methods.append(Method(label + ", math attention", fam, kind, per, _in(_math, fn)))

    if compile:
        suffix = ", math attention" if uses_sdpa else ""
        ctx = _math if uses_sdpa else contextlib.nullcontext

        def c_hvp_fn(p, v, x, y):
            return jvp(grad(lambda q: lf(functional_call(model, q, x), y)), (p,), (v,))[1]

        def c_ggn_fn(p, v, x, y):
            def z_of(q):
                return functional_call(model, q, x)

            out, pull = vjp(z_of, p)
            _, jv = jvp(z_of, (p,), (v,))
            _, hjv = jvp(grad(lambda o: lf(o, y)), (out,), (jv,))
            return pull(hjv)[0]

        for label, kind, f in (
            ("torch.compile(torch.func jvp(grad))", "hvp", c_hvp_fn),
            ("torch.compile(torch.func GGN)", "ggn", c_ggn_fn),
        ):
            compiled = torch.compile(f, dynamic=False)

            def run(i, compiled=compiled):
                x, y = batches[i]
                return compiled(params, v1, x, y)

            methods.append(Method(label + suffix, "torch.compile", kind, 1, _in(ctx, run)))

    # peers: PyHessian and curvlinops, when installed
    suffix = ", math attention" if uses_sdpa else ""
    ctx = _math if uses_sdpa else contextlib.nullcontext
    if not peers:
        return methods
    if _importable("pyhessian"):

        def pyhessian_hvp(i):
            from pyhessian import hessian as PyHessian
            from pyhessian.utils import hessian_vector_product

            x, y = batches[i]
            if len(x) != 1:
                raise ValueError("PyHessian passes one input tensor to the model")
            was = model.training
            for p in plist:
                p.grad = None
            try:
                h = PyHessian(model, lf, data=(x[0], y), cuda=dev.type == "cuda")
                hv = hessian_vector_product(h.gradsH, h.params, v1_list)
                return as_dict(t.detach() for t in hv)
            finally:
                for p in model.parameters():
                    p.grad = None
                model.train(was)

        methods.append(
            Method("PyHessian hvp" + suffix, "peer", "hvp", 1, _quiet(_in(ctx, pyhessian_hvp)))
        )
    else:
        methods.append(Method("PyHessian hvp", "peer", "hvp", 1, None, unavailable="not installed"))
    if _importable("curvlinops"):
        loss_mod = _loss_module(loss_fn)
        peer_model = _Flatten(model) if flatten else model
        v_flat = torch.cat([t.reshape(-1) for t in v1_list])

        def curvlinops_op(cls_name):
            def run(i):
                import curvlinops

                x, y = batches[i]
                if len(x) != 1:
                    raise ValueError("curvlinops passes one input tensor to the model")
                data = [(x[0], y.flatten() if flatten else y)]
                op = getattr(curvlinops, cls_name)(
                    peer_model, loss_mod, plist, data, check_deterministic=False
                )
                out = op @ v_flat
                parts = torch.split(out, [p.numel() for p in plist])
                return as_dict(t.view(p.shape) for t, p in zip(parts, plist))

            return run

        methods.append(
            Method(
                "curvlinops HessianLinearOperator" + suffix,
                "peer",
                "hvp",
                1,
                _quiet(_in(ctx, curvlinops_op("HessianLinearOperator"))),
            )
        )
        methods.append(
            Method(
                "curvlinops GGNLinearOperator" + suffix,
                "peer",
                "ggn",
                1,
                _quiet(_in(ctx, curvlinops_op("GGNLinearOperator"))),
            )
        )
    else:
        for label, kind in (("HessianLinearOperator", "hvp"), ("GGNLinearOperator", "ggn")):
            methods.append(
                Method(f"curvlinops {label}", "peer", kind, 1, None, unavailable="not installed")
            )
    return methods


# ------------------------------------------------------------------------------- reference


@contextlib.contextmanager
def tf32(enabled: bool):
    """Set TF32 for CUDA matmuls and cuDNN convolutions, restoring the old setting afterwards."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def reference_dtype(dev: torch.device, dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dev.type != "cuda" or dtype == torch.float64 else torch.float32


def reference_model(model: nn.Module, ref_dtype: torch.dtype) -> nn.Module:
    """A ``ref_dtype`` copy of ``model`` whose training-mode BatchNorms use batch statistics and
    update nothing: hessfast's semantics, without side effects on the benchmarked model."""
    model = copy.deepcopy(model).to(ref_dtype)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return model


def reference(
    w: Workload, V: dict, names: list[str], lf: Callable, ref_dtype: torch.dtype
) -> tuple[dict[str, dict], str]:
    """``({"grad", "hvp", "ggn", "hvpK"} -> {name: tensor}, how)`` on batch 0: ``torch.func`` on a
    ``ref_dtype`` copy of the model, math SDPA backend, TF32 off. Where ``torch.func`` raises
    (torch 2.14 cannot take ``jvp(grad(F.mse_loss))``: "ZeroTensors are immutable") the same
    quantities come from double backward in the same precision, and ``how`` says so."""
    model = reference_model(w.model, ref_dtype)
    x, y = w.batches[0]

    def cast(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.to(ref_dtype)
        return t

    x = tuple(torch.utils._pytree.tree_map(cast, x))
    y = torch.utils._pytree.tree_map(cast, y)
    named = dict(model.named_parameters())
    Vr = {n: V[n].to(ref_dtype) for n in names}
    with _math(), tf32(False):
        try:
            return _reference_func(model, named, x, y, Vr, names, lf), "torch.func"
        except Exception as e:
            why = _error(e)
        _free(next(iter(Vr.values())).device)
        return (
            _reference_autograd(model, named, x, y, Vr, names, lf),
            f"double backward (torch.func raised {why})",
        )


def _reference_func(model, named, x, y, Vr, names, lf):
    params = {n: named[n].detach() for n in names}
    k = next(iter(Vr.values())).shape[0]

    def L(p):
        return lf(functional_call(model, p, x), y)

    def z_of(p):
        return functional_call(model, p, x)

    hvps = []
    g = None
    for i in range(k):
        gi, hv = jvp(grad(L), (params,), ({n: Vr[n][i] for n in names},))
        g = gi if g is None else g
        hvps.append(hv)
    out, pull = vjp(z_of, params)
    _, jv = jvp(z_of, (params,), ({n: Vr[n][0] for n in names},))
    _, hjv = jvp(grad(lambda o: lf(o, y)), (out,), (jv,))
    ggn = pull(hjv)[0]
    hvpK = {n: torch.stack([h[n] for h in hvps]) for n in names}
    return {"grad": g, "hvp": hvps[0], "ggn": ggn, "hvpK": hvpK}


def _reference_autograd(model, named, x, y, Vr, names, lf):
    plist = [named[n] for n in names]
    k = next(iter(Vr.values())).shape[0]

    def as_dict(ts):
        return {n: t.detach() for n, t in zip(names, ts)}

    with torch.enable_grad():
        z = model(*x)
        g = torch.autograd.grad(lf(z, y), plist, create_graph=True)
        hvps = [
            as_dict(torch.autograd.grad(g, plist, [Vr[n][i] for n in names], retain_graph=True))
            for i in range(k)
        ]
        u = torch.zeros_like(z, requires_grad=True)
        gu = torch.autograd.grad(z, plist, u, create_graph=True)
        jv = torch.autograd.grad(gu, u, [Vr[n][0] for n in names], retain_graph=True)[0]
        zd = z.detach().requires_grad_(True)
        gz = torch.autograd.grad(lf(zd, y), zd, create_graph=True)[0]
        hjv = torch.autograd.grad(gz, zd, jv)[0]
        ggn = as_dict(torch.autograd.grad(z, plist, hjv))
    hvpK = {n: torch.stack([h[n] for h in hvps]) for n in names}
    return {"grad": as_dict(g), "hvp": hvps[0], "ggn": ggn, "hvpK": hvpK}


def rel_error(out: dict, ref: dict, names: list[str], batched: bool) -> float:
    """Max over vectors of ``‖out − ref‖ / ‖ref‖`` over all parameters flattened; ``inf`` for a
    non-finite or missing result."""
    num = den = None
    for n in names:
        r = ref[n]
        o = out.get(n) if isinstance(out, dict) else None
        if o is None or tuple(o.shape) != tuple(r.shape):
            return math.inf
        o, r = (o, r) if batched else (o[None], r[None])
        d = (o.to(r.dtype) - r).flatten(1)
        a = d.square().sum(1).double()
        b = r.flatten(1).square().sum(1).double()
        num = a if num is None else num + a
        den = b if den is None else den + b
    if num is None:
        return math.inf
    err = (num.sqrt() / den.sqrt().clamp_min(torch.finfo(torch.float64).tiny)).max().item()
    return err if math.isfinite(err) else math.inf


# -------------------------------------------------------------------------------- the run


def _error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200] if msg else ''}".strip()


def prepare_method(
    m: Method, refs: dict, names: list[str], n_batches: int, dev, tol: float
) -> dict:
    """A method's row before timing: its first call on batch 0, checked against the reference,
    then a warm-up call that measures peak memory; both together are ``first_call_seconds``
    (tracing — on a signature's second product — and compiling happen there). A method that
    raises is a row with its error."""
    row: dict[str, Any] = {
        "method": m.label,
        "family": m.family,
        "backend": m.backend,
        "kind": m.kind,
        "vectors": m.vectors,
        "hessfast": m.hessfast,
    }
    if m.unavailable is not None:
        row.update(status="unavailable", error=m.unavailable)
        return row
    try:
        first, out = timed_call(lambda: m.fn(0), dev)
        err = rel_error(out, refs[m.kind], names, m.kind == "hvpK")
        del out
        row["first_call_seconds"] = first
        row["rel_err"] = err if math.isfinite(err) else None
        row["tolerance"] = tol
        if math.isfinite(err) and err <= tol:
            row["status"] = "pass"
        else:
            row["status"] = "fail"
            row["error"] = (
                f"relative error {err:.2e} exceeds the tolerance {tol:g}"
                if math.isfinite(err)
                else "non-finite or missing result"
            )
        t0 = time.perf_counter()
        peak, out = peak_call(lambda: m.fn(1 % n_batches), dev)
        del out
        row["first_call_seconds"] += time.perf_counter() - t0
        row.update(peak_bytes=peak, times=[])
    except Exception as e:  # a failing method is a result, not a crash
        row.update(status="error", error=_error(e))
        row.pop("rel_err", None)
    finally:
        _free(dev)
    return row


def time_rounds(methods: list[Method], rows: list[dict], n_batches: int, dev, repeats: int) -> None:
    """``repeats`` interleaved rounds: each runnable method once per round, inputs rotated; the
    medians go into the rows. A method that raises while timed becomes an error row."""
    live = [i for i, r in enumerate(rows) if "times" in r]
    for r in range(repeats):
        b = (r + 2) % n_batches
        for i in live:
            row = rows[i]
            if row["status"] == "error":
                continue
            try:
                t, out = timed_call(lambda b=b: methods[i].fn(b), dev)
                del out
                row["times"].append(t)
            except Exception as e:
                row.update(status="error", error=_error(e))
                row.pop("times", None)
    for i in live:
        row = rows[i]
        if row.get("times"):
            med = statistics.median(row["times"])
            row.update(seconds=med, seconds_per_vector=med / methods[i].vectors)
    _free(dev)


def bench_workload(
    w: Workload,
    dev: torch.device,
    *,
    k: int = 8,
    repeats: int = 5,
    compile: bool = False,
    tol: float | None = None,
    use_tf32: bool = False,
    backends: list[str] | None = None,
    peers: bool = True,
    log: Callable[[str], None] | None = None,
    modes: list[str] | None = None,
) -> dict:
    """Benchmark one workload; returns its result record (``rows`` in table order)."""
    dtype = next(w.model.parameters()).dtype
    tol = tol if tol is not None else default_tolerance(dtype, use_tf32 and dev.type == "cuda")
    names = [n for n, p in w.model.named_parameters() if p.requires_grad]
    x0, y0 = w.batches[0]
    out_shape, uses_sdpa = probe(w.model, x0)
    lf = autograd_loss(w.loss_fn, out_shape, y0)
    flatten = needs_flatten(w.loss_fn, out_shape, y0)
    gen = torch.Generator(device=dev).manual_seed(0)
    named = dict(w.model.named_parameters())
    V = {
        n: torch.randn((k, *named[n].shape), generator=gen, device=dev, dtype=torch.float32).to(
            dtype
        )
        for n in names
    }
    ref_dtype = reference_dtype(dev, dtype)
    t0 = time.perf_counter()
    refs, ref_how = reference(w, V, names, lf, ref_dtype)
    ref_seconds = time.perf_counter() - t0
    if log:
        log(f"  reference ({ref_how}): {ref_seconds:.1f} s")
    _free(dev)
    methods = build_methods(
        w,
        V,
        names,
        lf,
        uses_sdpa,
        flatten,
        k,
        compile=compile,
        backends=backends,
        dev=dev,
        peers=peers,
        modes=modes,
    )
    rows = []
    with tf32(use_tf32):
        for m in methods:
            t0 = time.perf_counter()
            rows.append(prepare_method(m, refs, names, len(w.batches), dev, tol))
            if log:
                log(f"{_row_log(rows[-1])} [{time.perf_counter() - t0:.1f} s]")
        time_rounds(methods, rows, len(w.batches), dev, repeats)
    if compile:
        torch._dynamo.reset()
    base = next(
        (r.get("seconds") for r in rows if r["method"] == "gradient (autograd)"),
        None,
    )
    for r in rows:
        if base and r.get("seconds_per_vector") is not None:
            r["ratio_to_gradient"] = r["seconds_per_vector"] / base
    del refs, V
    _free(dev)
    return {
        "model": w.name,
        "size": w.size,
        "description": w.description,
        "parameters": w.parameters,
        "dtype": str(dtype).replace("torch.", ""),
        "k": k,
        "repeats": repeats,
        "batches": len(w.batches),
        "uses_sdpa": uses_sdpa,
        "reference": f"{ref_how}, {str(ref_dtype).replace('torch.', '')} copy of the model, "
        "math SDPA backend, TF32 off, batch 0",
        "reference_seconds": ref_seconds,
        "tolerance": tol,
        "rows": rows,
    }


def _row_log(r: dict) -> str:
    if "first_call_seconds" in r:
        return f"  {r['method']}: first call {r['first_call_seconds']:.2f} s, {r['status']}"
    return f"  {r['method']}: {r['status']} ({r.get('error', '')})"


# ------------------------------------------------------------------------------- rendering


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 0.01 else f"{s * 1e3:.1f} ms"


def _first(s: float | None) -> str:
    return "" if s is None else (f"{s:.2f} s" if s >= 0.1 else _ms(s))


def _mem(b: int | None) -> str:
    if b is None:
        return "n/a"
    return f"{b / 2**20:.1f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def render(results: list[dict], prov: dict | None = None) -> str:
    """Markdown: a header line with the provenance, then one table per model."""
    lines = []
    if prov is not None:
        lines.append(
            f"hessfast {prov['hessfast']} (commit {prov['commit']}) on {prov['device']} "
            f"({prov['device_type']}, {prov['cpu_threads']} CPU threads), torch {prov['torch']}, "
            f"CUDA {prov['cuda']}, Triton {prov['triton']}, {prov['dtype']}, "
            f"TF32 {'on' if prov['tf32_requested'] else 'off'}, {prov['date']}"
        )
    for res in results:
        lines.append(
            f"\n### {res['model']} ({res['size']}, {res['parameters']:,} parameters, "
            f"{res['dtype']})\n"
        )
        lines.append(
            f"{res['description'].rstrip('.')}. K = {res['k']}; median of {res['repeats']} "
            f"interleaved rounds after a warm-up, {res['batches']} input batches rotated; "
            "first calls: the checked call and the warm-up, where tracing and compiling "
            "happen. Reference: "
            f"{res['reference']}; tolerance {res['tolerance']:g}.\n"
        )
        lines.append(
            "| method | vectors | time / vector | × gradient | peak memory | max rel. error "
            "| check | first calls |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        notes = []
        for r in res["rows"]:
            st = r["status"]
            if st == "unavailable":
                lines.append(f"| {r['method']} | {r['vectors']} | {r['error']} | | | | — | |")
                continue
            if st == "error":
                notes.append(f"{r['method']}: {r['error']}")
                lines.append(
                    f"| {r['method']} | {r['vectors']} | **fails** ({len(notes)}) | | | | **error** | |"
                )
                continue
            err = f"{r['rel_err']:.1e}" if r.get("rel_err") is not None else "non-finite"
            ratio = r.get("ratio_to_gradient")
            check = "ok" if st == "pass" else "**WRONG**"
            lines.append(
                f"| {r['method']} | {r['vectors']} | {_ms(r['seconds_per_vector'])} | "
                f"{f'{ratio:.2f}' if ratio is not None else 'n/a'} | {_mem(r.get('peak_bytes'))} | "
                f"{err} | {check} | {_first(r.get('first_call_seconds'))} |"
            )
        if notes:
            lines += ["", "Failures:", *[f"{i + 1}. {n}" for i, n in enumerate(notes)]]
    return "\n".join(lines)


def _finite(x: Any) -> Any:
    """JSON-safe: non-finite floats become ``None``."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def default_json_path(models: list[str], size: str) -> Path:
    tag = "+".join(re.sub(r"[^A-Za-z0-9_.-]+", "-", m).strip("-") for m in models)
    return Path("benchmarks") / "out" / f"bench-{tag}-{size}.json"


# ------------------------------------------------------------------------------------ CLI


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


@contextlib.contextmanager
def threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


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
            _free(dev)
    text = render(results, prov)
    print(text)
    path = Path(args.json) if args.json else default_json_path(models, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(_finite({"provenance": prov, "results": results}), indent=1, allow_nan=False)
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
