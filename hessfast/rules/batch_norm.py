"""Batch norm: ``aten.batch_norm(input, weight, bias, running_mean, running_var, training,
momentum, eps, cudnn_enabled)`` for ``input [N, C, *spatial]``.

Index conventions: the reduction dims are ``R = (0, 2, 3, ...)`` (all but the channel dim); ``γ``,
``β``, ``μ``, ``σ²`` have shape ``[C]`` and broadcast as ``[1, C, 1, ...]``. Tangents carry a
leading K. The math is the shared normalisation of :mod:`.layer_norm` (see its docstring):

- training (``training=True``): batch statistics per channel, ``x̂ = (x − mean_R x) r`` with
  ``r = (var_R(x) + eps)^(−1/2)`` (biased), differentiated through the statistics, second-order
  terms included. The running statistics are never read or written (the engine passes ``None``
  for them; if given they are ignored), and ``momentum`` is unused;
- eval (``training=False``): ``x̂ = (x − μ) r`` with ``r = (σ² + eps)^(−1/2)`` from the running
  statistics, which are constants: ``y = γ x̂ + β`` is linear in ``x`` and bilinear in ``(x, γ)``,
  so ``ẋ̂ = r ẋ``, ``ḡ_x = r γ ḡ``, ``ġ_x = r (γ ġ + γ̇ ḡ)``.

Running statistics are never active: a call that differentiates them is declined (fallback).
"""

from __future__ import annotations

import torch

from .base import Call, Rule
from .layer_norm import (
    Normalized,
    affine_bwd,
    affine_fwd,
    compute_dtype,
    neg_dims,
    norm_stats,
    to,
)

Tensor = torch.Tensor
aten = torch.ops.aten


def batch_norm_fwd_jvp_ref(x, w, b, mean, var, training, eps, tx, tw, tb):
    """``y = γ x̂ + β`` and ``ẏ = γ ẋ̂ + γ̇ x̂ + β̇`` for ``x [N, C, *spatial]``; ``mean``/``var``
    (``[C]``) are used only when not ``training``. Returns ``(y, ẏ, (norm, ẋ̂, a, view, sdims))``."""
    nd = x.dim()
    c = x.shape[1]
    dims = neg_dims([0, *range(2, nd)], nd)
    view = (1, c) + (1,) * (nd - 2)
    if training:
        xhat, r = norm_stats(x, dims, eps, center=True)
        norm = Normalized(xhat, r, dims, center=True)
    else:
        r = torch.rsqrt(var.reshape(view) + eps)
        norm = Normalized((x - mean.reshape(view)) * r, r, dims, center=True, const=True)
    txhat, a = norm.tangent(tx)
    k = next((t.shape[0] for t in (tx, tw, tb) if t is not None), 0)
    y, ydot = affine_fwd(norm, txhat, w, b, tw, tb, view, k)
    return y, ydot, (norm, txhat, a, view, dims)


def batch_norm_bwd_jvp_ref(saved, w, tw, g, gdot, need):
    """``((ḡ_x, ḡ_γ, ḡ_β), (ġ_x, ġ_γ, ġ_β))`` for :func:`batch_norm_fwd_jvp_ref`'s forward."""
    norm, txhat, a, view, sdims = saved
    return affine_bwd(norm, txhat, a, w, tw, g, gdot, view, sdims, need)


class BatchNorm(Rule):
    ops = (aten.batch_norm.default,)
    name = "batch_norm"

    def declines(self, call: Call) -> str | None:
        x, w, b, rm, rv, training = call.args[:6]
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
            return "batch_norm rule needs a floating-point input [N, C, *spatial]"
        if call.is_active(3) or call.is_active(4):
            return "batch_norm rule treats running statistics as constants; they are active here"
        c = x.shape[1]
        for t in (w, b) if training else (w, b, rm, rv):
            if t is not None and tuple(t.shape) != (c,):
                return f"batch_norm: per-channel tensor of shape {tuple(t.shape)}, expected ({c},)"
        if not training and (rm is None or rv is None):
            return "batch_norm in eval mode needs running_mean and running_var"
        return None

    def fwd_jvp(self, call: Call):
        x, w, b, rm, rv, training, _momentum, eps, _ = call.args
        tx, tw, tb = call.tangents[:3]
        cd = compute_dtype(x.dtype)
        wc, twc = to(w, cd), to(tw, cd)
        stats = (None, None) if training else (rm.to(cd), rv.to(cd))
        y, ydot, saved = batch_norm_fwd_jvp_ref(
            x.to(cd), wc, to(b, cd), *stats, bool(training), eps, to(tx, cd), twc, to(tb, cd)
        )
        need = (
            call.is_active(0),
            w is not None and call.is_active(1),
            b is not None and call.is_active(2),
        )
        dtypes = (x.dtype, None if w is None else w.dtype, None if b is None else b.dtype)
        return y.to(x.dtype), to(ydot, x.dtype), (saved, wc, twc, need, dtypes, cd)

    def bwd_jvp(self, res, g, gdot):
        saved, wc, twc, need, dtypes, cd = res
        ga, gda = batch_norm_bwd_jvp_ref(saved, wc, twc, to(g, cd), to(gdot, cd), need)
        ga = tuple(to(t, d) for t, d in zip(ga, dtypes))
        gda = tuple(to(t, d) for t, d in zip(gda, dtypes))
        return (*ga, *([None] * 6)), (*gda, *([None] * 6))


RULES = [BatchNorm()]
