"""Group normalisation: ``aten.group_norm(x, G, γ, β, eps, cudnn_enabled)``.

Index conventions: ``x [N, C, *S]`` with ``C`` split into ``G`` groups of ``C/G`` channels; the
statistics reduce over each group's channels and all spatial positions, i.e. over the last dim of
the grouped view ``x_g [N, G, (C/G)·|S|]``; ``γ``, ``β`` are ``[C]`` (per channel, viewed as
``[1, C, 1, ..., 1]``). Tangents carry a leading K.

The math is layer norm's (:mod:`hessfast.rules.layer_norm`) with ``R`` = the grouped view's last
dim: ``x̂ = (x − m) r`` per ``(n, group)``; the shared :class:`~hessfast.rules.layer_norm.Normalized`
projector runs on the grouped view (:class:`GroupNormalized` reshapes in and out), the affine part
``y = γ x̂ + β`` on ``x``'s own shape, summing ``γ``'s and ``β``'s cotangents over every dim but
``C``. Second-order terms: the normalisation's (``∂(r P)[ẋ]`` applied to the cotangent) and the
affine ``γ̇ ḡ`` / ``ḡ ẋ̂`` terms, as in layer norm.

Kernels: a gradient (no tangents) runs ``aten.native_group_norm`` and
``aten.native_group_norm_backward``, autograd's kernels; with tangents the math above. Half
precision is computed in float32 and cast back.

Declined (the ``torch.func`` fallback): non-floating inputs, rank < 2, channels not divisible by
the groups, ``γ``/``β`` not of shape ``[C]``, active ``num_groups``/``eps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Call, Rule, nones
from .layer_norm import (
    Normalized,
    affine_bwd,
    affine_fwd,
    compute_dtype,
    norm_stats,
    to,
)

Tensor = torch.Tensor
aten = torch.ops.aten


def _r(t: Tensor | None, shape: tuple, batched: bool) -> Tensor | None:
    """``t`` reshaped to ``shape`` (keeping a leading K axis when ``batched``)."""
    if t is None:
        return None
    return t.reshape(t.shape[0], *shape) if batched else t.reshape(shape)


@dataclass
class GroupNormalized:
    """A :class:`Normalized` over the grouped view ``[N, G, M]`` seen in ``x``'s shape: the
    interface :func:`~hessfast.rules.layer_norm.affine_fwd` / ``affine_bwd`` use (``xhat``,
    :meth:`tangent`, :meth:`vjp_pair`), with tensors in ``x``'s shape on both sides."""

    inner: Normalized
    shape: tuple
    gshape: tuple
    xhat: Tensor

    def tangent(self, tx: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        txhat, a = self.inner.tangent(_r(tx, self.gshape, True))
        return _r(txhat, self.shape, True), a

    def vjp_pair(self, c, cdot, txhat, a):
        g = self.gshape
        gx, gdx = self.inner.vjp_pair(_r(c, g, False), _r(cdot, g, True), _r(txhat, g, True), a)
        return _r(gx, self.shape, False), _r(gdx, self.shape, True)


def group_norm_fwd_jvp_ref(x, groups, w, b, eps, tx, tw, tb):
    """``y = γ x̂ + β`` and ``ẏ = γ ẋ̂ + γ̇ x̂ + β̇`` for group norm; returns
    ``(y, ẏ, (norm, ẋ̂, a, view, sdims))`` (the residuals of
    :func:`~hessfast.rules.layer_norm.affine_bwd`)."""
    shape = tuple(x.shape)
    n, c, nd = shape[0], shape[1], x.dim()
    gshape = (n, groups, -1)
    xhat_g, r = norm_stats(x.reshape(gshape), (-1,), eps, True)
    gshape = tuple(xhat_g.shape)
    norm = GroupNormalized(Normalized(xhat_g, r, (-1,), True), shape, gshape, xhat_g.reshape(shape))
    txhat, a = norm.tangent(tx)
    view = (1, c) + (1,) * (nd - 2)
    sdims = tuple(d - nd for d in range(nd) if d != 1)
    k = next((t.shape[0] for t in (tx, tw, tb) if t is not None), 0)
    y, ydot = affine_fwd(norm, txhat, w, b, tw, tb, view, k)
    return y, ydot, (norm, txhat, a, view, sdims)


def group_norm_bwd_jvp_ref(saved, w, tw, g, gdot, need):
    """``((ḡ_x, ḡ_γ, ḡ_β), (ġ_x, ġ_γ, ġ_β))`` for the forward of :func:`group_norm_fwd_jvp_ref`."""
    norm, txhat, a, view, sdims = saved
    return affine_bwd(norm, txhat, a, w, tw, g, gdot, view, sdims, need)


class GroupNorm(Rule):
    """``group_norm(input, num_groups, weight, bias, eps, cudnn_enabled)``."""

    ops = (aten.group_norm.default,)
    name = "group_norm"

    def declines(self, call: Call) -> str | None:
        x, groups, w, b = call.args[:4]
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return "group_norm rule needs a floating-point input"
        if x.dim() < 2:
            return "group_norm rule needs an input [N, C, *S]"
        if not isinstance(groups, int) or groups < 1 or x.shape[1] % groups:
            return "group_norm rule: channels not divisible by num_groups"
        c = x.shape[1]
        for t in (w, b):
            if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != (c,)):
                return "group_norm rule: weight/bias must be [C] or None"
        if call.is_active(1) or call.is_active(4):
            return "group_norm rule: only input, weight and bias can be active"
        return None

    def fwd_jvp(self, call: Call):
        x, groups, w, b, eps = call.args[:5]
        tx, _, tw, tb = call.tangents[:4]
        need = (
            call.is_active(0),
            w is not None and call.is_active(2),
            b is not None and call.is_active(3),
        )
        tx = tx if need[0] else None
        tw = tw if need[1] else None
        tb = tb if need[2] else None
        nargs = len(call.args)
        cd = compute_dtype(x.dtype)
        dtypes = (x.dtype, None if w is None else w.dtype, None if b is None else b.dtype)
        if tx is None and tw is None and tb is None and x.dtype == cd:
            # no tangents (a gradient): autograd's kernels
            n, c = x.shape[:2]
            hw = math.prod(x.shape[2:])
            y, mean, rstd = aten.native_group_norm(x, w, b, n, c, hw, groups, eps)
            res = ("native", x, mean, rstd, w, b, (n, c, hw, groups), eps, need, dtypes, nargs)
            return y, None, res
        wc, twc = to(w, cd), to(tw, cd)
        y, ydot, saved = group_norm_fwd_jvp_ref(
            x.to(cd), groups, wc, to(b, cd), eps, to(tx, cd), twc, to(tb, cd)
        )
        return y.to(x.dtype), to(ydot, x.dtype), (saved, wc, twc, need, dtypes, cd, nargs)

    def bwd_jvp(self, res, g, gdot):
        if res[0] == "native":
            _, x, mean, rstd, w, b, sizes, eps, need, dtypes, nargs = res
            if g is None and gdot is None:
                return nones(nargs), nones(nargs)
            if gdot is None:
                out = aten.native_group_norm_backward(g, x, mean, rstd, w, *sizes, list(need))
                gx, gw, gb = (o if n else None for o, n in zip(out, need))
                return (gx, None, gw, gb, *nones(nargs - 4)), nones(nargs)
            # a cotangent tangent without input tangents: the reference math from x
            saved = group_norm_fwd_jvp_ref(x, sizes[3], w, b, eps, None, None, None)[2]
            res = (saved, w, None, need, dtypes, x.dtype, nargs)
        saved, wc, twc, need, dtypes, cd, nargs = res
        ga, gda = group_norm_bwd_jvp_ref(saved, wc, twc, to(g, cd), to(gdot, cd), need)
        (gx, gw, gb) = (to(t, d) for t, d in zip(ga, dtypes))
        (gdx, gdw, gdb) = (to(t, d) for t, d in zip(gda, dtypes))
        rest = nones(nargs - 4)
        return (gx, None, gw, gb, *rest), (gdx, None, gdw, gdb, *rest)


RULES = [GroupNorm()]
