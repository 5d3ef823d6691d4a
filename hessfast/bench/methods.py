"""The methods a benchmark times, in table order: autograd, hessfast per backend and mode,
``torch.func``, ``torch.compile`` and installed peers (PyHessian, curvlinops)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import losses
from ..dispatch import backends as _backends
from ..dispatch import use_backend
from .workloads import Workload


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


@dataclass
class Method:
    """One way of computing one quantity. ``fn(i)`` runs it on batch ``i`` and returns
    ``{parameter name: tensor}``, with a leading K axis for ``kind == "hvpK"``."""

    label: str
    family: str  # autograd | hessfast | torch.func | torch.compile | peer
    kind: str  # grad | hvp | ggn | hvpK | residual (H − G)
    vectors: int
    fn: Callable[[int], dict] | None
    backend: str | None = None
    unavailable: str | None = None  # why it was not run (e.g. a peer that is not installed)
    hessfast: bool = False


def math_attention():
    """The context under which SDPA runs its math backend (twice differentiable)."""
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
    fn, kw = losses.identify(loss_fn)
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


def importable(name: str) -> bool:
    """Whether the module ``name`` (a peer: ``pyhessian``, ``curvlinops``) can be imported."""
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

            def h_residual(i, c=c):
                x, y = batches[i]
                return hessfast.residual_vp(model, loss_fn, x, y, v1, compile=c)

            def h_residual_two(i, c=c):
                x, y = batches[i]
                h = hessfast.hvp(model, loss_fn, x, y, v1, compile=c)
                g = hessfast.ggn_vp(model, loss_fn, x, y, v1, compile=c)
                return {n: h[n] - g[n] for n in h}

            for label, kind, per, fn in (
                ("hessfast.grad", "grad", 1, h_grad),
                ("hessfast.hvp", "hvp", 1, h_hvp),
                ("hessfast.ggn_vp", "ggn", 1, h_ggn),
                (f"hessfast.hvp K={k}", "hvpK", k, h_hvp_k),
                ("hessfast.residual_vp (R = H − G, one pass)", "residual", 1, h_residual),
                ("hessfast.hvp − hessfast.ggn_vp (two passes)", "residual", 1, h_residual_two),
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
                _in(math_attention, autograd_grad),
            )
        )
        for label, fam, kind, per, fn in autograd:
            methods.append(
                Method(label + ", math attention", fam, kind, per, _in(math_attention, fn))
            )

    if compile:
        suffix = ", math attention" if uses_sdpa else ""
        ctx = math_attention if uses_sdpa else contextlib.nullcontext

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
    ctx = math_attention if uses_sdpa else contextlib.nullcontext
    if not peers:
        return methods
    if importable("pyhessian"):

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
    if importable("curvlinops"):
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
