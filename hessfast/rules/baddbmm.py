"""Batched matrix product with an added input: ``baddbmm(s, a, b, beta=β, alpha=α)``.

Index conventions: ``s`` broadcastable to ``[B, M, O]``, ``a [B, M, I]``, ``b [B, I, O]``,
``y = β s + α a b``; tangents carry a leading K (``[K, B, M, I] @ [B, I, O]`` broadcasts: the K
tangents go through one batched GEMM). ``ᵀ`` swaps the last two axes.

- forward tangent: ``ẏ = β ṡ + α (ȧ b + a ḃ)``;
- cotangents: ``ḡ_s = sum_to(β ḡ, s.shape)``, ``ḡ_a = α ḡ bᵀ``, ``ḡ_b = α aᵀ ḡ``, each on
  ``[ḡ; ġ]`` stacked (one GEMM per operand for both);
- second-order terms (hvp mode, both operands active): ``ġ_a += α ḡ ḃᵀ``, ``ġ_b += α ȧᵀ ḡ``.

``β = 0``: torch ignores ``s`` (even NaN), so ``s`` gets no cotangent and contributes no tangent.

Declined: non-floating operands, an active ``β`` or ``α``, operands that are not 3-D.
"""

from __future__ import annotations

import torch

from .base import Call, Rule, add, invoke, lift, stack_k, sum_to, unstack_k

Tensor = torch.Tensor
aten = torch.ops.aten


class BAddBmm(Rule):
    ops = (aten.baddbmm.default,)
    name = "baddbmm"

    def declines(self, call: Call) -> str | None:
        s, a, b = call.args[:3]
        if not all(isinstance(t, Tensor) and t.is_floating_point() for t in (s, a, b)):
            return "baddbmm rule needs floating-point tensors"
        if a.dim() != 3 or b.dim() != 3:
            return "baddbmm rule needs 3-D batch operands"
        if call.is_active(3) or call.is_active(4):
            return "baddbmm rule: beta and alpha cannot be active"
        return None

    def fwd_jvp(self, call: Call):
        s, a, b, beta, alpha = call.args
        y = invoke(call.op, call.args)
        act_s = call.is_active(0) and beta != 0
        act_a, act_b = call.is_active(1), call.is_active(2)
        ts = call.tangents[0] if act_s else None
        ta = call.tangents[1] if act_a else None
        tb = call.tangents[2] if act_b else None
        ydot = None
        if ta is not None:
            ydot = torch.matmul(ta, b)
        if tb is not None:
            ydot = add(ydot, torch.matmul(a, tb))
        if ydot is not None and alpha != 1:
            ydot = ydot * alpha
        if ts is not None:
            k = ts.shape[0]
            t = lift(ts, 3)
            ydot = add(ydot, t * beta if beta != 1 else t)
            if tuple(ydot.shape) != (k, *y.shape):
                ydot = ydot.expand(k, *y.shape)
        res = (
            a if act_b else None,
            b if act_a else None,
            ta if act_b else None,
            tb if act_a else None,
            (act_s, act_a, act_b),
            tuple(s.shape),
            beta,
            alpha,
        )
        return y, ydot, res

    def bwd_jvp(self, res, g, gdot):
        a, b, ta, tb, (act_s, act_a, act_b), s_shape, beta, alpha = res
        st, n_g = stack_k(g, gdot)
        out = [(None, None)] * 3
        if st is None:
            return (None,) * 5, (None,) * 5
        if alpha != 1:
            st_a = st * alpha
            g_a = None if g is None else g * alpha
        else:
            st_a, g_a = st, g
        if act_s:
            gs = sum_to(st * beta if beta != 1 else st, s_shape, True)
            out[0] = unstack_k(gs, n_g)
        if act_a:
            ga, gda = unstack_k(torch.matmul(st_a, b.mT), n_g)
            if g_a is not None and tb is not None:
                gda = add(gda, torch.matmul(g_a, tb.mT))
            out[1] = (ga, gda)
        if act_b:
            gb, gdb = unstack_k(torch.matmul(a.mT, st_a), n_g)
            if g_a is not None and ta is not None:
                gdb = add(gdb, torch.matmul(ta.mT, g_a))
            out[2] = (gb, gdb)
        return (*(o[0] for o in out), None, None), (*(o[1] for o in out), None, None)


RULES = [BAddBmm()]
