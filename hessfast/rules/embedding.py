"""Embedding lookup: ``aten.embedding(W, idx, padding_idx, scale_grad_by_freq, sparse)``.

Index conventions: ``W [V, D]``, integer ``idx`` of any shape ``I``, ``y = W[idx]`` of shape
``[*I, D]``; tangents carry a leading ``K``. Only ``W`` can be active.

``y`` is linear in ``W``, so there is no second-order term:

- forward tangent: ``ẏ = Ẇ[:, idx]`` (``[K, *I, D]``), zero where ``idx == padding_idx`` (when
  ``≥ 0``). torch's backward treats the padding row as a constant, so the curvature must too, on
  both sides: no tangent out of the row here, no cotangent into it below. (torch's forward-mode AD
  does let a tangent through the padding row; following it would make ``H`` non-symmetric.)
- cotangent: ``ḡ_W[v] = Σ_{i : idx_i = v} ḡ_i`` (an ``index_add`` of the rows of ``ḡ``), with the
  row ``padding_idx`` (when ``≥ 0``) set to zero as torch's embedding backward does;
- its tangent: ``ġ_W`` is the same map applied to ``ġ``; ``ḡ`` and ``ġ`` are stacked
  (``[1 + K]``) and scattered by one ``index_add``.

``scale_grad_by_freq`` and ``sparse`` are declined (to the generic fallback).
"""

from __future__ import annotations

import torch

from .base import Call, Rule, stack_k, unstack_k

Tensor = torch.Tensor
aten = torch.ops.aten


def embedding_fwd_jvp_ref(w, idx, tw, padding_idx=None):
    """``y = W[idx]`` and ``ẏ = Ẇ[:, idx]`` (``tw [K, V, D]`` or ``None``), the tangent zero at
    positions where ``idx == padding_idx`` (when ``≥ 0``): the padding row is a constant."""
    y = w[idx]
    ydot = tw[:, idx] if tw is not None else None
    if ydot is not None and padding_idx is not None and padding_idx >= 0:
        ydot = ydot.masked_fill((idx == padding_idx).unsqueeze(-1), 0)
    return y, ydot


def embedding_bwd_jvp_ref(w_shape, idx, padding_idx, g, gdot):
    """``(ḡ_W, ġ_W)``: the rows of ``g [*I, D]`` and ``gdot [K, *I, D]`` summed into ``[V, D]``
    (``[K, V, D]``) at ``idx``, row ``padding_idx`` zeroed when it is ``≥ 0``."""
    s, n_g = stack_k(g, gdot)  # [M, *I, D]
    if s is None:
        return None, None
    m = s.shape[0]
    v, d = w_shape
    flat = idx.reshape(-1)
    out = s.new_zeros(m, v, d).index_add_(1, flat, s.reshape(m, -1, d))
    if padding_idx is not None and padding_idx >= 0:
        out[:, padding_idx] = 0
    return unstack_k(out, n_g)


class Embedding(Rule):
    ops = (aten.embedding.default,)
    name = "embedding"

    def declines(self, call: Call) -> str | None:
        w, idx, padding_idx, scale_grad_by_freq, sparse = call.args
        if not isinstance(w, Tensor) or w.dim() != 2 or not w.is_floating_point():
            return "embedding rule needs a 2-D floating-point weight"
        if not isinstance(idx, Tensor) or idx.dtype not in (torch.int64, torch.int32):
            return "embedding rule needs int64 or int32 indices"
        if call.is_active(1):
            return "embedding rule: integer indices cannot be active"
        if scale_grad_by_freq:
            return "embedding rule does not handle scale_grad_by_freq=True"
        if sparse:
            return "embedding rule does not handle sparse=True"
        if padding_idx is not None and padding_idx >= w.shape[0]:
            return "embedding rule: padding_idx out of range"
        return None

    def fwd_jvp(self, call: Call):
        w, idx, padding_idx = call.args[:3]
        active = call.is_active(0)
        tw = call.tangents[0] if active else None
        y, ydot = embedding_fwd_jvp_ref(w, idx, tw, padding_idx)
        gbar = call.gbar_read(0)  # else nobody reads ḡ_W: the rows of ġ alone are summed
        return y, ydot, (tuple(w.shape), idx, padding_idx, active, gbar)

    def bwd_jvp(self, res, g, gdot):
        w_shape, idx, padding_idx, active, gbar = res
        gw = gdw = None
        if active:
            gw, gdw = embedding_bwd_jvp_ref(w_shape, idx, padding_idx, g if gbar else None, gdot)
        return (gw, None, None, None, None), (gdw, None, None, None, None)


RULES = [Embedding()]
