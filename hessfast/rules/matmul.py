"""Matrix products: ``mm``, ``bmm`` and ``matmul`` with broadcasting batch dims (``y = a b``).

Index conventions: ``a [*Ba, M, I]``, ``b [*Bb, I, O]``, ``y [*B, M, O]`` with ``B`` the broadcast of
``Ba`` and ``Bb``; tangents carry a leading K. ``ᵀ`` swaps the last two axes (``mT``). A tangent is
:func:`lift`-ed to ``[K, 1, …, 1, *a.shape]`` so that ``torch.matmul`` broadcasts it against the
other (K-free) operand: the K tangents go through one batched GEMM, no Python loop over K.

Forward (bilinear): ``ẏ = ȧ b + a ḃ``.

Backward: ``ḡ_a = sum_to(ḡ bᵀ)``, ``ġ_a = sum_to(ġ bᵀ + ḡ ḃᵀ)``;
``ḡ_b = sum_to(aᵀ ḡ)``, ``ġ_b = sum_to(aᵀ ġ + ȧᵀ ḡ)``. :func:`sum_to` reduces the broadcast batch
dims back to the operand's shape. The second-order terms (``ḡ ḃᵀ``, ``ȧᵀ ḡ``) exist only when both
operands are active and ``ḡ`` is present (hvp mode).

Declined: ``matmul`` with a 1-D operand (vector products; the fallback handles them).
"""

from __future__ import annotations

import torch

from .base import Call, Rule, add, lift, sum_to

Tensor = torch.Tensor
aten = torch.ops.aten


class MatMul(Rule):
    ops = (aten.mm.default, aten.bmm.default, aten.matmul.default)
    name = "matmul"

    def declines(self, call: Call) -> str | None:
        a, b = call.args
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return "matmul of non-tensors"
        if a.dim() < 2 or b.dim() < 2:
            return "matmul with a 1-D operand"
        return None

    def fwd_jvp(self, call: Call):
        a, b = call.args
        y = call.op(a, b)
        act_a, act_b = bool(call.active[0]), bool(call.active[1])
        ta = call.tangents[0] if call.k and act_a else None
        tb = call.tangents[1] if call.k and act_b else None
        nd = y.dim()
        ydot = None
        if ta is not None:
            ydot = torch.matmul(lift(ta, nd), b)
        if tb is not None:
            ydot = add(ydot, torch.matmul(a, lift(tb, nd)))
        res = (
            a if act_b else None,
            b if act_a else None,
            ta if act_b else None,  # second-order term of ġ_b
            tb if act_a else None,  # second-order term of ġ_a
            act_a,
            act_b,
            tuple(a.shape),
            tuple(b.shape),
            nd,
        )
        return y, ydot, res

    def bwd_jvp(self, res, g, gdot):
        a, b, ta, tb, act_a, act_b, sa, sb, nd = res
        ga = gb = gda = gdb = None
        if act_a:
            bt = b.mT
            if g is not None:
                ga = sum_to(torch.matmul(g, bt), sa, False)
            gd = torch.matmul(gdot, bt) if gdot is not None else None
            if g is not None and tb is not None:
                gd = add(gd, torch.matmul(g, lift(tb, nd).mT))
            gda = sum_to(gd, sa, True)
        if act_b:
            at = a.mT
            if g is not None:
                gb = sum_to(torch.matmul(at, g), sb, False)
            gd = torch.matmul(at, gdot) if gdot is not None else None
            if g is not None and ta is not None:
                gd = add(gd, torch.matmul(lift(ta, nd).mT, g))
            gdb = sum_to(gd, sb, True)
        return (ga, gb), (gda, gdb)


RULES = [MatMul()]
