"""Linear structural ops: views, reshapes, permutations, broadcasting, slicing, concatenation, casts.

Each op is a linear map ``y = L x`` that does not depend on ``x``'s values, so

- ``ẏ = L ẋ``, applied to the ``[K, *x.shape]`` tangent with the K axis leading: every dimension
  index of the op is wrapped against the primal rank and then shifted by one;
- ``ḡ_x = Lᵀ ḡ``, ``ġ_x = Lᵀ ġ`` (the same adjoint, unbatched and batched); there is no
  second-order term.

Families (``lead`` is 1 for a K-batched tensor, 0 otherwise):

- reshape-like (``view``, ``reshape``, ``_unsafe_view``, ``unsqueeze``, ``squeeze``, ``flatten``,
  ``unflatten``): row-major order is kept, so ``L`` is ``reshape`` to ``[K, *y.shape]`` and ``Lᵀ``
  is ``reshape`` back to ``x.shape``. ``reshape`` rather than ``view``, since tangents and
  cotangents may be non-contiguous or expanded;
- ``permute(p)``: ``Lᵀ`` is the inverse permutation; ``transpose``/``t``: self-adjoint;
- ``expand``: ``L`` lifts and expands, ``Lᵀ = sum_to``;
- ``slice(d, start, end, step)``/``select(d, i)``: ``Lᵀ`` scatters into zeros
  (``slice_backward``/``select_backward``);
- ``cat(xs, d)``: inactive members contribute (expanded, unallocated) zeros to ``ẏ``; ``Lᵀ`` splits
  along ``d`` and returns ``None`` for inactive members. ``stack``: ``Lᵀ`` selects;
- identities (``contiguous``, ``clone``, ``alias``, ``dropout`` with ``train=False`` or ``p=0``):
  tangents and cotangents pass through unchanged (not copied: rules never mutate their inputs);
- casts (``_to_copy``, ``to.dtype``, ``to.dtype_layout``): tangents are cast to ``y``'s dtype,
  cotangents back to ``x``'s.

Declined: device or layout changes, active dropout, ``cat`` of tensors of unequal rank (the legacy
empty 1-D members).
"""

from __future__ import annotations

import sys

import torch

from .base import Call, Rule, invoke, lift, nones, sum_to

Tensor = torch.Tensor
aten = torch.ops.aten


def _wrap(d: int, n: int) -> int:
    """Wrap a possibly negative dim against rank ``n`` (a 0-d tensor accepts dims 0 and -1)."""
    return d % max(n, 1)


class _Unary(Rule):
    """A linear op of its first argument; subclasses give ``ctx``, ``tangent`` and ``adjoint``."""

    def context(self, call: Call, y: Tensor):
        return None

    def tangent(self, ctx, t: Tensor) -> Tensor:
        raise NotImplementedError

    def adjoint(self, ctx, g: Tensor, lead: int) -> Tensor:
        raise NotImplementedError

    def primal(self, call: Call):
        return invoke(call.op, call.args)

    def fwd_jvp(self, call: Call):
        y = self.primal(call)
        ctx = self.context(call, y)
        t = call.tangents[0] if call.k and call.active[0] else None
        ydot = self.tangent(ctx, t) if t is not None else None
        return y, ydot, (ctx, len(call.args))

    def bwd_jvp(self, res, g, gdot):
        ctx, n = res
        ga = self.adjoint(ctx, g, 0) if g is not None else None
        gda = self.adjoint(ctx, gdot, 1) if gdot is not None else None
        return (ga, *nones(n - 1)), (gda, *nones(n - 1))


class ReshapeLike(_Unary):
    ops = (
        aten.view.default,
        aten.reshape.default,
        aten._unsafe_view.default,
        aten.unsqueeze.default,
        aten.squeeze.default,
        aten.squeeze.dim,
        aten.squeeze.dims,
        aten.flatten.using_ints,
        aten.unflatten.int,
    )
    name = "reshape"

    def primal(self, call: Call):
        if call.op in (aten.view.default, aten._unsafe_view.default):
            # A rule's output may be laid out otherwise than torch's kernel for the op that the
            # graph recorded (SDPA: [B, H, T, D] contiguous, not [B, T, H, D]), so a view the
            # graph took may not exist here; the values of reshape are the same, and the engine
            # never writes through an alias (the program is functionalised).
            return call.args[0].reshape(call.args[1])
        return super().primal(call)

    def context(self, call, y):
        return tuple(call.args[0].shape), tuple(y.shape)

    def tangent(self, ctx, t):
        return t.reshape(t.shape[0], *ctx[1])

    def adjoint(self, ctx, g, lead):
        return g.reshape((*g.shape[:lead], *ctx[0]))


