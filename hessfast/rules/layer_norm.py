"""Normalisation layers: ``aten.layer_norm`` and ``aten.rms_norm``, plus the shared normalisation
math that ``batch_norm`` reuses with other reduction dims.

Index conventions: ``x`` has any shape; ``R`` is the set of reduction dims (the last
``len(normalized_shape)`` dims for layer/RMS norm; ``(0, 2, 3, ...)`` for batch norm), held as
*negative* indices so that the same dims address a primal ``[*s]`` and a batched ``[K, *s]`` (or a
stacked ``[1 + K, *s]``) tensor. ``mean_R`` keeps dims, so statistics broadcast back against ``x``.
Tangents carry a leading K.

Normalisation (``center=True``, layer/batch norm)::

    x̂ = (x − m) r,   m = mean_R(x),   r = (mean_R((x − m)²) + eps)^(−1/2)   (biased variance)

RMS normalisation (``center=False``): ``x̂ = x r`` with ``r = (mean_R(x²) + eps)^(−1/2)``.

Both share one projector, self-adjoint for the inner product summed over ``R``::

    P(t) = t − [mean_R(t)] − x̂ mean_R(x̂ t)          ([·] only when centring)

- forward tangent: ``ṙ = −r² a`` with ``a = mean_R(x̂ ẋ)``, and ``ẋ̂ = r P(ẋ)``;
- VJP: ``ḡ_x = r P(c)`` for a cotangent ``c`` of ``x̂``;
- tangent of the VJP: ``ġ_x = r P(ċ) + ṙ P(c) − r [ẋ̂ mean_R(x̂ c) + x̂ mean_R(ẋ̂ c)]``.
  The last two terms (``∂(r P)[ẋ]`` applied to ``c``) are the second-order terms of the
  normalisation; they need the primal cotangent ``c`` and are dropped in GGN mode.

With constant statistics (eval-mode batch norm) ``x̂ = (x − μ) r`` is affine in ``x``:
``ẋ̂ = r ẋ``, ``ḡ_x = r c``, ``ġ_x = r ċ``.

Affine output ``y = γ x̂ + β`` (``γ``, ``β`` broadcast by ``view``; ``S`` = the dims that they do
not span)::

    ẏ = γ ẋ̂ + γ̇ x̂ + β̇
    c = γ ḡ_y,               ċ = γ ġ_y + γ̇ ḡ_y        (γ̇ ḡ_y is second order)
    ḡ_γ = Σ_S ḡ_y x̂,         ġ_γ = Σ_S (ġ_y x̂ + ḡ_y ẋ̂)  (ḡ_y ẋ̂ is second order)
    ḡ_β = Σ_S ḡ_y,           ġ_β = Σ_S ġ_y

Half-precision inputs are computed in float32 (as torch does) and cast back.

Kernels: a layer norm without tangents (a gradient) runs ``aten.native_layer_norm`` and
``aten.native_layer_norm_backward``, autograd's kernels; with tangents the math above.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .base import Call, Rule, add, stack_k, unstack_k

Tensor = torch.Tensor
aten = torch.ops.aten


# ----------------------------------------------------------------------------------------------
# shared helpers (also used by batch_norm)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype torch computes normalisations in: float32 for half types, else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def to(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dtype)


def neg_dims(dims: Sequence[int], ndim: int) -> tuple[int, ...]:
    """``dims`` of an ``ndim``-dimensional primal as negative indices (valid for ``[K, *s]`` too)."""
    return tuple(sorted(d - ndim if d >= 0 else d for d in dims))


def sum_dims(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``Σ_dims t``; an empty ``dims`` is no reduction (``Tensor.sum(())`` would sum everything)."""
    return t.sum(dim=dims) if dims else t


def norm_stats(x: Tensor, dims: tuple[int, ...], eps: float, center: bool) -> tuple[Tensor, Tensor]:
    """``(x̂, r)``: ``x̂ = (x − mean_R x) r`` with ``r = (var_R(x) + eps)^(−1/2)`` (biased), or with
    ``center=False`` ``x̂ = x r``, ``r = (mean_R(x²) + eps)^(−1/2)``. ``r`` keeps the ``R`` dims."""
    xc = x - x.mean(dim=dims, keepdim=True) if center else x
    r = torch.rsqrt((xc * xc).mean(dim=dims, keepdim=True) + eps)
    return xc * r, r


