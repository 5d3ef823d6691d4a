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

from .base import Call, Rule, add
from .layer_norm import (
    Normalized,
    affine_bwd,
    affine_tangent,
    compute_dtype,
    neg_dims,
    sum_dims,
    to,
)

Tensor = torch.Tensor
aten = torch.ops.aten


def batch_norm_fwd_jvp_ref(x, w, b, mean, var, training, eps, tx, tw, tb):
    """``y = γ x̂ + β`` and ``ẏ = γ ẋ̂ + γ̇ x̂ + β̇`` for ``x [N, C, *spatial]``; ``mean``/``var``
    (``[C]``) are used only when not ``training``. Returns ``(y, ẏ, saved)`` for
    :func:`batch_norm_bwd_jvp_ref`.

    The primal is ``aten.native_batch_norm`` (autograd's kernel; it also returns the batch
    statistics ``m``, ``r`` in training). ``x̂`` is formed only when a tangent needs it.
    """
    nd = x.dim()
    c = x.shape[1]
    dims = neg_dims([0, *range(2, nd)], nd)
    view = (1, c) + (1,) * (nd - 2)
    k = next((t.shape[0] for t in (tx, tw, tb) if t is not None), 0)
    if training:
        y, m, r = aten.native_batch_norm(x, w, b, None, None, True, 0.0, eps)
        m, r = m.reshape(view), r.reshape(view)
    else:
        y = aten.native_batch_norm(x, w, b, mean, var, False, 0.0, eps)[0]
        m, r = mean.reshape(view), torch.rsqrt(var.reshape(view) + eps)
    norm = txhat = a = ydot = None
    if k:
        norm = Normalized((x - m) * r, r, dims, center=True, const=not training)
        txhat, a = norm.tangent(tx)
        ydot = affine_tangent(norm.xhat, txhat, w, tw, tb, view, k, y.shape)
    saved = (x, m, r, mean, var, training, eps, norm, txhat, a, view, dims)
    return y, ydot, saved


def batch_norm_bwd_jvp_ref(saved, w, tw, g, gdot, need):
    """``((ḡ_x, ḡ_γ, ḡ_β), (ġ_x, ġ_γ, ġ_β))`` for :func:`batch_norm_fwd_jvp_ref`'s forward.

    The gradient alone (no ``ġ``, no second-order term) is one ``aten.native_batch_norm_backward``
    call, as in autograd. Eval mode is affine in ``x`` with ``s = γ r``: ``ḡ_x`` (and ``ḡ_γ``,
    ``ḡ_β``) from the same kernel, ``ġ_x = s ġ + γ̇ r ḡ``, ``ġ_γ = Σ_S (ġ x̂ + r ḡ ẋ)``,
    ``ġ_β = Σ_S ġ``. Training mode with tangents uses the shared normalisation math
    (:func:`~hessfast.rules.layer_norm.affine_bwd`).
    """
    x, m, r, mean, var, training, eps, norm, txhat, a, view, sdims = saved
    need_x, need_w, need_b = need
    second = g is not None and (txhat is not None or tw is not None)
    if training and (gdot is not None or second):
        return affine_bwd(norm, txhat, a, w, tw, g, gdot, view, sdims, need)
    gx = gw = gb = gdx = gdw = gdb = None
    if g is not None:
        if training:
            sm, sr = m.reshape(-1), r.reshape(-1)
            gx, gw, gb = aten.native_batch_norm_backward(
                g, x, w, None, None, sm, sr, True, eps, [need_x, need_w, need_b]
            )
        else:
            gx, gw, gb = aten.native_batch_norm_backward(
                g, x, w, mean, var, None, None, False, eps, [need_x, need_w, need_b]
            )
    if training:
        return (gx, gw, gb), (None, None, None)
    # eval mode: the tangent parts
    k = next((t.shape[0] for t in (gdot, tw, txhat) if t is not None), 0)
    if gdot is not None:
        if need_x:
            gdx = gdot * (r * w.reshape(view) if w is not None else r)
        if need_w:
            xhat = norm.xhat if norm is not None else (x - m) * r
            gdw = sum_dims(gdot * xhat, sdims).reshape(k, -1)
        if need_b:
            gdb = sum_dims(gdot, sdims).reshape(k, -1)
    if g is not None:
        if need_x and tw is not None:
            gdx = add(gdx, tw.reshape(k, *view) * (r * g))
        if need_w and txhat is not None:
            gdw = add(gdw, sum_dims(g * txhat, sdims).reshape(k, -1))
    return (gx, gw, gb), (gdx, gdw, gdb)


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
        need = (
            call.is_active(0),
            w is not None and call.is_active(1),
            b is not None and call.is_active(2),
        )
        tx, tw, tb = (t if n else None for t, n in zip(call.tangents[:3], need))
        cd = compute_dtype(x.dtype)
        wc, twc = to(w, cd), to(tw, cd)
        stats = (None, None) if training else (rm.to(cd), rv.to(cd))
        y, ydot, saved = batch_norm_fwd_jvp_ref(
            x.to(cd), wc, to(b, cd), *stats, bool(training), eps, to(tx, cd), twc, to(tb, cd)
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
