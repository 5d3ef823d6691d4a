"""Linear layers: ``aten.linear`` (``y = x Wᵀ + b``) and ``aten.addmm`` (``y = β c + α A B``).

Index conventions: ``x [..., I]``, ``W [O, I]``, ``b [O]``, ``y [..., O]``; tangents carry a leading
K. Rows ``M`` are all leading axes of ``x`` flattened.

Forward tangent (bilinear): ``ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ``. ``ẋ Wᵀ`` is one GEMM over ``K·M`` rows and
``x Ẇᵀ`` one GEMM against ``Ẇ`` laid out as ``[I, K·O]`` — K tangents, two GEMMs.

Backward: ``ḡ_x = ḡ W``, ``ḡ_W = ḡᵀ x``, ``ḡ_b = Σ_rows ḡ``; tangents of the backward
``ġ_x = ġ W + ḡ Ẇ``, ``ġ_W = ġᵀ x + ḡᵀ ẋ``, ``ġ_b = Σ_rows ġ``. The second terms (``ḡ Ẇ``,
``ḡᵀ ẋ``) are the network's second-order terms; GGN mode (``ḡ`` absent) drops them.
"""

from __future__ import annotations

import torch

from .base import Call, Rule, add, lift, sum_to

Tensor = torch.Tensor
aten = torch.ops.aten


def linear_fwd_jvp_ref(x, w, b, tx, tw, tb):
    """``y = x Wᵀ + b`` and ``ẏ = ẋ Wᵀ + x Ẇᵀ + ḃ`` (any of the tangents may be ``None``)."""
    y = torch.nn.functional.linear(x, w, b)
    ydot = None
    if tx is not None:
        ydot = tx @ w.t()
    if tw is not None:
        k, o, i = tw.shape
        xw = (x.reshape(-1, i) @ tw.reshape(k * o, i).t()).reshape(*x.shape[:-1], k, o)
        ydot = add(ydot, xw.movedim(-2, 0))
    if tb is not None:
        ydot = add(ydot, tb.reshape(tb.shape[0], *([1] * (x.dim() - 1)), -1))
    return y, ydot


def linear_bwd_jvp_ref(x, w, tx, tw, g, gdot, need_x, need_w, need_b, gbar_wb=True):
    """Cotangents ``(ḡ, ġ)`` of ``x``, ``W`` and ``b`` (see the module docstring); with
    ``gbar_wb=False`` (nobody reads the primal weight and bias cotangents) ``ḡ_W`` and ``ḡ_b``
    are ``None``."""
    i = w.shape[1]
    o = w.shape[0]
    x2 = x.reshape(-1, i)
    gx = gw = gb = gdx = gdw = gdb = None
    if g is not None:
        g2 = g.reshape(-1, o)
        if need_x:
            gx = g @ w
        if need_w and gbar_wb:
            gw = g2.t() @ x2
        if need_b and gbar_wb:
            gb = g2.sum(0)
    if gdot is not None:
        k = gdot.shape[0]
        gd2 = gdot.reshape(k, -1, o)
        if need_x:
            gdx = gdot @ w
        if need_w:
            gdw = torch.einsum("kmo,mi->koi", gd2, x2)
        if need_b:
            gdb = gd2.sum(1)
    if g is not None and (tw is not None or tx is not None):
        g2 = g.reshape(-1, o)
        if need_x and tw is not None:
            k = tw.shape[0]
            second = (g2 @ tw.permute(1, 0, 2).reshape(o, k * i)).reshape(*x.shape[:-1], k, i)
            gdx = add(gdx, second.movedim(-2, 0))
        if need_w and tx is not None:
            k = tx.shape[0]
            second = torch.einsum("mo,kmi->koi", g2, tx.reshape(k, -1, i))
            gdw = add(gdw, second)
    return (gx, gw, gb), (gdx, gdw, gdb)


class Linear(Rule):
    ops = (aten.linear.default,)
    name = "linear"

    def declines(self, call: Call) -> str | None:
        x, w = call.args[0], call.args[1]
        if x.dim() < 1 or w.dim() != 2:
            return "linear rule needs x [..., I] and a 2-D weight"
        return None

    def fwd_jvp(self, call: Call):
        x, w, b = call.args
        tx, tw, tb = call.tangents
        y, ydot = linear_fwd_jvp_ref(x, w, b, tx, tw, tb)
        return y, ydot, (x, w, tx, tw, call.active, call.gbar_read(1, 2))

    def bwd_jvp(self, res, g, gdot):
        x, w, tx, tw, active, gbar_wb = res
        return linear_bwd_jvp_ref(
            x, w, tx, tw, g, gdot, active[0], active[1], bool(active[2]), gbar_wb
        )


class Addmm(Rule):
    """``addmm(c, A, B, beta, alpha) = β c + α A B`` with 2-D ``A [M, I]``, ``B [I, O]``."""

    ops = (aten.addmm.default,)
    name = "addmm"

    def fwd_jvp(self, call: Call):
        c, a, b, beta, alpha = call.args
        tc, ta, tb = call.tangents[:3]
        y = torch.addmm(c, a, b, beta=beta, alpha=alpha)
        ydot = None
        if ta is not None:
            ydot = alpha * (ta @ b)
        if tb is not None:
            ydot = add(ydot, alpha * torch.matmul(a, tb))
        if tc is not None:
            ydot = add(ydot, beta * lift(tc, y.dim()).expand(tc.shape[0], *y.shape))
        return y, ydot, (c.shape, a, b, ta, tb, beta, alpha, call.active)

    def bwd_jvp(self, res, g, gdot):
        cshape, a, b, ta, tb, beta, alpha, active = res
        gc = gA = gB = gdc = gdA = gdB = None
        if g is not None:
            if active[0]:
                gc = sum_to(beta * g, cshape, False)
            if active[1]:
                gA = alpha * (g @ b.t())
                if tb is not None:
                    gdA = alpha * (g @ tb.transpose(1, 2))
            if active[2]:
                gB = alpha * (a.t() @ g)
                if ta is not None:
                    gdB = alpha * (ta.transpose(1, 2) @ g)
        if gdot is not None:
            if active[0]:
                gdc = sum_to(beta * gdot, cshape, True)
            if active[1]:
                gdA = add(gdA, alpha * (gdot @ b.t()))
            if active[2]:
                gdB = add(gdB, alpha * (a.t() @ gdot))
        return (gc, gA, gB, None, None), (gdc, gdA, gdB, None, None)


RULES = [Linear(), Addmm()]
