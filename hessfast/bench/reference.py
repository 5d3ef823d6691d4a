"""The correctness check every method passes before it is timed: a ``torch.func`` reference
(double backward where ``torch.func`` raises) and the relative error against it."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vjp

from .methods import math_attention
from .timing import describe_error, free_memory, tf32
from .workloads import Workload


def default_tolerance(dtype: torch.dtype, tf32: bool = False) -> float:
    """Relative-error tolerance of the correctness check for results computed in ``dtype``."""
    if dtype == torch.bfloat16:
        return 5e-2
    if dtype == torch.float64:
        return 1e-10
    return 1e-2 if tf32 else 1e-4


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
    """``({"grad", "hvp", "ggn", "hvpK", "residual"} -> {name: tensor}, how)`` on batch 0
    (``residual``: ``hvp − ggn``): ``torch.func`` on a
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
    with math_attention(), tf32(False):
        try:
            return _reference_func(model, named, x, y, Vr, names, lf), "torch.func"
        except Exception as e:
            why = describe_error(e)
        free_memory(next(iter(Vr.values())).device)
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
    res = {n: hvps[0][n] - ggn[n] for n in names}
    return {"grad": g, "hvp": hvps[0], "ggn": ggn, "hvpK": hvpK, "residual": res}


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
    res = {n: hvps[0][n] - ggn[n] for n in names}
    return {"grad": as_dict(g), "hvp": hvps[0], "ggn": ggn, "hvpK": hvpK, "residual": res}


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
