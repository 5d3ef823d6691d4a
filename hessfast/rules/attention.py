"""Scaled dot-product attention: ``aten.scaled_dot_product_attention`` in its math form.

Index conventions: ``q [..., H, Tq, D]``, ``k [..., Hkv, Tk, D]``, ``v [..., Hkv, Tk, Dv]``,
``O [..., H, Tq, Dv]``; the leading ``...`` broadcast as ``torch.matmul`` does (the head axis is
just one more batch axis unless ``enable_gqa``). Tangents and cotangent tangents carry a leading K;
the K vectors are batched by broadcasting matmuls, never by a Python loop. With ``enable_gqa`` the
key/value heads are repeated, ``k_e = repeat_interleave(k, H / Hkv, dim=-3)`` (likewise ``v_e``),
and the cotangents of ``k``, ``v`` are summed over each group of ``H / Hkv`` query heads.

Primal (exactly torch's semantics): ``S = s q k_eᵀ + M``, ``P = softmax(S)`` along ``Tk``,
``O = P v_e``, with ``s = scale`` or ``1/√D`` and ``M`` the additive mask: a float ``attn_mask``
is added as is, a boolean one (True = attend) and ``is_causal`` (``ones(Tq, Tk).tril(0)``,
top-left aligned) become ``0 / -inf``. A fully masked row gives ``P = 0`` (torch's safe softmax).

Forward tangent: ``Ṡ = s (q̇ k_eᵀ + q k̇_eᵀ)``, ``Ṗ = P ⊙ (Ṡ − rowsum(P ⊙ Ṡ))``,
``Ȯ = Ṗ v_e + P v̇_e``.

Backward (``σ(X) = P ⊙ (X − rowsum(P ⊙ X))`` is the softmax VJP):
``ḡ_v = Pᵀ ḡ_O``, ``ḡ_P = ḡ_O v_eᵀ``, ``ḡ_S = σ(ḡ_P)``, ``ḡ_q = s ḡ_S k_e``,
``ḡ_k = s ḡ_Sᵀ q``.

Tangents of the backward: ``ġ_v = Pᵀ ġ_O + Ṗᵀ ḡ_O``; ``ġ_P = ġ_O v_eᵀ + ḡ_O v̇_eᵀ``;
``ġ_S = σ(ġ_P) + Ṗ ⊙ (ḡ_P − rowsum(P ⊙ ḡ_P)) − P ⊙ rowsum(Ṗ ⊙ ḡ_P)``;
``ġ_q = s (ġ_S k_e + ḡ_S k̇_e)``; ``ġ_k = s (ġ_Sᵀ q + ḡ_Sᵀ q̇)``. Every term with both ``ḡ`` and a
tangent is second order: GGN mode (``ḡ`` absent) drops it, ``ġ`` absent keeps it alone.

A gradient-only run (no tangents, ``K = 0``) needs none of ``P``'s tangent algebra: there the
rule calls the op itself under autograd and differentiates it with ``torch.autograd.grad`` — the
fused kernels autograd runs (on the CPU ``_scaled_dot_product_flash_attention_for_cpu`` and its
backward), which a traced product records as graph nodes, so ``hessfast.grad`` does what
autograd's gradient does.

Declined (the rule returns a reason): ``dropout_p > 0``, a mask that depends on the parameters,
``attn_mask`` together with ``is_causal`` (torch rejects it), non-float or non-strided inputs,
inconsistent shapes, and ``enable_gqa`` with a head count that does not divide.
"""

from __future__ import annotations

import math

import torch

from .base import Call, Rule, add, lift, nones, stack_k, sum_to, unstack_k

Tensor = torch.Tensor
aten = torch.ops.aten


def _t(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


def _rowsum(x: Tensor) -> Tensor:
    return x.sum(-1, keepdim=True)


def softmax_vjp_ref(p: Tensor, x: Tensor) -> Tensor:
    """``σ(X) = P ⊙ (X − rowsum(P ⊙ X))``: the VJP (and JVP) of a row softmax with output ``P``."""
    return p * (x - _rowsum(p * x))


def expand_heads(x: Tensor | None, groups: int) -> Tensor | None:
    """GQA: repeat each of the ``Hkv`` heads (axis -3) ``groups`` times, head ``h`` going to
    ``h·groups … h·groups + groups − 1`` (``repeat_interleave``); works on ``[K, ...]`` too."""
    if x is None or groups == 1:
        return x
    return x.repeat_interleave(groups, dim=-3)


def reduce_heads(g: Tensor | None, groups: int) -> Tensor | None:
    """Adjoint of :func:`expand_heads`: sum the cotangent over each group of query heads."""
    if g is None or groups == 1:
        return g
    return g.unflatten(-3, (-1, groups)).sum(-3)


def additive_mask_ref(attn_mask, is_causal, tq, tk, dtype, device) -> Tensor | None:
    """The mask ``M`` added to the scores: a float mask as is; a boolean mask (True = attend) and
    the causal mask (``ones(Tq, Tk).tril(0)``) as ``0`` where attended, ``-inf`` elsewhere."""
    if is_causal:
        attn_mask = torch.ones(tq, tk, dtype=torch.bool, device=device).tril(0)
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=device)
        return zero.masked_fill(~attn_mask, float("-inf"))
    return attn_mask.to(dtype)


