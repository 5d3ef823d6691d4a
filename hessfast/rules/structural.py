"""More linear structural ops of one tensor: ``pad`` / ``constant_pad_nd``, ``roll``, ``chunk``,
``type_as`` (the views, slices and casts of :mod:`hessfast.rules.shape` live there).

Each is ``y = L x (+ c)`` with ``L`` independent of ``x``'s values, so ``ẏ = L ẋ``,
``ḡ_x = Lᵀ ḡ``, ``ġ_x = Lᵀ ġ`` and there is no second-order term; ``[ḡ; ġ]`` are stacked
(``[M, …]``, :func:`~hessfast.rules.base.stack_k`) and go through ``Lᵀ`` in one call.

- ``constant_pad_nd(x, p, v)`` and ``pad(x, p, "constant", v)``: ``L`` pads with zeros (``v`` is the
  affine offset), ``Lᵀ = constant_pad_nd(·, −p)`` (a negative pad crops, so cropping pads are
  handled by the same rule); the leading K/M axis is untouched (pads address trailing dims);
- ``pad(x, p, "reflect" | "replicate")``: ``L`` is the op on the tangent with its leading dims
  folded into the batch (``[K·…, C, *S]``); ``Lᵀ`` is autograd's kernel
  (``reflection_pad{1,2,3}d_backward`` / ``replication_pad{1,2,3}d_backward``) on ``[ḡ; ġ]`` folded
  the same way, with an uninitialised stand-in for the input (only its size is read);
- ``roll(x, s, dims)``: ``Lᵀ = roll(·, −s, dims)`` (dims shifted past the K axis); ``dims=[]``
  rolls the flattened tensor, per K slice;
- ``chunk(x, n, d)``: as ``split`` (:class:`hessfast.rules.shape.Split`);
- ``type_as(x, other)``: a cast to ``other``'s dtype (``other`` has no cotangent).

Declined (the ``torch.func`` fallback): ``pad`` with ``"circular"`` mode or a pad length the mode's
kernels do not take, non-floating inputs, ``roll`` with more shifts than dims.
"""

from __future__ import annotations

import torch

from .base import Call, Rule, invoke, nones, stack_k, unstack_k
from .shape import Split

Tensor = torch.Tensor
aten = torch.ops.aten

_PAD_BWD = {
    ("reflect", 1): aten.reflection_pad1d_backward,
    ("reflect", 2): aten.reflection_pad2d_backward,
    ("reflect", 3): aten.reflection_pad3d_backward,
    ("replicate", 1): aten.replication_pad1d_backward,
    ("replicate", 2): aten.replication_pad2d_backward,
    ("replicate", 3): aten.replication_pad3d_backward,
}


def _fold_pad(t: Tensor, x_shape: tuple, d: int) -> Tensor:
    """``[M, *x.shape] -> [M·…, C, *S]``: every dim before the ``d + 1`` last ones in the batch."""
    return t.reshape(-1, *x_shape[len(x_shape) - d - 1 :])