class Permute(_Unary):
    ops = (aten.permute.default,)
    name = "permute"

    def context(self, call, y):
        n = call.args[0].dim()
        perm = [_wrap(d, n) for d in call.args[1]]
        inv = [0] * len(perm)
        for i, p in enumerate(perm):
            inv[p] = i
        return perm, inv

    def tangent(self, ctx, t):
        return t.permute(0, *[p + 1 for p in ctx[0]])

    def adjoint(self, ctx, g, lead):
        return g.permute(*range(lead), *[p + lead for p in ctx[1]])


class Transpose(_Unary):
    """``transpose.int(x, d0, d1)`` and ``t(x)`` (``transpose(0, 1)`` for rank 2, else identity)."""

    ops = (aten.transpose.int, aten.t.default)
    name = "transpose"

    def context(self, call, y):
        x = call.args[0]
        n = x.dim()
        if call.op is aten.t.default:
            return (0, 1) if n == 2 else None
        if n == 0:
            return None
        return _wrap(call.args[1], n), _wrap(call.args[2], n)

    def tangent(self, ctx, t):
        return t if ctx is None else t.transpose(ctx[0] + 1, ctx[1] + 1)

    def adjoint(self, ctx, g, lead):
        return g if ctx is None else g.transpose(ctx[0] + lead, ctx[1] + lead)


class Expand(_Unary):
    ops = (aten.expand.default,)
    name = "expand"

    def context(self, call, y):
        return tuple(call.args[0].shape), tuple(y.shape)

    def tangent(self, ctx, t):
        return lift(t, len(ctx[1])).expand(t.shape[0], *ctx[1])

    def adjoint(self, ctx, g, lead):
        return sum_to(g, ctx[0], bool(lead))


class Slice(_Unary):
    """``slice.Tensor(x, d, start, end, step)``; adjoint ``slice_backward`` (zeros + assignment)."""

    ops = (aten.slice.Tensor,)
    name = "slice"

    def context(self, call, y):
        x, dim, start, end, step = call.args
        start = 0 if start is None else start
        end = sys.maxsize if end is None else end
        return tuple(x.shape), _wrap(dim, x.dim()), start, end, step

    def tangent(self, ctx, t):
        _, d, start, end, step = ctx
        return aten.slice.Tensor(t, d + 1, start, end, step)

    def adjoint(self, ctx, g, lead):
        shape, d, start, end, step = ctx
        return aten.slice_backward(g, [*g.shape[:lead], *shape], d + lead, start, end, step)


class Select(_Unary):
    """``select.int(x, d, i)``; adjoint ``select_backward`` (zeros + assignment)."""

    ops = (aten.select.int,)
    name = "select"

    def context(self, call, y):
        x, dim, index = call.args
        return tuple(x.shape), _wrap(dim, x.dim()), index

    def tangent(self, ctx, t):
        return t.select(ctx[1] + 1, ctx[2])

    def adjoint(self, ctx, g, lead):
        shape, d, index = ctx
        return aten.select_backward(g, [*g.shape[:lead], *shape], d + lead, index)


class Identity(_Unary):
    """Value-preserving ops: ``contiguous``, ``clone``, ``alias``, ``dropout`` in eval mode."""

    ops = (aten.contiguous.default, aten.clone.default, aten.alias.default, aten.dropout.default)
    name = "identity"

    def declines(self, call):
        if call.op is aten.dropout.default and call.args[2] and call.args[1] > 0:
            return "dropout in training mode"
        return None

    def tangent(self, ctx, t):
        return t

    def adjoint(self, ctx, g, lead):
        return g


def _device_changes(dev, x: Tensor) -> bool:
    if dev is None:
        return False
    dev = torch.device(dev)
    if dev.type != x.device.type:
        return True
    return dev.index is not None and x.device.index is not None and dev.index != x.device.index


class Cast(_Unary):
    """dtype casts ``_to_copy``/``to.dtype``/``to.dtype_layout``; tangents follow ``y``'s dtype."""

    ops = (aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout)
    name = "cast"

    def declines(self, call):
        kw = {a.name: v for a, v in zip(call.op._schema.arguments, call.args)}
        x = call.args[0]
        if _device_changes(kw.get("device"), x):
            return "device change"
        if kw.get("layout") not in (None, torch.strided):
            return "layout change"
        return None

    def context(self, call, y):
        return call.args[0].dtype, y.dtype

    def tangent(self, ctx, t):
        return t if t.dtype == ctx[1] else t.to(ctx[1])

    def adjoint(self, ctx, g, lead):
        return g if g.dtype == ctx[0] else g.to(ctx[0])


def _list_active(call: Call) -> list[bool]:
    act = call.active[0]
    n = len(call.args[0])
    return [bool(a) for a in act] if isinstance(act, list) else [bool(act)] * n


