"""GGN products without subnormal numbers: a power-of-two scale of ``ġ_z`` per product (issue 13).

The problem. A saturated softmax (logit gaps above ~87, e.g. a tied head over N(0, 1) embeddings:
``benchmarks.untuned_models:tied_gpt``) has probabilities below float32's ``tiny`` for every class
but the largest, and the loss-Hessian product ``ġ_z = ∇²_z L · ż`` is of that size: whole rows of
it subnormal, its largest entry ~5e-29 on ``tied_gpt``. In GGN mode nothing else is added to ``ġ``
on the way back, so every linear and elementwise backward op computes on subnormals, each of which
costs an x86 CPU a microcode assist (tens to hundreds of cycles: the Intel Xeon of
``benchmarks/results`` ran the GGN product at 2.2–2.5× double backward; an AMD EPYC showed no
slowdown).

The remedy. GGN mode's backward pass is linear in ``ġ_z``, product by product: each product ``k``
gives ``ġ_θ[k] = Jᵀ ġ_z[k]``, where ``J`` depends on the primal values only. So the engine hands on
``s_k ġ_z[k]`` with ``s_k = 2^(−e_k)``, ``max|ġ_z[k]| = m · 2^(e_k)``, ``m ∈ [½, 1)``
(:func:`pow2_scale`: the largest entry becomes ``m``), and multiplies the parameter products by
``1 / s_k = 2^(e_k)`` at the end. ``s_k = 1`` when the largest entry is 0 or not finite, and ``e_k``
is clamped to ``[−126, 126]`` so that ``s_k`` and ``1 / s_k`` are normal numbers.

Why it is exact. Multiplying by a power of two changes the exponent only: ``fl(s a) = s a``, and
the backward pass of GGN mode combines ``ġ`` values only linearly (sums of scaled values, products
and quotients with primal values, GEMMs, reductions), where ``fl(s a + s b) = s · fl(a + b)`` and
``fl(s a · b) = s · fl(a · b)``: rounding to a binary format commutes with scaling by a power of
two. So every intermediate of the scaled pass is ``s_k`` times the unscaled one, bit for bit,
wherever neither of them overflows or falls below ``tiny`` (where the unscaled pass loses bits to
gradual underflow the scaled one keeps them). After the scale ``ġ_z[k]``'s largest entry is in
``[½, 1)``: overflow would need a backward pass that grows its cotangents by ~1e38, and what still
falls below ``tiny`` is below ``2⁻¹²⁶`` relative to that largest entry (times what the pass
multiplies it by): negligible. That is also the limit of the remedy: a product whose ``ġ_z``
spans more than float32's normal range (saturated rows next to unsaturated ones) keeps some
subnormals (``tests/test_ggn_scale.py``: 408 → 78 entries on a partly saturated tied model); on
``tied_gpt``, whose rows are all saturated, the backward outputs of a K = 2 product held 491k–636k
subnormal entries unscaled and none scaled. Products do not mix in the backward pass (each rule
maps ``[K, ...]`` to ``[K, ...]`` product by product), so the scales are per product.

The fused cross-entropy head (:class:`~hessfast.rules.cross_entropy.LinearCrossEntropy`) computes
its parameters' products itself, a chunk of rows at a time; it applies the same scale (of the
whole batch's largest entry, reached through a running maximum) and returns it to the engine. The
autograd fallback (:mod:`hessfast.autograd_fallback`, for models ``torch.export`` cannot capture)
scales each product's ``ġ_z`` before its VJP the same way.

Where. On the CPU (a GPU computes on subnormals at full speed), for float32 and bfloat16 (float16
CPU arithmetic runs in float32, where float16's subnormals are normal; and its range, 65504, leaves
no room for a scale to ~1), in GGN mode only: in HVP mode ``ġ`` also collects the rules'
second-order terms, driven by ``ḡ`` (a different scale), and ``"residual"`` mode has no ``ġ_z`` at
all (its ``ġ`` is those terms only, and ``ḡ`` is normal). Float64 is left untouched. The scale
costs an ``amax`` over ``ġ_z`` and one pass over each of ``ġ_z`` and the products (about 1% of an
interpreted GGN product of the small built-in models). All of it is
tensor arithmetic, no host read, so a traced product (``hessfast/traced.py``) records it and
computes the scale of each batch it is given.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: The exponent range of the scale: ``2^±126`` is a normal float32 (and bfloat16) number.
_EMAX = 126


def applies(x: Tensor) -> bool:
    """Whether GGN-mode products of ``x``'s dtype and device are scaled (see the module docstring):
    a floating tensor on the CPU in float32 or bfloat16."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)


def pow2_scale(x: Tensor) -> Tensor:
    """``s [K]`` in float32 for ``x [K, ...]``: ``s_k = 2^(−e_k)`` with ``max|x[k]| = m · 2^(e_k)``,
    ``m ∈ [½, 1)``, ``e_k`` clamped to ``[−126, 126]``; ``s_k = 1`` where ``max|x[k]|`` is 0 or not
    finite. Built from its bits (exact by construction)."""
    if x.dim() < 1:
        raise ValueError("pow2_scale: x must be [K, ...], got a 0-d tensor")
    top = x.abs().amax(dim=tuple(range(1, x.dim()))) if x.dim() > 1 else x.abs()
    # a non-finite maximum counts as 0, whose exponent is 0: s = 2⁰
    _, e = torch.frexp(torch.nan_to_num(top.float(), nan=0.0, posinf=0.0))
    return ((127 - e.clamp(-_EMAX, _EMAX)) << 23).view(torch.float32)


def inverse(s: Tensor) -> Tensor:
    """``1 / s`` for a scale of :func:`pow2_scale` (a power of two: exact)."""
    return 1.0 / s


def per_product(s: Tensor, like: Tensor) -> Tensor:
    """``s [K]`` shaped ``[K, 1, ...]`` to broadcast against ``like [K, ...]``, in its dtype (exact:
    ``s`` is a power of two in the dtype's normal range)."""
    return s.to(like.dtype).reshape(-1, *[1] * (like.dim() - 1))