class Pad(Rule):
    """``constant_pad_nd(x, pad, value)`` and ``pad(x, pad, mode, value)``."""

    ops = (aten.constant_pad_nd.default, aten.pad.default)
    name = "pad"

    @staticmethod
    def _mode(call: Call) -> str:
        return "constant" if call.op is aten.constant_pad_nd.default else call.args[2]

    def declines(self, call: Call) -> str | None:
        x, pad = call.args[:2]
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return "pad rule needs a floating-point input"
        if any(call.is_active(i) for i in range(1, len(call.args))):
            return "pad rule: only the input can be active"
        if not isinstance(pad, (list, tuple)) or len(pad) % 2 or len(pad) // 2 > x.dim():
            return "pad rule: the pad list must hold two entries per padded dim"
        mode = self._mode(call)
        if mode == "constant":
            return None
        d = len(pad) // 2
        if (mode, d) not in _PAD_BWD:
            return f"pad rule: mode {mode!r} with {d} padded dims is not handled"
        if x.dim() not in (d + 1, d + 2):
            return f"pad rule: {mode} padding of {d} dims needs an input of rank {d + 1} or {d + 2}"
        return None

    def fwd_jvp(self, call: Call):
        x, pad = call.args[:2]
        pad = [int(p) for p in pad]
        mode = self._mode(call)
        y = invoke(call.op, call.args)
        tx = call.tangents[0] if call.is_active(0) else None
        ydot = None
        if tx is not None:
            if mode == "constant":
                ydot = aten.constant_pad_nd(tx, pad, 0)
            else:
                d = len(pad) // 2
                ydot = aten.pad(_fold_pad(tx, tuple(x.shape), d), pad, mode)
                ydot = ydot.reshape(tx.shape[0], *y.shape)
        res = (mode, pad, tuple(x.shape), tuple(y.shape), call.is_active(0), len(call.args))
        return y, ydot, res

    def bwd_jvp(self, res, g, gdot):
        mode, pad, x_shape, y_shape, active, nargs = res
        rest = nones(nargs - 1)
        s, n_g = stack_k(g, gdot)
        if not active or s is None:
            return (None, *rest), (None, *rest)
        m = s.shape[0]
        if mode == "constant":
            sx = aten.constant_pad_nd(s, [-p for p in pad], 0)
        else:
            d = len(pad) // 2
            sf = _fold_pad(s, y_shape, d)
            stand_in = sf.new_empty((sf.shape[0], *x_shape[len(x_shape) - d - 1 :]))
            sx = _PAD_BWD[(mode, d)](sf, stand_in, pad).reshape(m, *x_shape)
        gx, gdx = unstack_k(sx, n_g)
        return (gx, *rest), (gdx, *rest)


class Roll(Rule):
    """``roll(x, shifts, dims)``."""

    ops = (aten.roll.default,)
    name = "roll"

    def declines(self, call: Call) -> str | None:
        x, shifts, dims = call.args
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return "roll rule needs a floating-point input"
        if len(dims) not in (0, len(shifts)) or (not dims and len(shifts) != 1):
            return "roll rule: shifts and dims do not match"
        return None

    @staticmethod
    def _roll(t: Tensor, shifts, dims, shape: tuple) -> Tensor:
        """``roll`` of a ``[M, *shape]`` tensor per leading slice."""
        if not dims:
            m = t.shape[0]
            return t.reshape(m, -1).roll(list(shifts), [1]).reshape(m, *shape)
        n = len(shape)
        return t.roll(list(shifts), [d % max(n, 1) + 1 for d in dims])

    def fwd_jvp(self, call: Call):
        x, shifts, dims = call.args
        y = aten.roll(x, shifts, dims)
        tx = call.tangents[0] if call.is_active(0) else None
        ydot = None if tx is None else self._roll(tx, shifts, dims, tuple(x.shape))
        return y, ydot, (shifts, dims, tuple(x.shape), call.is_active(0))

    def bwd_jvp(self, res, g, gdot):
        shifts, dims, shape, active = res
        s, n_g = stack_k(g, gdot)
        if not active or s is None:
            return nones(3), nones(3)
        gx, gdx = unstack_k(self._roll(s, [-int(v) for v in shifts], dims, shape), n_g)
        return (gx, None, None), (gdx, None, None)


class Chunk(Split):
    """``chunk(x, chunks, dim)``: a split (see :class:`hessfast.rules.shape.Split`)."""

    ops = (aten.chunk.default,)
    name = "chunk"


class TypeAs(Rule):
    """``type_as(x, other) = x.to(other.dtype)``: tangents cast forward, cotangents back."""

    ops = (aten.type_as.default,)
    name = "type_as"

    def declines(self, call: Call) -> str | None:
        x, other = call.args
        if not (isinstance(x, Tensor) and isinstance(other, Tensor)):
            return "type_as rule needs tensors"
        if not (x.is_floating_point() and other.is_floating_point()):
            return "type_as rule handles casts between floating-point dtypes only"
        if x.device != other.device:
            return "type_as rule: a device change"
        return None

    def fwd_jvp(self, call: Call):
        x, other = call.args
        y = x.type_as(other)
        tx = call.tangents[0] if call.is_active(0) else None
        ydot = None if tx is None else tx.to(y.dtype)
        return y, ydot, (x.dtype, call.is_active(0))

    def bwd_jvp(self, res, g, gdot):
        dtype, active = res
        if not active:
            return nones(2), nones(2)
        gx = None if g is None else g.to(dtype)
        gdx = None if gdot is None else gdot.to(dtype)
        return (gx, None), (gdx, None)


RULES = [Pad(), Roll(), Chunk(), TypeAs()]
