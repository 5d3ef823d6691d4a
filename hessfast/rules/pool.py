"""Pooling: max pooling (piecewise linear) and average / adaptive average pooling (linear).

Index conventions: ``x [N, C, *S]`` with ``d`` spatial dims ``S`` (an unbatched ``x [C, *S]`` is
given a batch of one), ``y [N, C, *T]``; tangents and cotangent tangents carry a leading ``K``,
and ``[ḡ; ġ]`` stacked (:func:`~hessfast.rules.base.stack_k`) a leading ``M = 1 + K``. 1-D pools
run as the 2-D pool of ``x`` unsqueezed to ``[N, C, 1, W]`` (a ``1 × k`` window), as aten itself
computes ``avg_pool1d`` and the max pool's indices.

Max pooling (``max_pool{1,2,3}d``, their ``_with_indices`` forms, ``adaptive_max_pool{2,3}d``):
``y = x[idx]`` with ``idx`` the argmax of each window (flat over ``S``, as the native kernel
returns it). Away from ties the map is linear with fixed ``idx``, so

- ``ẏ = ẋ[idx]``: one ``gather`` over the flattened spatial dims, ``idx`` broadcast over K;
- ``ḡ_x = scatter_add(idx, ḡ)``, ``ġ_x = scatter_add(idx, ġ)``: autograd's kernel
  (``max_pool{2,3}d_with_indices_backward``, ``adaptive_max_pool{2,3}d_backward``) on ``[ḡ; ġ]``
  with M folded into the batch (``[M·N, C, *T]``, indices repeated M times), one call;
- no second-order term (``∂²f = 0`` a.e.; at ties, the window's first maximum, as torch).

Average pooling (``avg_pool{1,2,3}d``, ``adaptive_avg_pool{1,2,3}d``, ``_adaptive_avg_pool{2,3}d``)
is a fixed linear map ``y = A x``:

- ``ẏ = A ẋ``: the op itself with K folded into the batch;
- ``ḡ_x = Aᵀ ḡ``, ``ġ_x = Aᵀ ġ``: autograd's kernel (``avg_pool{2,3}d_backward``,
  ``_adaptive_avg_pool{2,3}d_backward``) on ``[ḡ; ġ]`` folded into the batch; a global adaptive pool
  (output size all ones, which aten computes as a mean) as the mean's adjoint,
  ``expand(ḡ) / |S|``;
- no second-order term.

The backward kernels read only the input's size: an uninitialised tensor (``new_empty``) of the
folded size stands in for it.

Declined (the ``torch.func`` fallback): non-floating inputs, ranks other than ``d + 1`` / ``d + 2``,
non-int pooling parameters, active arguments other than the input.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

from .base import Call, Rule, nones, stack_k, unstack_k

Tensor = torch.Tensor
aten = torch.ops.aten


def _ints(v, d: int) -> list[int]:
    """An int or a length-1/length-``d`` sequence as a length-``d`` list of ints (``TypeError`` for
    anything else, e.g. a float)."""
    if isinstance(v, int):
        return [v] * d
    v = [operator.index(a) for a in v]
    return v * d if len(v) == 1 else v


def _fold(t: Tensor) -> Tensor:
    """``[M, N, C, *S] -> [M·N, C, *S]``."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _unfold(t: Tensor, m: int) -> Tensor:
    """Inverse of :func:`_fold`."""
    return t.reshape(m, t.shape[0] // m, *t.shape[1:])


# ---- plain-torch references ---------------------------------------------------------------------


def max_pool_fwd_jvp_ref(x: Tensor, tx: Tensor | None, pool) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, idx, ẏ)`` for ``(y, idx) = pool(x)`` (batched ``x [N, C, *S]``): ``ẏ = ẋ[idx]``,
    gathered over the flattened spatial dims; ``tx [K, N, C, *S]`` or ``None``."""
    y, idx = pool(x)
    ydot = None
    if tx is not None:
        k, n, c = tx.shape[:3]
        flat = idx.reshape(1, n, c, -1).expand(k, n, c, -1)
        ydot = torch.gather(tx.reshape(k, n, c, -1), -1, flat).reshape(k, *y.shape)
    return y, idx, ydot


def max_pool_bwd_ref(s: Tensor, x_size, idx: Tensor, pool_bwd) -> Tensor:
    """``scatter_add(idx, s)`` for stacked cotangents ``s [M, N, C, *T]`` by the native backward
    ``pool_bwd(g, self, indices)`` with M folded into the batch; ``[M, N, C, *S]``."""
    m = s.shape[0]
    idx_m = idx if m == 1 else idx.unsqueeze(0).expand(m, *idx.shape)
    idx_m = idx_m.reshape(m * idx.shape[0], *idx.shape[1:])
    self_m = s.new_empty((m * x_size[0], *x_size[1:]))
    return _unfold(pool_bwd(_fold(s), self_m, idx_m), m)


def linear_pool_fwd_jvp_ref(x: Tensor, tx: Tensor | None, pool) -> tuple[Tensor, Tensor | None]:
    """``y = A x`` and ``ẏ = A ẋ`` with K folded into the batch (batched ``x [N, C, *S]``)."""
    y = pool(x)
    ydot = None
    if tx is not None:
        ydot = _unfold(pool(_fold(tx)), tx.shape[0])
    return y, ydot


def linear_pool_bwd_ref(s: Tensor, x_size, pool_bwd) -> Tensor:
    """``Aᵀ s`` for stacked cotangents ``s [M, N, C, *T]`` by the native backward
    ``pool_bwd(g, self)`` with M folded into the batch; ``pool_bwd=None``: a global average
    (``A = mean over S``), whose adjoint is ``expand(s) / |S|``."""
    m = s.shape[0]
    if pool_bwd is None:
        return s.expand(m, *x_size) / math.prod(x_size[2:])
    self_m = s.new_empty((m * x_size[0], *x_size[1:]))
    return _unfold(pool_bwd(_fold(s), self_m), m)


# ---- per-op parameters --------------------------------------------------------------------------


@dataclass
class _Spec:
    """How one op runs: ``d`` spatial dims; ``max`` (piecewise linear, argmax indices) or linear;
    ``tuple_out``: the op returns ``(y, indices)``."""

    d: int
    max: bool
    tuple_out: bool = False
    adaptive: bool = False


_SPECS = {
    aten.max_pool1d.default: _Spec(1, True),
    aten.max_pool2d.default: _Spec(2, True),
    aten.max_pool3d.default: _Spec(3, True),
    aten.max_pool1d_with_indices.default: _Spec(1, True, True),
    aten.max_pool2d_with_indices.default: _Spec(2, True, True),
    aten.max_pool3d_with_indices.default: _Spec(3, True, True),
    aten.adaptive_max_pool2d.default: _Spec(2, True, True, True),
    aten.adaptive_max_pool3d.default: _Spec(3, True, True, True),
    aten.avg_pool1d.default: _Spec(1, False),
    aten.avg_pool2d.default: _Spec(2, False),
    aten.avg_pool3d.default: _Spec(3, False),
    aten.adaptive_avg_pool1d.default: _Spec(1, False, adaptive=True),
    aten.adaptive_avg_pool2d.default: _Spec(2, False, adaptive=True),
    aten._adaptive_avg_pool2d.default: _Spec(2, False, adaptive=True),
    aten.adaptive_avg_pool3d.default: _Spec(3, False, adaptive=True),
    aten._adaptive_avg_pool3d.default: _Spec(3, False, adaptive=True),
}


def _window(args, d: int, dilation: bool):
    """``(kernel, stride, padding[, dilation])`` of a windowed pool; an empty stride means the
    kernel size (torch's default)."""
    k = _ints(args[1], d)
    stride = args[2]
    s = _ints(stride, d) if isinstance(stride, int) or len(stride) else k
    p = _ints(args[3], d)
    if dilation:
        return k, s, p, _ints(args[4], d)
    return k, s, p


def _functions(call: Call, spec: _Spec):
    """``(pool, pool_bwd)`` on batched tensors of the op's rank (1-D: the ``[N, C, 1, W]`` view's).

    Max pools: ``pool(x) -> (y, idx)``, ``pool_bwd(g, self, idx)``; linear pools: ``pool(x) -> y``,
    ``pool_bwd(g, self)``, or ``None`` for a global average computed as a mean (as aten's
    ``adaptive_avg_pool{1,2,3}d`` compute an output size of all ones)."""
    a, d, op = call.args, spec.d, call.op
    d2 = 3 if d == 3 else 2
    if spec.max and spec.adaptive:
        out = _ints(a[1], d)
        fwd = aten.adaptive_max_pool2d if d == 2 else aten.adaptive_max_pool3d
        bwd = aten.adaptive_max_pool2d_backward if d == 2 else aten.adaptive_max_pool3d_backward
        return (lambda x: fwd(x, out)), bwd
    if spec.max:
        k, s, p, dil = _window(a, d, True)
        ceil = bool(a[5])
        if d == 1:
            k, s, p, dil = [1, *k], [1, *s], [0, *p], [1, *dil]
        fwd = aten.max_pool3d_with_indices if d2 == 3 else aten.max_pool2d_with_indices
        bwd = (
            aten.max_pool3d_with_indices_backward
            if d2 == 3
            else aten.max_pool2d_with_indices_backward
        )
        return (
            lambda x: fwd(x, k, s, p, dil, ceil),
            lambda g, x, idx: bwd(g, x, k, s, p, dil, ceil, idx),
        )
    if spec.adaptive:
        out = _ints(a[1], d)
        if d == 1:
            out = [1, *out]
        if all(o == 1 for o in out) and op not in _EXPLICIT_ADAPTIVE:
            dims = tuple(range(-d2, 0))
            return (lambda x: x.mean(dim=dims, keepdim=True)), None
        fwd = aten._adaptive_avg_pool3d if d2 == 3 else aten._adaptive_avg_pool2d
        bwd = aten._adaptive_avg_pool3d_backward if d2 == 3 else aten._adaptive_avg_pool2d_backward
        return (lambda x: fwd(x, out)), bwd
    k, s, p = _window(a, d, False)
    ceil, cip = bool(a[4]), bool(a[5])
    div = a[6] if op is not aten.avg_pool1d.default else None
    if d == 1:
        k, s, p = [1, *k], [1, *s], [0, *p]
    fwd = aten.avg_pool3d if d2 == 3 else aten.avg_pool2d
    bwd = aten.avg_pool3d_backward if d2 == 3 else aten.avg_pool2d_backward
    return (
        lambda x: fwd(x, k, s, p, ceil, cip, div),
        lambda g, x: bwd(g, x, k, s, p, ceil, cip, div),
    )


#: The kernels themselves (never the mean shortcut of a global average).
_EXPLICIT_ADAPTIVE = (aten._adaptive_avg_pool2d.default, aten._adaptive_avg_pool3d.default)


class Pool(Rule):
    """Max, average and adaptive pools in 1, 2 and 3 spatial dims (see the module docstring)."""

    ops = tuple(_SPECS)
    name = "pool"

    def declines(self, call: Call) -> str | None:
        spec = _SPECS[call.op]
        x = call.args[0]
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return "pool rule needs a real floating-point input"
        if x.dim() not in (spec.d + 1, spec.d + 2):
            return (
                f"pool rule: a {spec.d}-D pool needs an input of rank {spec.d + 1} or {spec.d + 2}"
            )
        if any(call.is_active(i) for i in range(1, len(call.args))):
            return "pool rule: only the input can be active"
        try:
            if spec.adaptive:
                out = _ints(call.args[1], spec.d)
            else:
                out = _window(call.args, spec.d, spec.max)[0]
        except (TypeError, ValueError):
            return "pool rule needs int pooling parameters"
        if len(out) != spec.d:
            return "pool rule: a pooling parameter has the wrong length"
        return None

    def fwd_jvp(self, call: Call):
        spec = _SPECS[call.op]
        x = call.args[0]
        active = call.is_active(0)
        tx = call.tangents[0] if active else None
        unbatched = x.dim() == spec.d + 1
        # batched, and 1-D pools as 2-D ones of the [N, C, 1, W] view
        xb = x.unsqueeze(0) if unbatched else x
        tb = None if tx is None else (tx.unsqueeze(1) if unbatched else tx)
        if spec.d == 1:
            xb = xb.unsqueeze(-2)
            tb = None if tb is None else tb.unsqueeze(-2)
        pool, pool_bwd = _functions(call, spec)
        idx = None
        if spec.max:
            y, idx, ydot = max_pool_fwd_jvp_ref(xb, tb, pool)
        else:
            y, ydot = linear_pool_fwd_jvp_ref(xb, tb, pool)
        res = (spec, pool_bwd, tuple(xb.shape), tuple(y.shape), idx, tuple(x.shape), active)
        res = (*res, len(call.args))
        if spec.d == 1:
            y, idx = y.squeeze(-2), None if idx is None else idx.squeeze(-2)
            ydot = None if ydot is None else ydot.squeeze(-2)
        if unbatched:
            y, idx = y.squeeze(0), None if idx is None else idx.squeeze(0)
            ydot = None if ydot is None else ydot.squeeze(1)
        if spec.tuple_out:
            return (y, idx), (ydot, None), res
        return y, ydot, res

    def bwd_jvp(self, res, g, gdot):
        spec, pool_bwd, xb_shape, yb_shape, idx, x_shape, active, nargs = res
        if spec.tuple_out:
            g = None if g is None else g[0]
            gdot = None if gdot is None else gdot[0]
        rest = nones(nargs - 1)
        s, n_g = stack_k(g, gdot)
        if not active or s is None:
            return (None, *rest), (None, *rest)
        m = s.shape[0]
        s = s.reshape(m, *yb_shape)
        if spec.max:
            sx = max_pool_bwd_ref(s, xb_shape, idx, pool_bwd)
        else:
            sx = linear_pool_bwd_ref(s, xb_shape, pool_bwd)
        gx, gdx = unstack_k(sx.reshape(m, *x_shape), n_g)
        return (gx, *rest), (gdx, *rest)


RULES = [Pool()]