def norm_project(
    xhat: Tensor, t: Tensor, dims: tuple[int, ...], center: bool
) -> tuple[Tensor, Tensor]:
    """``(P(t), mean_R(x̂ t))`` with ``P(t) = t − [mean_R t] − x̂ mean_R(x̂ t)``; ``t`` may carry any
    number of leading (K / stacked) axes."""
    a = (xhat * t).mean(dim=dims, keepdim=True)
    p = t - xhat * a
    if center:
        p = p - t.mean(dim=dims, keepdim=True)
    return p, a


@dataclass
class Normalized:
    """A normalised tensor ``x̂`` and what its tangent and VJP need (see the module docstring).

    ``const`` marks constant statistics (eval batch norm): ``x̂`` is then affine in ``x``.
    """

    xhat: Tensor
    r: Tensor
    dims: tuple[int, ...]
    center: bool
    const: bool = False

    def tangent(self, tx: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """``(ẋ̂, a)`` with ``ẋ̂ = r P(ẋ)`` and ``a = mean_R(x̂ ẋ)`` (``ṙ = −r² a``)."""
        if tx is None:
            return None, None
        if self.const:
            return self.r * tx, None
        p, a = norm_project(self.xhat, tx, self.dims, self.center)
        return self.r * p, a

    def vjp_pair(
        self,
        c: Tensor | None,
        cdot: Tensor | None,
        txhat: Tensor | None,
        a: Tensor | None,
    ) -> tuple[Tensor | None, Tensor | None]:
        """``(ḡ_x, ġ_x)`` from the cotangent ``c`` of ``x̂`` and its tangent ``ċ``:
        ``ḡ_x = r P(c)``; ``ġ_x = r P(ċ) + ṙ P(c) − r[ẋ̂ mean_R(x̂ c) + x̂ mean_R(ẋ̂ c)]``, the terms
        after the first present only when ``c`` and ``ẋ̂`` are."""
        s, n_g = stack_k(c, cdot)
        if s is None:
            return None, None
        if self.const:
            return unstack_k(self.r * s, n_g)
        p, m = norm_project(self.xhat, s, self.dims, self.center)
        gx, gdx = unstack_k(self.r * p, n_g)
        if c is not None and txhat is not None:
            pc, mc = p[0], m[0]
            mdc = (txhat * c).mean(dim=self.dims, keepdim=True)
            r = self.r
            gdx = add(gdx, -r * (r * a * pc + txhat * mc + self.xhat * mdc))
        return gx, gdx


def affine_tangent(
    xhat: Tensor,
    txhat: Tensor | None,
    w: Tensor | None,
    tw: Tensor | None,
    tb: Tensor | None,
    view: tuple[int, ...],
    k: int,
    shape: tuple[int, ...],
) -> Tensor | None:
    """``ẏ = γ ẋ̂ + γ̇ x̂ + β̇`` of ``y = γ x̂ + β`` (``[K, *shape]``, or ``None``); ``view`` is the
    full-rank broadcast shape of ``γ``/``β`` against ``x̂`` (``γ̇`` is viewed as ``[K, *view]``)."""
    ydot = None
    if txhat is not None:
        ydot = txhat * w.reshape(view) if w is not None else txhat
    if tw is not None:
        ydot = add(ydot, tw.reshape(k, *view) * xhat)
    if tb is not None:
        ydot = add(ydot, tb.reshape(k, *view))
    if ydot is not None and ydot.shape != (k, *shape):
        ydot = ydot.expand(k, *shape)
    return ydot


def affine_fwd(
    norm: Normalized,
    txhat: Tensor | None,
    w: Tensor | None,
    b: Tensor | None,
    tw: Tensor | None,
    tb: Tensor | None,
    view: tuple[int, ...],
    k: int,
) -> tuple[Tensor, Tensor | None]:
    """``y = γ x̂ + β`` and ``ẏ = γ ẋ̂ + γ̇ x̂ + β̇``; ``view`` is the full-rank broadcast shape of
    ``γ``/``β`` against ``x̂`` (``γ̇`` is viewed as ``[K, *view]``)."""
    xhat = norm.xhat
    y = xhat
    if w is not None:
        y = y * w.reshape(view)
    if b is not None:
        y = y + b.reshape(view)
    return y, affine_tangent(xhat, txhat, w, tw, tb, view, k, tuple(y.shape))


def affine_bwd(
    norm: Normalized,
    txhat: Tensor | None,
    a: Tensor | None,
    w: Tensor | None,
    tw: Tensor | None,
    g: Tensor | None,
    gdot: Tensor | None,
    view: tuple[int, ...],
    sdims: tuple[int, ...],
    need: tuple[bool, bool, bool],
) -> tuple[tuple, tuple]:
    """``((ḡ_x, ḡ_γ, ḡ_β), (ġ_x, ġ_γ, ġ_β))`` for ``y = γ x̂ + β``; ``sdims`` are the (negative) dims
    that ``γ`` and ``β`` do not span, ``need`` says which of ``x, γ, β`` are active."""
    need_x, need_w, need_b = need
    gx = gw = gb = gdx = gdw = gdb = None
    if need_x:
        c = cdot = None
        if w is not None:
            wv = w.reshape(view)
            c = None if g is None else g * wv
            cdot = None if gdot is None else gdot * wv
        else:
            c, cdot = g, gdot
        if tw is not None and g is not None:
            cdot = add(cdot, tw.reshape(tw.shape[0], *view) * g)
        gx, gdx = norm.vjp_pair(c, cdot, txhat, a)
    s, n_g = stack_k(g, gdot)
    if need_w and s is not None:
        wshape = tuple(w.shape)
        gw, gdw = unstack_k(sum_dims(s * norm.xhat, sdims), n_g)
        if g is not None and txhat is not None:
            gdw = add(gdw, sum_dims(g * txhat, sdims))
        gw = None if gw is None else gw.reshape(wshape)
        gdw = None if gdw is None else gdw.reshape(-1, *wshape)
    if need_b and s is not None:
        gb, gdb = unstack_k(sum_dims(s, sdims), n_g)
    return (gx, gw, gb), (gdx, gdw, gdb)


def _cast_pair(pair: tuple, dtypes: tuple) -> tuple:
    return tuple(to(t, d) for t, d in zip(pair, dtypes))


# ----------------------------------------------------------------------------------------------
# plain-torch references


def layer_norm_fwd_jvp_ref(x, normalized_shape, w, b, eps, tx, tw, tb, center=True):
    """Layer norm (``center=True``) or RMS norm (``center=False``) over the last
    ``len(normalized_shape)`` dims: ``y = γ x̂ + β`` and ``ẏ = γ ẋ̂ + γ̇ x̂ + β̇``.

    Returns ``(y, ẏ, (norm, ẋ̂, a, view, sdims))``; ``γ``, ``β`` have shape ``normalized_shape``."""
    d = len(normalized_shape)
    nd = x.dim()
    dims = tuple(range(-d, 0))
    sdims = tuple(range(-nd, -d))
    view = (1,) * (nd - d) + tuple(normalized_shape)
    xhat, r = norm_stats(x, dims, eps, center)
    norm = Normalized(xhat, r, dims, center)
    txhat, a = norm.tangent(tx)
    k = next((t.shape[0] for t in (tx, tw, tb) if t is not None), 0)
    y, ydot = affine_fwd(norm, txhat, w, b, tw, tb, view, k)
    return y, ydot, (norm, txhat, a, view, sdims)


def layer_norm_bwd_jvp_ref(saved, w, tw, g, gdot, need):
    """``((ḡ_x, ḡ_γ, ḡ_β), (ġ_x, ġ_γ, ġ_β))`` for the forward of :func:`layer_norm_fwd_jvp_ref`."""
    norm, txhat, a, view, sdims = saved
    return affine_bwd(norm, txhat, a, w, tw, g, gdot, view, sdims, need)


# ----------------------------------------------------------------------------------------------
# rules


def _check_affine(t: Tensor | None, shape: tuple) -> bool:
    return t is None or (isinstance(t, Tensor) and tuple(t.shape) == shape)


class _NormRule(Rule):
    """Shared body of the layer/RMS norm rules; the schema mixins (:class:`LayerNormSchema`,
    :class:`RMSNormSchema`) map ``call.args`` to ``(x, normalized_shape, w, b, eps)`` and name the
    slots of ``x, γ, β``."""

    def declines(self, call: Call) -> str | None:
        x, ns, w, b, _ = self._unpack(call)
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return f"{self.name} rule needs a floating-point input"
        ns = tuple(int(s) for s in ns)
        if len(ns) == 0 or x.dim() < len(ns) or tuple(x.shape[x.dim() - len(ns) :]) != ns:
            return (
                f"{self.name}: normalized_shape {list(ns)} does not match the input's trailing dims"
            )
        if not (_check_affine(w, ns) and _check_affine(b, ns)):
            return f"{self.name}: weight/bias shape differs from normalized_shape"
        return None

    def fwd_jvp(self, call: Call):
        x, ns, w, b, eps = self._unpack(call)
        ix, iw, ib = self.slots
        tx = call.tangents[ix]
        tw = call.tangents[iw]
        tb = call.tangents[ib] if ib is not None else None
        cd = compute_dtype(x.dtype)
        if eps is None:
            eps = torch.finfo(cd).eps
        need = (
            call.is_active(ix),
            w is not None and call.is_active(iw),
            ib is not None and b is not None and call.is_active(ib),
        )
        dtypes = (x.dtype, None if w is None else w.dtype, None if b is None else b.dtype)
        if self.center and tx is None and tw is None and tb is None and x.dtype == cd:
            # no tangents (a gradient): autograd's kernels, native_layer_norm and its backward
            ns = [int(v) for v in ns]
            y, mean, rstd = aten.native_layer_norm(x, ns, w, b, eps)
            return y, None, ("native", x, ns, mean, rstd, w, b, eps, need, dtypes)
        wc, bc = to(w, cd), to(b, cd)
        twc = to(tw, cd)
        y, ydot, saved = layer_norm_fwd_jvp_ref(
            x.to(cd), ns, wc, bc, eps, to(tx, cd), twc, to(tb, cd), center=self.center
        )
        return y.to(x.dtype), to(ydot, x.dtype), (saved, wc, twc, need, dtypes, cd)

    def _bwd(self, res, g, gdot):
        if res[0] == "native":
            _, x, ns, mean, rstd, w, b, eps, need, dtypes = res
            if gdot is None:
                if g is None:
                    return (None, None, None), (None, None, None)
                out = aten.native_layer_norm_backward(g, x, ns, mean, rstd, w, b, list(need))
                return tuple(o if n else None for o, n in zip(out, need)), (None, None, None)
            # a cotangent tangent without input tangents: the reference math from x
            saved = layer_norm_fwd_jvp_ref(x, ns, w, b, eps, None, None, None)[2]
            res = (saved, w, None, need, dtypes, x.dtype)
        saved, wc, twc, need, dtypes, cd = res
        ga, gda = layer_norm_bwd_jvp_ref(saved, wc, twc, to(g, cd), to(gdot, cd), need)
        return _cast_pair(ga, dtypes), _cast_pair(gda, dtypes)


class LayerNormSchema:
    """``layer_norm(input, normalized_shape, weight, bias, eps, cudnn_enable)``: where its
    arguments sit, shared by every implementation (torch, Triton, CUDA) of the norm rules."""

    ops = (aten.layer_norm.default,)
    name = "layer_norm"
    center = True
    #: positions of x, γ, β in the schema
    slots = (0, 2, 3)

    def _unpack(self, call: Call):
        x, ns, w, b, eps, _ = call.args
        return x, ns, w, b, eps

    def bwd_jvp(self, res, g, gdot):
        (gx, gw, gb), (gdx, gdw, gdb) = self._bwd(res, g, gdot)
        return (gx, None, gw, gb, None, None), (gdx, None, gdw, gdb, None, None)


class RMSNormSchema:
    """``rms_norm(input, normalized_shape, weight, eps)``; ``eps=None`` means the machine epsilon
    of the computation dtype (float32 for half inputs), as in torch."""

    ops = (aten.rms_norm.default,)
    name = "rms_norm"
    center = False
    #: positions of x, γ (and no β) in the schema
    slots = (0, 2, None)

    def _unpack(self, call: Call):
        x, ns, w, eps = call.args
        return x, ns, w, None, eps

    def bwd_jvp(self, res, g, gdot):
        (gx, gw, _), (gdx, gdw, _) = self._bwd(res, g, gdot)
        return (gx, None, gw, None), (gdx, None, gdw, None)


class LayerNorm(LayerNormSchema, _NormRule):
    """The plain-torch layer norm rule."""


class RMSNorm(RMSNormSchema, _NormRule):
    """The plain-torch RMS norm rule."""


RULES = [LayerNorm(), RMSNorm()]
