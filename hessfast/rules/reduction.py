"""Linear reductions: ``sum`` and ``mean``, over all dims or a dim list, with ``keepdim``/``dtype``.

``y = c Σ_{d ∈ D} x`` over the reduced dims ``D`` (``c = 1`` for ``sum``, ``1/N`` for ``mean`` with
``N = Π_{d ∈ D} x.shape[d]``). ``dim=None`` or ``[]`` reduces every dim (aten's convention), as do
the ``.default`` overloads; a 0-d input has no dims to reduce and passes through.

- ``ẏ``: the same reduction applied to the ``[K, *x.shape]`` tangent over ``D`` shifted by one;
- ``ḡ_x = c ḡ`` with the reduced dims re-inserted (when not ``keepdim``) and expanded back to
  ``x.shape`` (a stride-0 view); ``ġ_x`` likewise with the K axis kept leading. No second-order
  term. Cotangents are cast back to ``x``'s dtype (the ``dtype`` argument may differ).
"""

from __future__ import annotations

import torch

from .base import Call, Rule, invoke, nones

Tensor = torch.Tensor
aten = torch.ops.aten


def _dims(n: int, dim) -> tuple[int, ...]:
    """The reduced dims, wrapped and sorted; every dim when ``dim`` is ``None`` or empty."""
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return tuple(range(n))
    if isinstance(dim, int):
        dim = [dim]
    if n == 0:
        return ()
    return tuple(sorted({d % n for d in dim}))


class Reduce(Rule):
    ops = (aten.sum.default, aten.sum.dim_IntList, aten.mean.default, aten.mean.dim)
    name = "sum/mean"

    def fwd_jvp(self, call: Call):
        x = call.args[0]
        if call.op in (aten.sum.default, aten.mean.default):
            dim, keepdim, dtype = None, False, call.args[1]
        else:
            _, dim, keepdim, dtype = call.args
        mean = call.op in (aten.mean.default, aten.mean.dim)
        dims = _dims(x.dim(), dim)
        y = invoke(call.op, call.args)
        t = call.tangents[0] if call.k and call.active[0] else None
        ydot = None
        if t is not None:
            if dims:
                bd = tuple(d + 1 for d in dims)
                ydot = (t.mean if mean else t.sum)(dim=bd, keepdim=keepdim, dtype=dtype)
            else:
                ydot = t
            if ydot.dtype != y.dtype:
                ydot = ydot.to(y.dtype)
        n = 1
        for d in dims:
            n *= x.shape[d]
        scale = (1.0 / n if n else float("nan")) if mean else 1.0
        res = (tuple(x.shape), x.dtype, dims, keepdim, scale, len(call.args))
        return y, ydot, res

    def bwd_jvp(self, res, g, gdot):
        shape, dtype, dims, keepdim, scale, nargs = res

        def back(c, lead):
            if c is None:
                return None
            if c.dtype != dtype:
                c = c.to(dtype)
            if scale != 1.0:
                c = c * scale
            if not keepdim:
                for d in dims:
                    c = c.unsqueeze(d + lead)
            return c.expand((*c.shape[:lead], *shape))

        return (back(g, 0), *nones(nargs - 1)), (back(gdot, 1), *nones(nargs - 1))


RULES = [Reduce()]
