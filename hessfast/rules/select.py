"""Selection by value-independent masks and indices: ``where`` and advanced indexing
(``index.Tensor``).

Both are linear in their differentiated operands for a fixed (non-differentiated) condition or
index, so there is no second-order term and ``[ḡ; ġ]`` go through the adjoint stacked
(``[M, …]``, :func:`~hessfast.rules.base.stack_k`).

``y = where(c, a, b)`` (``where.self``; ``where.ScalarOther`` / ``where.ScalarSelf`` with a python
number for one branch), all three broadcast together:

- ``ẏ = where(c, ȧ, ḃ)`` (a missing or scalar branch contributes zero), tangents lifted so that
  ``c`` broadcasts against ``[K, *y.shape]``;
- ``ḡ_a = sum_to(where(c, ḡ, 0), a.shape)``, ``ḡ_b = sum_to(where(c, 0, ḡ), b.shape)`` (the adjoint of
  broadcasting), ``ġ`` the same.

``y = x[i₁, …, iₙ]`` (``index.Tensor``, integer index tensors, ``None`` for a full slice):

- ``ẏ = ẋ[:, i₁, …, iₙ]``: the same call with a leading full slice for K;
- ``ḡ_x = index_put(0, (i₁, …, iₙ), ḡ, accumulate=True)`` (a scatter-add, repeated indices
  summing: autograd's formula), ``ġ`` stacked with it in one call with a leading full slice.

Declined (the ``torch.func`` fallback): boolean or byte masks in ``index`` (a data-dependent
shape), index tensors separated by a full slice (numpy's rule then moves the indexed dims to the
front, where the leading K slice would not stay first), non-floating values.
"""

from __future__ import annotations

from numbers import Number

import torch

from .base import Call, Rule, invoke, lift, nones, stack_k, sum_to, unstack_k

Tensor = torch.Tensor
aten = torch.ops.aten


class Where(Rule):
    """``where.self(c, a, b)``, ``where.ScalarOther(c, a, s)``, ``where.ScalarSelf(c, s, b)``."""

    ops = (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf)
    name = "where"

    def declines(self, call: Call) -> str | None:
        c, a, b = call.args
        if not isinstance(c, Tensor) or c.dtype != torch.bool:
            return "where rule needs a boolean condition"
        for v in (a, b):
            if isinstance(v, Tensor):
                if not v.is_floating_point():
                    return "where rule handles floating-point branches only"
            elif not isinstance(v, Number) or isinstance(v, complex):
                return "where rule: a branch is neither a tensor nor a real number"
        if call.is_active(0):
            return "where rule: the condition cannot be active"
        return None

    def fwd_jvp(self, call: Call):
        c, a, b = call.args
        y = invoke(call.op, call.args)
        act = (
            isinstance(a, Tensor) and call.is_active(1),
            isinstance(b, Tensor) and call.is_active(2),
        )
        ta = call.tangents[1] if act[0] else None
        tb = call.tangents[2] if act[1] else None
        ydot = None
        if ta is not None or tb is not None:
            k = (ta if ta is not None else tb).shape[0]
            nd = y.dim()
            zero = torch.zeros((), dtype=y.dtype, device=y.device)
            ta = zero if ta is None else lift(ta.to(y.dtype), nd)
            tb = zero if tb is None else lift(tb.to(y.dtype), nd)
            ydot = torch.where(c, ta, tb)
            if tuple(ydot.shape) != (k, *y.shape):
                ydot = ydot.expand(k, *y.shape)
        shapes = tuple(tuple(v.shape) if isinstance(v, Tensor) else None for v in (a, b))
        dtypes = tuple(v.dtype if isinstance(v, Tensor) else None for v in (a, b))
        return y, ydot, (c, act, shapes, dtypes)

    def bwd_jvp(self, res, g, gdot):
        c, act, shapes, dtypes = res
        s, n_g = stack_k(g, gdot)
        outs = [(None, None), (None, None)]
        if s is not None:
            zero = torch.zeros((), dtype=s.dtype, device=s.device)
            for i in range(2):
                if not act[i]:
                    continue
                part = torch.where(c, s, zero) if i == 0 else torch.where(c, zero, s)
                part = sum_to(part, shapes[i], True)
                if part.dtype != dtypes[i]:
                    part = part.to(dtypes[i])
                outs[i] = unstack_k(part, n_g)
        return (None, outs[0][0], outs[1][0]), (None, outs[0][1], outs[1][1])


class Index(Rule):
    """``index.Tensor(x, indices)`` with integer index tensors (``None`` = full slice)."""

    ops = (aten.index.Tensor,)
    name = "index"

    def declines(self, call: Call) -> str | None:
        x, indices = call.args
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return "index rule needs a floating-point input"
        if call.is_active(1):
            return "index rule: indices cannot be active"
        pos = []
        for i, t in enumerate(indices):
            if t is None:
                continue
            if not isinstance(t, Tensor) or t.dtype not in (torch.int64, torch.int32):
                return "index rule handles integer index tensors only (no boolean masks)"
            pos.append(i)
        if not pos:
            return "index rule: no index tensor"
        if pos != list(range(pos[0], pos[-1] + 1)):
            return "index rule: index tensors separated by a full slice"
        return None

    def fwd_jvp(self, call: Call):
        x, indices = call.args
        indices = list(indices)
        y = aten.index.Tensor(x, indices)
        tx = call.tangents[0] if call.is_active(0) else None
        ydot = None if tx is None else aten.index.Tensor(tx, [None, *indices])
        return y, ydot, (indices, tuple(x.shape), call.is_active(0))

    def bwd_jvp(self, res, g, gdot):
        indices, shape, active = res
        s, n_g = stack_k(g, gdot)
        if not active or s is None:
            return nones(2), nones(2)
        zeros = s.new_zeros((s.shape[0], *shape))
        sx = aten.index_put(zeros, [None, *indices], s, True)
        gx, gdx = unstack_k(sx, n_g)
        return (gx, None), (gdx, None)


RULES = [Where(), Index()]