def _list_tangents(call: Call, xs, y: Tensor, dtype) -> list | None:
    """Members' tangents, zeros (expanded, unallocated) for inactive ones; ``None`` if all zero."""
    ts = call.tangents[0] if call.k else None
    if ts is None:
        return None
    act = _list_active(call)
    ts = [t if a else None for t, a in zip(ts, act)]
    if all(t is None for t in ts):
        return None
    zero = y.new_zeros((), dtype=dtype)
    return [zero.expand(call.k, *x.shape) if t is None else t for x, t in zip(xs, ts)]


class Cat(Rule):
    """``cat(xs, d)``: ``ẏ = cat(ẋs, d + 1)``; adjoint splits along ``d``."""

    ops = (aten.cat.default,)
    name = "cat"

    def declines(self, call):
        xs = call.args[0]
        if len({x.dim() for x in xs}) != 1 or xs[0].dim() == 0:
            return "cat of tensors of unequal rank (legacy empty members)"
        return None

    def fwd_jvp(self, call: Call):
        xs, dim = call.args
        y = torch.cat(xs, dim)
        d = _wrap(dim, y.dim())
        ts = _list_tangents(call, xs, y, y.dtype)
        ydot = None
        if ts is not None:
            ydot = torch.cat(ts, d + 1)
            if ydot.dtype != y.dtype:
                ydot = ydot.to(y.dtype)
        act = _list_active(call)
        res = (d, [x.shape[d] for x in xs], [x.dtype for x in xs], act)
        return y, ydot, res

    def bwd_jvp(self, res, g, gdot):
        d, sizes, dtypes, act = res

        def split(c, lead):
            if c is None:
                return None
            parts = torch.split(c, sizes, d + lead)
            return [
                (p if p.dtype == dt else p.to(dt)) if a else None
                for p, dt, a in zip(parts, dtypes, act)
            ]

        return (split(g, 0), None), (split(gdot, 1), None)


class Stack(Rule):
    """``stack(xs, d)``: ``ẏ = stack(ẋs, d + 1)``; adjoint selects along ``d``."""

    ops = (aten.stack.default,)
    name = "stack"

    def fwd_jvp(self, call: Call):
        xs, dim = call.args
        y = torch.stack(xs, dim)
        d = _wrap(dim, y.dim())
        ts = _list_tangents(call, xs, y, y.dtype)
        ydot = None
        if ts is not None:
            ydot = torch.stack(ts, d + 1)
            if ydot.dtype != y.dtype:
                ydot = ydot.to(y.dtype)
        res = (d, [x.dtype for x in xs], _list_active(call))
        return y, ydot, res

    def bwd_jvp(self, res, g, gdot):
        d, dtypes, act = res

        def unstack(c, lead):
            if c is None:
                return None
            parts = torch.unbind(c, d + lead)
            return [
                (p if p.dtype == dt else p.to(dt)) if a else None
                for p, dt, a in zip(parts, dtypes, act)
            ]

        return (unstack(g, 0), None), (unstack(gdot, 1), None)


class Split(Rule):
    """``split``/``split_with_sizes``/``unbind`` (tuple outputs): ``ẏᵢ`` is the same split of ``ẋ``
    along ``d + 1``; the adjoint concatenates (``unbind``: stacks) the output cotangents along
    ``d``, with zeros for outputs no consumer differentiated."""

    ops = (aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int)
    name = "split"

    def fwd_jvp(self, call: Call):
        x, dim = call.args[0], call.args[-1]
        ys = invoke(call.op, call.args)
        d = _wrap(dim, x.dim())
        t = call.tangents[0] if call.k else None
        ydot = None
        if t is not None:
            ydot = invoke(call.op, (t, *call.args[1:-1], d + 1))
        unbind = call.op is aten.unbind.int
        return ys, ydot, (d, [y.shape for y in ys], x.dtype, unbind, len(call.args))

    def bwd_jvp(self, res, g, gdot):
        d, shapes, dtype, unbind, n = res

        def join(c, lead):
            if c is None or all(ci is None for ci in c):
                return None
            ref = next(ci for ci in c if ci is not None)
            parts = [
                ci if ci is not None else ref.new_zeros((*ref.shape[:lead], *shp)).to(dtype)
                for ci, shp in zip(c, shapes)
            ]
            return torch.stack(parts, d + lead) if unbind else torch.cat(parts, d + lead)

        return (join(g, 0), *nones(n - 1)), (join(gdot, 1), *nones(n - 1))


RULES = [
    ReshapeLike(),
    Permute(),
    Transpose(),
    Expand(),
    Slice(),
    Select(),
    Identity(),
    Cast(),
    Cat(),
    Stack(),
    Split(),
]