def sdpa_probs_ref(q: Tensor, k_e: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """``P = softmax(s q k_eᵀ + M)``; rows that are entirely ``-inf`` give 0 rather than NaN."""
    s = (q * scale) @ _t(k_e)
    if mask is None:
        return torch.softmax(s, dim=-1)
    s = s + mask
    p = torch.softmax(s, dim=-1)
    dead = torch.isneginf(s.amax(dim=-1, keepdim=True))
    return p.masked_fill(dead, 0.0)


def sdpa_fwd_jvp_ref(q, k_e, v_e, p, tq, tk_e, tv_e, scale):
    """``O = P v_e`` and ``Ȯ = Ṗ v_e + P v̇_e`` with ``Ṡ = s (q̇ k_eᵀ + q k̇_eᵀ)``,
    ``Ṗ = σ(Ṡ)``. Tangents are ``[K, ...]`` lifted to ``P``'s rank (see :func:`lift`) or ``None``.
    Returns ``(O, Ȯ, Ṗ)``."""
    o = p @ v_e
    sdot = None
    if tq is not None:
        sdot = tq @ _t(k_e)
    if tk_e is not None:
        sdot = add(sdot, q @ _t(tk_e))
    pdot = softmax_vjp_ref(p, sdot * scale) if sdot is not None else None
    odot = None
    if pdot is not None:
        odot = pdot @ v_e
    if tv_e is not None:
        odot = add(odot, p @ tv_e)
    return o, odot, pdot


def sdpa_bwd_jvp_ref(q, k_e, v_e, p, pdot, tq, tk_e, tv_e, scale, g, gdot, need_q, need_k, need_v):
    """Cotangents ``(ḡ, ġ)`` of ``q``, ``k_e``, ``v_e`` (unreduced: broadcast, GQA-expanded
    shapes; see the module docstring for the formulas)."""
    gq = gk = gv = gdq = gdk = gdv = None
    stacked, n_g = stack_k(g, gdot)
    if stacked is None:
        return (None, None, None), (None, None, None)
    second = g is not None
    if need_v:
        gv, gdv = unstack_k(_t(p) @ stacked, n_g)
        if second and pdot is not None:
            gdv = add(gdv, _t(pdot) @ g)
    if need_q or need_k:
        g_p, gd_p = unstack_k(stacked @ _t(v_e), n_g)
        if second and tv_e is not None:
            gd_p = add(gd_p, g @ _t(tv_e))
        g_s = softmax_vjp_ref(p, g_p) if g_p is not None else None
        gd_s = softmax_vjp_ref(p, gd_p) if gd_p is not None else None
        if second and pdot is not None:
            gd_s = add(gd_s, pdot * (g_p - _rowsum(p * g_p)) - p * _rowsum(pdot * g_p))
        if need_q:
            if g_s is not None:
                gq = scale * (g_s @ k_e)
                if tk_e is not None:
                    gdq = scale * (g_s @ tk_e)
            if gd_s is not None:
                gdq = add(gdq, scale * (gd_s @ k_e))
        if need_k:
            if g_s is not None:
                gk = scale * (_t(g_s) @ q)
                if tq is not None:
                    gdk = scale * (_t(g_s) @ tq)
            if gd_s is not None:
                gdk = add(gdk, scale * (_t(gd_s) @ q))
    return (gq, gk, gv), (gdq, gdk, gdv)


def _gqa_groups(q: Tensor, k: Tensor, enable_gqa: bool) -> int:
    if not enable_gqa:
        return 1
    return q.shape[-3] // k.shape[-3]


class ScaledDotProductAttention(Rule):
    ops = (aten.scaled_dot_product_attention.default,)
    name = "scaled_dot_product_attention"

    def declines(self, call: Call) -> str | None:
        q, k, v, mask, dropout_p, is_causal, _scale, enable_gqa = call.args
        if dropout_p:
            return "attention dropout (dropout_p > 0) is random: no fixed Hessian"
        if mask is not None and call.is_active(3):
            return "an attention mask that depends on the parameters is not supported"
        if mask is not None and is_causal:
            return "attn_mask together with is_causal=True (torch rejects it)"
        for x in (q, k, v):
            if not isinstance(x, Tensor) or not x.is_floating_point() or x.layout != torch.strided:
                return "attention needs strided floating-point q, k, v"
            if x.dim() < 2 or x.is_nested:
                return "attention needs q, k, v with at least 2 dimensions"
        if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
            return "attention shapes do not match (q [.., Tq, D], k [.., Tk, D], v [.., Tk, Dv])"
        if enable_gqa:
            if q.dim() < 3 or k.dim() < 3 or v.dim() < 3:
                return "enable_gqa needs a head axis (-3)"
            hq, hk, hv = q.shape[-3], k.shape[-3], v.shape[-3]
            if hk != hv or hk == 0 or hq % hk:
                return "enable_gqa needs Hkv dividing H and equal for k and v"
        if mask is not None and (
            not isinstance(mask, Tensor)
            or not (mask.dtype == torch.bool or mask.is_floating_point())
        ):
            return "attention mask must be a boolean or floating-point tensor"
        return None

    def fwd_jvp(self, call: Call):
        if call.k == 0:
            return self._fwd_autograd(call)
        q, k, v, mask, _dropout_p, is_causal, scale, enable_gqa = call.args
        tq, tk, tv = call.tangents[:3]
        active = tuple(call.is_active(i) for i in range(3))
        if scale is None:
            scale = 1.0 / math.sqrt(q.shape[-1])
        groups = _gqa_groups(q, k, enable_gqa)
        k_e, v_e = expand_heads(k, groups), expand_heads(v, groups)
        m = additive_mask_ref(mask, is_causal, q.shape[-2], k.shape[-2], q.dtype, q.device)
        p = sdpa_probs_ref(q, k_e, m, scale)
        nd = p.dim()
        tq = lift(tq, nd)
        tk_e = lift(expand_heads(tk, groups), nd)
        tv_e = lift(expand_heads(tv, groups), nd)
        o, odot, pdot = sdpa_fwd_jvp_ref(q, k_e, v_e, p, tq, tk_e, tv_e, scale)
        if odot is not None and odot.shape[1:] != o.shape:
            odot = odot.expand(odot.shape[0], *o.shape)
        res = (q, k, v, groups, p, pdot, tq, tk_e, tv_e, scale, active)
        return o, odot, res

    def _fwd_autograd(self, call: Call):
        """Gradient only: the op under autograd; :meth:`bwd_jvp` differentiates it."""
        q, k, v, mask, dropout_p, is_causal, scale, enable_gqa = call.args
        leaves = [x.detach().requires_grad_(call.is_active(i)) for i, x in enumerate((q, k, v))]
        with torch.enable_grad():
            o = aten.scaled_dot_product_attention(
                *leaves, mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
            )
        return o.detach(), None, ("autograd", o, leaves)

    def bwd_jvp(self, res, g, gdot):
        if res[0] == "autograd":
            _, o, leaves = res
            wanted = [x for x in leaves if x.requires_grad]
            grads = iter(torch.autograd.grad(o, wanted, g) if g is not None else ())
            gs = [next(grads) if x.requires_grad and g is not None else None for x in leaves]
            return (*gs, *nones(5)), nones(8)
        q, k, v, groups, p, pdot, tq, tk_e, tv_e, scale, active = res
        k_e, v_e = expand_heads(k, groups), expand_heads(v, groups)
        (gq, gk, gv), (gdq, gdk, gdv) = sdpa_bwd_jvp_ref(
            q, k_e, v_e, p, pdot, tq, tk_e, tv_e, scale, g, gdot, *active
        )
        gq, gdq = sum_to(gq, q.shape, False), sum_to(gdq, q.shape, True)
        gk = sum_to(reduce_heads(gk, groups), k.shape, False)
        gdk = sum_to(reduce_heads(gdk, groups), k.shape, True)
        gv = sum_to(reduce_heads(gv, groups), v.shape, False)
        gdv = sum_to(reduce_heads(gdv, groups), v.shape, True)
        rest = nones(5)
        return (gq, gk, gv, *rest), (gdq, gdk, gdv, *rest)


RULES = [ScaledDotProductAttention()]
