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

A 2-D ``b`` against a batched ``a`` (a linear layer written ``h @ W.T``) is computed as autograd
does, with ``a``'s batch folded into rows, ``a₂ [R, I]``: ``ḡ_b = a₂ᵀ ḡ₂`` is one GEMM, not a
batched product followed by a reduction; the K tangents likewise (``ȧ₂ᵀ ḡ₂``, ``a₂ᵀ ġ₂``, ``a₂ ḃ``).

Layouts, as autograd's ``mm`` backward: the cotangent of a 2-D operand stored column-major (a
transposed view, e.g. ``W.T`` of a tied head) is computed transposed, ``ḡ_b = (ḡᵀ a)ᵀ`` and
``ḡ_a = (b ḡᵀ)ᵀ``, so it comes out in the operand's own layout (the transpose node above it hands
the parameter a contiguous gradient) and the GEMM reads the cotangent as its left operand: on the
CPU a GEMM whose right operand holds subnormal numbers (a saturated softmax's gradient) is an
order of magnitude slower.

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
            if _folds(a.shape, b.shape):
                k = tb.shape[0]
                ab = torch.matmul(a.reshape(-1, a.shape[-1]), tb)  # [K, R, O]
                ydot = add(ydot, ab.reshape(k, *y.shape))
            else:
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
            (_column_major(a), _column_major(b)),
        )
        return y, ydot, res

    def bwd_jvp(self, res, g, gdot):
        a, b, ta, tb, act_a, act_b, sa, sb, nd, (cm_a, cm_b) = res
        if _folds(sa, sb):
            return self._bwd_folded(res, g, gdot)
        ga = gb = gda = gdb = None
        if act_a:
            bt = b.mT
            if g is not None:
                ga = sum_to(_left_product(g, bt, cm_a), sa, False)
            gd = torch.matmul(gdot, bt) if gdot is not None else None
            if g is not None and tb is not None:
                gd = add(gd, torch.matmul(g, lift(tb, nd).mT))
            gda = sum_to(gd, sa, True)
        if act_b:
            at = a.mT
            if g is not None:
                gb = sum_to(_left_product(at, g, cm_b), sb, False)
            gd = _left_product(at, gdot, cm_b) if gdot is not None else None
            if g is not None and ta is not None:
                gd = add(gd, _left_product(lift(ta, nd).mT, g, cm_b))
            gdb = sum_to(gd, sb, True)
        return (ga, gb), (gda, gdb)

    @staticmethod
    def _bwd_folded(res, g, gdot):
        """The backward for a 2-D ``b`` and a batched ``a``, rows folded (module docstring)."""
        a, b, ta, tb, act_a, act_b, sa, sb, nd, (_, cm_b) = res
        i, o = sb
        g2 = g.reshape(-1, o) if g is not None else None
        gd2 = gdot.reshape(gdot.shape[0], -1, o) if gdot is not None else None
        ga = gb = gda = gdb = None
        if act_a:
            bt = b.mT
            if g2 is not None:
                ga = (g2 @ bt).reshape(sa)
            gd = torch.matmul(gd2, bt) if gd2 is not None else None  # [K, R, I]
            if g2 is not None and tb is not None:
                gd = add(gd, torch.matmul(g2, tb.mT))
            if gd is not None:
                gda = gd.reshape(gd.shape[0], *sa)
        if act_b:
            a2t = a.reshape(-1, i).mT
            if g2 is not None:
                gb = _left_product(a2t, g2, cm_b)
            gd = _left_product(a2t, gd2, cm_b) if gd2 is not None else None  # [K, I, O]
            if g2 is not None and ta is not None:
                gd = add(gd, _left_product(ta.reshape(ta.shape[0], -1, i).mT, g2, cm_b))
            gdb = gd
        return (ga, gb), (gda, gdb)


def _column_major(x: Tensor) -> bool:
    """A 2-D tensor stored column-major (a transposed view), as autograd's ``mm`` backward tests
    it."""
    return x.dim() == 2 and x.stride(0) == 1 and x.stride(1) == x.shape[0] and x.shape[1] > 1


def _left_product(p: Tensor, q: Tensor, transposed: bool) -> Tensor:
    """``p @ q`` (broadcasting), computed as ``(qᵀ pᵀ)ᵀ`` when ``transposed``: the result
    column-major in its last two axes, ``q`` read as the left operand."""
    if transposed:
        return torch.matmul(q.mT, p.mT).mT
    return torch.matmul(p, q)


def _folds(sa, sb) -> bool:
    """Whether ``a @ b`` is a batched ``a`` times a 2-D ``b``: rows of ``a`` fold into one GEMM."""
    return len(sb) == 2 and len(sa) > 2


RULES = [MatMul()]
