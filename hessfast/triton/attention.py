"""Flash-style Triton implementation of the attention rule (``aten.scaled_dot_product_attention``).

Exact HVPs and GGN-VPs through SDPA without any ``T × T`` tensor in memory: the forward tangent
and the backward with its tangents are tiled like flash-attention 2 (online softmax forward, one
backward kernel over key/value blocks and one over query blocks), recomputing the attention tiles
from ``q, k, v``, their tangents and ``O(T)`` per-row statistics saved by the forward.

Index conventions (as in :mod:`hessfast.rules.attention`): ``q [..., H, Tq, D]``,
``k [..., Hkv, Tk, D]``, ``v [..., Hkv, Tk, Dv]``, ``O [..., H, Tq, Dv]``; the leading axes are
flattened to ``Z`` (``Z = 1`` for 2-D/3-D inputs, ``H = 1`` for 2-D ones). With GQA
(``enable_gqa``, ``Hkv | H``) query head ``h`` reads key/value head ``h // (H / Hkv)``. Tangents and
cotangent tangents carry a leading ``K`` (``q̇ [K, ..., H, Tq, D]``, ``ġ [K, ..., H, Tq, Dv]``).
Per ``(z, h)`` write ``Q, K, V`` for the matrices, ``s`` for the scale (``1/√D`` by default) and
``M`` for the additive mask (a float mask as is; a boolean mask and ``is_causal`` — top-left
aligned, ``j ≤ i`` — as ``0 / −∞``).

Forward (one tiled pass per query block and tangent ``k``)::

    S = s Q Kᵀ + M,  P = softmax_rows(S),  O = P V
    Ṡ = s (Q̇ Kᵀ + Q K̇ᵀ),  μ̇_i = Σ_j P_ij Ṡ_ij,  Ṗ = P ⊙ (Ṡ − μ̇)
    Ȯ = Ṗ V + P V̇ = Σ_j P_ij Ṡ_ij V_j − μ̇ O + P V̇

Online softmax: per query row the running maximum ``m``, the running normaliser
``l = Σ_j e^(S_ij − m)``, and the unnormalised accumulators ``Σ_j e^(S_ij − m) V_j``,
``Σ_j e^(S_ij − m) Ṡ_ij`` (the tangent of the normaliser) and
``Σ_j e^(S_ij − m) (Ṡ_ij V_j + V̇_j)``, all rescaled by ``α = e^(m_old − m_new)`` when the
maximum moves. At the end ``O = acc/l``, ``μ̇ = μ̃/l`` and ``Ȯ = acc_t/l − μ̇ O``; the backward
recomputes ``P = e^(S − m) · (1/l)`` from the saved ``m`` and ``1/l`` (``+∞`` and ``0`` for a fully
masked row, so that ``P = 0`` there, torch's safe-softmax convention). Hugging Face masks with
``finfo.min``, and torch gives a row masked that way everywhere uniform weights; two choices keep
that: natural exponentials (base 2 with ``log₂e`` folded into the scale overflows
``finfo.min · log₂e`` to ``−∞`` and kills the row), and ``(m, 1/l)`` rather than
``lse = m + log l`` (``m ≈ −3.4e38`` absorbs ``log l`` in fp32). Saved: ``(m, 1/l) [2, Z·H, Tq]``
and ``μ̇ [K, Z·H, Tq]`` (fp32), ``O``, ``Ȯ``.

Backward, with ``ḡ`` the output cotangent (``dO``) and ``ġ`` its tangents::

    dP = ḡ Vᵀ,  D_i = rowsum(ḡ ⊙ O) = Σ_j P_ij dP_ij,  dS = P ⊙ (dP − D)
    ḡ_Q = s dS K,  ḡ_K = s dSᵀ Q,  ḡ_V = Pᵀ ḡ
    dṖ = ġ Vᵀ + ḡ V̇ᵀ,  Ḋ_i = rowsum(ġ ⊙ O + ḡ ⊙ Ȯ)
    dṠ = P ⊙ (dṖ − Ḋ) + Ṗ ⊙ (dP − D)
    ġ_Q = s (dṠ K + dS K̇),  ġ_K = s (dṠᵀ Q + dSᵀ Q̇),  ġ_V = Pᵀ ġ + Ṗᵀ ḡ

(``Ḋ`` is the tangent of ``D = Σ_j P_ij dP_ij``; these equal the torch rule's formulas with
``σ(X) = P ⊙ (X − rowsum(P ⊙ X))``.) Every term is one of two kinds, and the kernels take them as
compile-time switches:

- *first order* (``FIRST``): the flash-attention backward of one output cotangent ``c``:
  ``dS₁ = P ⊙ (c Vᵀ − rowsum(c ⊙ O))``, contributing ``s dS₁ K``, ``s dS₁ᵀ Q``, ``Pᵀ c``.
  The primal cotangents are this with ``c = ḡ``; the ``ġ`` terms of the tangents are this with
  ``c = ġ_k``;
- *second order* (``SECOND``, needs ``ḡ`` and the input tangents): ``P ⊙ (ḡ V̇ᵀ − rowsum(ḡ ⊙ Ȯ))
  + Ṗ ⊙ (dP − D)`` added to ``dṠ``, and ``s dS K̇``, ``s dSᵀ Q̇``, ``Ṗᵀ ḡ``.

So the GGN mode (no ``ḡ``) is the plain flash backward batched over the K vectors ``ġ_k``: no
``Ṗ``, no ``Ṡ``, no input tangents read. A gradient-only run (K = 0) is one flash backward of
``ḡ``. The HVP runs the primal backward (one launch per kernel) and a tangent launch with both
kinds. The per-row ``D``, ``Ḋ`` are computed in torch (fp32, ``O(T·Dv)``) before the launches.

Kernel layout and its cost. The K tangent vectors are the second grid axis (the first holds the
blocks of every ``(z, h)``): each program handles
one query block (forward, ``dQ`` kernel) or one key/value block (``dK dV`` kernel) for one
``(z, h)`` and one ``k``, and recomputes ``QKᵀ`` (and ``PV`` in the forward) for its ``k``. Per
tile of ``[BLOCK_M × BLOCK_N]`` scores, counting ``[BM × BN × D]`` matrix products:

- forward: 2 without tangents; 6 per tangent (``QKᵀ``, ``Q̇Kᵀ``, ``QK̇ᵀ``, ``PV``, ``(P⊙Ṡ)V``,
  ``PV̇``) against ``2 + 4K`` for one program looping over ``k`` — equal at K = 1, and the grid axis
  buys parallelism and bounded registers (a loop would need K accumulators);
- backward, first order only (gradient, GGN, per ``k``): 4 in the ``dK dV`` kernel, 3 in the
  ``dQ`` kernel (flash-attention 2's count with ``QKᵀ`` recomputed in both);
- backward, tangent launch of the HVP: 10 + 8 per ``k``.

The ``dK dV`` kernel accumulates, for GQA, over the ``H/Hkv`` query heads of its key/value head,
so ``dK``, ``dV`` and their tangents are summed in fp32 registers without atomics: every result
is deterministic. Causal attention skips the tiles above the diagonal in all three kernels.

Precision: every product accumulates in fp32; ``P``, ``dS`` … are rounded to the input dtype only
as ``tl.dot`` operands (as flash attention does for ``P``). The forward's tangent operand is
centred before that rounding: each tile adds ``Σ_j P_ij (Ṡ_ij − c_i) V_j + c_i Σ_j P_ij V_j`` with
``c_i`` the tile's own ``P``-weighted mean of ``Ṡ_i·``, so the rounded values are deviations, as
``Ṗ`` is (rounding ``P ⊙ Ṡ`` itself and subtracting ``μ̇ O`` at the end loses ``Ȯ`` to
cancellation: 2–3× the error of the plain-torch rule in bfloat16). Float32 operands multiply in
3×TF32 (``input_precision="tf32x3"``: fp32-level accuracy on tensor cores; IEEE fp32 ``tl.dot``
falls back to FMA and spills its registers at every tile size) under torch's default
``torch.get_float32_matmul_precision() == "highest"``, which the float32 tolerance assumes, and in
plain TF32 otherwise.

In Triton's interpreter two bfloat16 shortcuts are worked around so that the CPU tests measure
what the GPU computes: its ``tl.dot`` multiplies bfloat16 bit patterns (triton-lang/triton#11584),
so bfloat16 operands are multiplied as fp32 (``DT``); and its fp32 → bfloat16 cast truncates, so
rounding to nearest even is done by hand (``RNE``, :func:`_round`). Compiled kernels take neither
branch.

Declines (with a reason), beyond the torch rule's own (dropout, an active mask, ``attn_mask`` with
``is_causal``, …): float64; ``q, k, v`` of mixed dtypes or devices; batch axes that differ between
``q``, ``k``, ``v`` (the kernels do not broadcast them) or key/value heads that differ from the
query heads without ``enable_gqa``; head dims above 128; empty inputs; a mask that is not
broadcastable to ``[..., H, Tq, Tk]`` or lives on another device. Inputs need not be contiguous:
any strides with a unit last stride are read in place (others are copied once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..rules.attention import ScaledDotProductAttention
from ..rules.base import Call, nones
from . import INTERPRETED, TritonRule, absent, on_device

Tensor = torch.Tensor
aten = torch.ops.aten

_REFERENCE = ScaledDotProductAttention()
#: CUDA grid limits of the launches: axis 0 (query or key blocks × heads) and axis 1 (tangents).
MAX_GRID_0, MAX_GRID_1 = 2**31 - 1, 65535
_MAX_HEAD_DIM = 128
_NO_MASK, _BOOL_MASK, _FLOAT_MASK = 0, 1, 2


# ---- device code ---------------------------------------------------------------------------------
#
# Strides travel as tuples: ``sq``, ``sk``, ``sv``, ``sg`` are ``(z, h, t)`` of ``q, k, v, ḡ``
# (``[Z, H, T, ·]``), ``stq``, ``stk``, ``stv``, ``sc`` are ``(k, z, h, t)`` of the input tangents
# and of the first-order cotangents (``[K, Z, H, T, ·]``), ``msk`` is ``(z, h, query, key)`` of the
# mask. Score tiles come in two orientations: ``S [BLOCK_M, BLOCK_N]`` (query rows, key columns: the
# forward and the ``dQ`` kernel) and, with the switch ``TRANS``, ``Sᵀ [BLOCK_N, BLOCK_M]`` (the
# ``dK dV`` kernel, whose accumulators then need no transpose); the tile helpers serve both. A
# program keeps the operands of its own block in registers and streams the other side's blocks;
# a streamed operand is passed to the helpers as a *source* (the arguments of :func:`_tile` or
# :func:`_rows`) and loaded where it is first used, and an operand that a switch turns off is the
# constant ``0``.


@triton.jit
def _tile(base, rows, cols, stride_r, n_rows, n_cols, DT: tl.constexpr):
    """Load ``base[rows, cols]`` (row stride ``stride_r``, unit column stride) as a ``tl.dot``
    operand of type ``DT``; zeros outside ``[n_rows, n_cols]``."""
    ptrs = base + rows[:, None] * stride_r + cols[None, :]
    tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    return tile.to(DT)


@triton.jit
def _rows(base, row0, offs, row_ok):
    """The fp32 row vector ``base[row0 + offs]``, zero outside ``row_ok``."""
    return tl.load(base + row0 + offs, mask=row_ok, other=0.0)


@triton.jit
def _fetch(x, LOAD: tl.constexpr, DT: tl.constexpr):
    """The tile ``x``, or with ``LOAD`` the tile that the source ``x`` (the arguments of
    :func:`_tile` but ``DT``) names."""
    out = x
    if LOAD:
        base, rows, cols, stride_r, n_rows, n_cols = x
        out = _tile(base, rows, cols, stride_r, n_rows, n_cols, DT)
    return out


@triton.jit
def _fetch_rows(x, LOAD: tl.constexpr):
    """The row vector ``x``, or with ``LOAD`` the one that the source ``x`` (the arguments of
    :func:`_rows`) names."""
    out = x
    if LOAD:
        base, row0, offs, row_ok = x
        out = _rows(base, row0, offs, row_ok)
    return out


@triton.jit
def _head(X, st, z, h):
    """Head ``(z, h)`` of ``X [Z, H, T, ·]`` with strides ``st = (z, h, t)``."""
    return X + z * st[0] + h * st[1]


@triton.jit
def _tangent_head(X, st, k, z, h):
    """Head ``(z, h)`` of tangent ``k`` of ``X [K, Z, H, T, ·]`` with strides
    ``st = (k, z, h, t)``."""
    return X + k * st[0] + z * st[1] + h * st[2]


@triton.jit
def _round(x, ET: tl.constexpr, RNE: tl.constexpr):
    """``x`` (fp32) rounded to the input dtype ``ET``. ``RNE``: in the interpreter, whose fp32 →
    bfloat16 cast truncates, round to nearest even by hand and keep the bfloat16 value in fp32 (a
    store then converts it exactly)."""
    if RNE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    return x.to(ET)


@triton.jit
def _dot_rounded(x, b, acc, ET: tl.constexpr, RNE: tl.constexpr, DT, PREC: tl.constexpr):
    """``acc + x b`` with the fp32 tile ``x`` (``P``, ``dS`` …) rounded to the input dtype ``ET``
    as a ``DT`` operand."""
    return tl.dot(_round(x, ET, RNE).to(DT), b, acc, input_precision=PREC)


@triton.jit
def _per_query(x, TRANS: tl.constexpr):
    """A per-query vector ``x [BLOCK_M]`` broadcast over a score tile: a column of ``S``, a row of
    ``Sᵀ`` (``TRANS``)."""
    if TRANS:
        out = x[None, :]
    else:
        out = x[:, None]
    return out


@triton.jit
def _dot_qk(a, b, acc, TRANS: tl.constexpr, PREC: tl.constexpr):
    """``acc + a bᵀ`` for a query-side operand ``a [BLOCK_M, ·]`` and a key-side one
    ``b [BLOCK_N, ·]``, a score tile; ``acc + b aᵀ`` with ``TRANS`` (``acc = None``: zero)."""
    if TRANS:
        out = tl.dot(b, tl.trans(a), acc, input_precision=PREC)
    else:
        out = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
    return out


@triton.jit
def _masked(
    s, mask_base, rows, cols, Tq, Tk, msk_m, msk_n, CAUSAL: tl.constexpr, MASK: tl.constexpr
):
    """Scores ``s`` (already × ``scale``) plus the mask, ``−∞`` where not attended or out of range.
    ``rows`` (query index) and ``cols`` (key index) broadcast to ``s``'s shape, so the same helper
    serves ``S`` and ``Sᵀ`` tiles; ``msk_m``, ``msk_n`` are the mask's strides."""
    valid = (rows < Tq) & (cols < Tk)
    if CAUSAL:
        valid = valid & (cols <= rows)
    if MASK == 1:
        keep = tl.load(mask_base + rows * msk_m + cols * msk_n, mask=valid, other=0)
        valid = valid & (keep != 0)
    if MASK == 2:
        add = tl.load(mask_base + rows * msk_m + cols * msk_n, mask=valid, other=0.0)
        s = s + add.to(tl.float32)
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _scores(q, kt, sm_scale, mask_base, offs_m, offs_n, Tq, Tk, msk, CAUSAL, MASK, TRANS, PREC):
    """``S = s Q Kᵀ + M`` for query rows ``offs_m`` (tile ``q``) and keys ``offs_n`` (``kt``),
    ``Sᵀ`` with ``TRANS`` (:func:`_masked`); ``mask_base`` is the mask of this ``(z, h)``."""
    s = _dot_qk(q, kt, None, TRANS, PREC) * sm_scale
    rows = _per_query(offs_m, TRANS)
    if TRANS:
        cols = offs_n[:, None]
    else:
        cols = offs_n[None, :]
    return _masked(s, mask_base, rows, cols, Tq, Tk, msk[2], msk[3], CAUSAL, MASK)


@triton.jit
def _tangent_scores(q, tq, kt, tkt, acc, HAS_TQ, HAS_TK, TRANS: tl.constexpr, DT, PREC):
    """``acc + Ṡ/s = acc + Q̇ Kᵀ + Q K̇ᵀ`` (``Ṡᵀ/s`` with ``TRANS``), a term left out where its
    switch is off; the streamed one of ``q̇``, ``k̇`` is a source. Returns ``(Ṡ/s, q̇, k̇)`` with the
    tangents as loaded."""
    if HAS_TQ:
        tq = _fetch(tq, TRANS, DT)
        acc = _dot_qk(tq, kt, acc, TRANS, PREC)
    if HAS_TK:
        tkt = _fetch(tkt, not TRANS, DT)
        acc = _dot_qk(q, tkt, acc, TRANS, PREC)
    return acc, tq, tkt


@triton.jit
def _bwd_step(
    s, qs, ks, rs, zeros, acc, acc_v, sm_scale, FIRST, SECOND, HAS_TQ, HAS_TK, HAS_TV, SDOT,
    NEED_DS, NEED_DV, TRANS: tl.constexpr, ET, RNE, DT, PREC,
):  # fmt: skip
    """One query block against one key block of the backward, from their scores ``s``
    (:func:`_scores`, ``Sᵀ`` with ``TRANS``)::

        P = e^(S − m) · (1/l),  dS = P ⊙ (c Vᵀ + ḡ V̇ᵀ − Δ) + Ṗ ⊙ dP₀
        Ṗ = P ⊙ (Ṡ − μ̇),  dP₀ = ḡ Vᵀ − D

    (terms whose switch is off left out), adding ``dS K + (P ⊙ dP₀) K̇`` to ``acc`` (``dQ / s``) or
    with ``TRANS`` ``dSᵀ Q + (P ⊙ dP₀)ᵀ Q̇`` (``dK / s``, needs ``NEED_DS``), and with ``NEED_DV``
    ``Pᵀ c + Ṗᵀ ḡ`` to ``acc_v`` (``dV``). ``qs = (q, q̇, c, ḡ)`` (``c`` the first-order
    cotangent), ``ks = (k, v, k̇, v̇)``, ``rs = (m, 1/l, Δ, μ̇, D)``: the streamed side's operands
    (the query side with ``TRANS``, else the key side) may be sources, loaded here where first
    used. Returns ``(acc, acc_v)``."""
    q, tq, do, g = qs
    kt, vt, tkt, tvt = ks
    row_max, inv_l, dt, mu, d0 = rs
    p = tl.exp(s - _per_query(row_max, TRANS)) * _per_query(inv_l, TRANS)
    if FIRST:
        do = _fetch(do, TRANS, DT)
        if NEED_DV:
            acc_v = _dot_rounded(p, do, acc_v, ET, RNE, DT, PREC)
    if SECOND:
        g = _fetch(g, TRANS, DT)
    if NEED_DS:
        dp = zeros
        if FIRST:
            dp = _dot_qk(do, vt, dp, TRANS, PREC)
        if HAS_TV:
            tvt = _fetch(tvt, not TRANS, DT)
            dp = _dot_qk(g, tvt, dp, TRANS, PREC)
        dt = _fetch_rows(dt, TRANS)
        ds = p * (dp - _per_query(dt, TRANS))
    if SDOT:
        sd, tq, tkt = _tangent_scores(q, tq, kt, tkt, zeros, HAS_TQ, HAS_TK, TRANS, DT, PREC)
        mu = _fetch_rows(mu, TRANS)
        pd = p * (sd * sm_scale - _per_query(mu, TRANS))
        if NEED_DV:
            acc_v = _dot_rounded(pd, g, acc_v, ET, RNE, DT, PREC)
        if NEED_DS:
            d0 = _fetch_rows(d0, TRANS)
            dp0 = _dot_qk(g, vt, zeros, TRANS, PREC) - _per_query(d0, TRANS)
            ds += pd * dp0
            if TRANS:
                if HAS_TQ:
                    acc = _dot_rounded(p * dp0, tq, acc, ET, RNE, DT, PREC)
            elif HAS_TK:
                acc = _dot_rounded(p * dp0, tkt, acc, ET, RNE, DT, PREC)
    if NEED_DS:
        acc = _dot_rounded(ds, q if TRANS else kt, acc, ET, RNE, DT, PREC)
    return acc, acc_v


@triton.jit
def _query_program(H, GROUPS, Tq, BLOCK_M: tl.constexpr):
    """Indices of a program of a kernel over query blocks (grid ``(⌈Tq/BLOCK_M⌉·Z·H, C)``, the
    query blocks of one ``(z, h)`` consecutive on axis 0, whose limit is 2³¹ − 1: axis 1 allows
    only 65,535, fewer than the ``Z·H`` of e.g. 512 images × 192 window heads):
    ``(pid_m, bh, c, Z·H, z, h, hk, offs_m)``, ``hk`` the key/value head of query head ``h``."""
    n_m = tl.cdiv(Tq, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % n_m
    bh = pid // n_m
    c = tl.program_id(1).to(tl.int64)
    n_bh = tl.num_programs(0) // n_m
    z = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUPS
    return pid_m, bh, c, n_bh, z, h, hk, pid_m * BLOCK_M + tl.arange(0, BLOCK_M)


@triton.jit
def _key_heads(Kp, V, TK, TV, sk, sv, stk, stv, c, z, hk):
    """Heads ``(z, hk)`` of ``k``, ``v`` and of their tangents ``c``."""
    k_base = _head(Kp, sk, z, hk)
    v_base = _head(V, sv, z, hk)
    return k_base, v_base, _tangent_head(TK, stk, c, z, hk), _tangent_head(TV, stv, c, z, hk)


@triton.jit
def _row_stats(STATS, n_bh, Tq, row0, offs_m, row_ok):
    """The saved ``(m, 1/l)`` of rows ``row0 + offs_m`` from ``STATS [2, Z·H, Tq]``; ``(+∞, 0)``
    outside ``row_ok`` (``P = 0`` there)."""
    row_max = tl.load(STATS + row0 + offs_m, mask=row_ok, other=float("inf"))
    return row_max, _rows(STATS + n_bh.to(tl.int64) * Tq, row0, offs_m, row_ok)


@triton.jit
def _key_end(pid_m, Tk, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """End of the key loop of query block ``pid_m``: ``Tk``, or with ``CAUSAL`` the end of the
    block's diagonal (the tiles beyond are masked everywhere)."""
    end = Tk
    if CAUSAL:
        end = tl.minimum(Tk, (pid_m + 1) * BLOCK_M)
    return end


@triton.jit
def _sdpa_fwd_kernel(
    Q,
    Kp,
    V,
    TQ,
    TK,
    TV,
    Mask,
    O,
    OD,
    STATS,
    MU,
    sq,
    sk,
    sv,
    stq,
    stk,
    stv,
    msk,
    sm_scale,
    Tq,
    Tk,
    H,
    GROUPS,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK: tl.constexpr,
    HAS_TQ: tl.constexpr,
    HAS_TK: tl.constexpr,
    HAS_TV: tl.constexpr,
    SDOT: tl.constexpr,
    TANGENT: tl.constexpr,
    PREC: tl.constexpr,
    DT: tl.constexpr,
    RNE: tl.constexpr,
):
    """One query block of one ``(z, h)`` for tangent ``k = program_id(1)``: ``O`` and ``(m, 1/l)``
    (stored by ``k = 0`` only), ``Ȯ_k`` and ``μ̇_k``. Grid ``(⌈Tq/BLOCK_M⌉·Z·H, max(K, 1))``."""
    ET = Q.dtype.element_ty
    pid_m, bh, t, n_bh, z, h, hk, offs_m = _query_program(H, GROUPS, Tq, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_base, v_base, tk_base, tv_base = _key_heads(Kp, V, TK, TV, sk, sv, stk, stv, t, z, hk)
    mask_base = _head(Mask, msk, z, h)
    q = _tile(_head(Q, sq, z, h), offs_m, offs_d, sq[2], Tq, D, DT)
    tq = _tile(_tangent_head(TQ, stq, t, z, h), offs_m, offs_d, stq[3], Tq, D, DT) if HAS_TQ else 0
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    mu = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    acc_t = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(0, _key_end(pid_m, Tk, BLOCK_M, CAUSAL), BLOCK_N):
        offs_n = start_n + offs_n0
        kt = _tile(k_base, offs_n, offs_d, sk[2], Tk, D, DT)
        s = _scores(
            q, kt, sm_scale, mask_base, offs_m, offs_n, Tq, Tk, msk, CAUSAL, MASK, False, PREC
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_ref)
        p = tl.exp(s - m_ref[:, None])
        p_sum = tl.sum(p, 1)
        l_i = l_i * alpha + p_sum
        vt = _tile(v_base, offs_n, offs_dv, sv[2], Tk, DV, DT)
        p_op = _round(p, ET, RNE).to(DT)
        if SDOT:
            pv = tl.dot(p_op, vt, tl.zeros([BLOCK_M, BLOCK_DV], tl.float32), input_precision=PREC)
            acc = acc * alpha[:, None] + pv
        else:
            acc = tl.dot(p_op, vt, acc * alpha[:, None], input_precision=PREC)
        if TANGENT:
            acc_t = acc_t * alpha[:, None]
            if SDOT:
                tkt = (tk_base, offs_n, offs_d, stk[3], Tk, D)
                zeros = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
                sd, _, _ = _tangent_scores(q, tq, kt, tkt, zeros, HAS_TQ, HAS_TK, False, DT, PREC)
                sd = sd * sm_scale
                psd_sum = tl.sum(p * sd, 1)
                mu = mu * alpha + psd_sum
                # Σ_j p (Ṡ − c) V + c Σ_j p V with the tile's own weighted mean c of Ṡ: the
                # rounded operand is centred, as Ṗ is (P ⊙ Ṡ alone loses Ȯ to cancellation).
                c = psd_sum / tl.where(p_sum > 0.0, p_sum, 1.0)
                centred = _round(p * (sd - c[:, None]), ET, RNE).to(DT)
                acc_t = tl.dot(centred, vt, acc_t + c[:, None] * pv, input_precision=PREC)
            if HAS_TV:
                tvt = _tile(tv_base, offs_n, offs_dv, stv[3], Tk, DV, DT)
                acc_t = _dot_rounded(p, tvt, acc_t, ET, RNE, DT, PREC)
        m_i = m_new

    dead = l_i == 0.0
    l_safe = tl.where(dead, 1.0, l_i)
    o = acc / l_safe[:, None]
    row_max = tl.where(dead, float("inf"), m_i)
    inv_l = tl.where(dead, 0.0, 1.0 / l_safe)
    row_ok = offs_m < Tq
    o_mask = row_ok[:, None] & (offs_dv[None, :] < DV)
    first = t == 0
    row0 = bh.to(tl.int64) * Tq
    o_off = (row0 + offs_m[:, None]) * DV + offs_dv[None, :]
    tl.store(O + o_off, _round(o, ET, RNE), mask=o_mask & first)
    tl.store(STATS + row0 + offs_m, row_max, mask=row_ok & first)
    tl.store(STATS + n_bh.to(tl.int64) * Tq + row0 + offs_m, inv_l, mask=row_ok & first)
    if TANGENT:
        od = acc_t / l_safe[:, None]
        trow0 = (t * n_bh + bh) * Tq
        if SDOT:
            mu = mu / l_safe
            od = od - mu[:, None] * o
            tl.store(MU + trow0 + offs_m, mu, mask=row_ok)
        od_off = (trow0 + offs_m[:, None]) * DV + offs_dv[None, :]
        tl.store(OD + od_off, _round(od, ET, RNE), mask=o_mask)


@triton.jit
def _sdpa_bwd_kv_kernel(
    Q,
    Kp,
    V,
    TQ,
    TK,
    TV,
    Mask,
    G,
    DOF,
    STATS,
    MU,
    DELTA,
    D0,
    DK,
    DVo,
    sq,
    sk,
    sv,
    stq,
    stk,
    stv,
    sg,
    sc,
    msk,
    sm_scale,
    Tq,
    Tk,
    H,
    HKV,
    GROUPS,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK: tl.constexpr,
    FIRST: tl.constexpr,
    SECOND: tl.constexpr,
    HAS_TQ: tl.constexpr,
    HAS_TK: tl.constexpr,
    HAS_TV: tl.constexpr,
    SDOT: tl.constexpr,
    NEED_DK: tl.constexpr,
    NEED_DV: tl.constexpr,
    PREC: tl.constexpr,
    DT: tl.constexpr,
    RNE: tl.constexpr,
):
    """``dK``, ``dV`` (or their tangents) of one key/value block of one ``(z, hk)`` for cotangent
    ``c = program_id(1)``, looping over the ``GROUPS`` query heads of ``hk`` and their query blocks,
    on transposed tiles ``Sᵀ [BLOCK_N, BLOCK_M]``. ``DOF [C, Z, H, Tq, Dv]`` is the first-order
    cotangent ``c`` (``ḡ`` or ``ġ_c``), ``G`` is ``ḡ`` for the second-order terms,
    ``DELTA [C, Z·H, Tq]`` the matching ``rowsum`` (``D`` or ``Ḋ_c``), ``D0 [Z·H, Tq]`` the primal
    ``D``. Grid ``(⌈Tk/BLOCK_N⌉·Z·Hkv, C)``."""
    ET = Q.dtype.element_ty
    n_n = tl.cdiv(Tk, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % n_n
    bhk = pid // n_n
    c = tl.program_id(1).to(tl.int64)
    n_bhk = tl.num_programs(0) // n_n
    n_bh = n_bhk * GROUPS
    z = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kt = _tile(_head(Kp, sk, z, hk), offs_n, offs_d, sk[2], Tk, D, DT)
    vt = _tile(_head(V, sv, z, hk), offs_n, offs_dv, sv[2], Tk, DV, DT)
    tkt = 0
    if HAS_TK:
        tkt = _tile(_tangent_head(TK, stk, c, z, hk), offs_n, offs_d, stk[3], Tk, D, DT)
    tvt = 0
    if HAS_TV:
        tvt = _tile(_tangent_head(TV, stv, c, z, hk), offs_n, offs_dv, stv[3], Tk, DV, DT)
    ks = (kt, vt, tkt, tvt)
    zeros = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    dk_acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo = 0
    if CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    for grp in range(0, GROUPS):
        h = hk * GROUPS + grp
        bh = z * H + h
        q_base = _head(Q, sq, z, h)
        tq_base = _tangent_head(TQ, stq, c, z, h)
        g_base = _head(G, sg, z, h)
        do_base = _tangent_head(DOF, sc, c, z, h)
        mask_base = _head(Mask, msk, z, h)
        row0 = bh * Tq
        crow0 = (c * n_bh + bh) * Tq
        for start_m in range(lo, Tq, BLOCK_M):
            offs_m = start_m + offs_m0
            row_ok = offs_m < Tq
            q = _tile(q_base, offs_m, offs_d, sq[2], Tq, D, DT)
            row_max, inv_l = _row_stats(STATS, n_bh, Tq, row0, offs_m, row_ok)
            st = _scores(
                q, kt, sm_scale, mask_base, offs_m, offs_n, Tq, Tk, msk, CAUSAL, MASK, True, PREC
            )
            tq = (tq_base, offs_m, offs_d, stq[3], Tq, D)
            do = (do_base, offs_m, offs_dv, sc[3], Tq, DV)
            g = (g_base, offs_m, offs_dv, sg[2], Tq, DV)
            dt = (DELTA, crow0, offs_m, row_ok)
            mu = (MU, crow0, offs_m, row_ok)
            d0 = (D0, row0, offs_m, row_ok)
            dk_acc, dv_acc = _bwd_step(
                st, (q, tq, do, g), ks, (row_max, inv_l, dt, mu, d0), zeros, dk_acc, dv_acc,
                sm_scale, FIRST, SECOND, HAS_TQ, HAS_TK, HAS_TV, SDOT, NEED_DK, NEED_DV, True, ET,
                RNE, DT, PREC,
            )  # fmt: skip

    col_ok = offs_n < Tk
    krow0 = (c * n_bhk + bhk) * Tk
    if NEED_DK:
        dk_off = (krow0 + offs_n[:, None]) * D + offs_d[None, :]
        dk_mask = col_ok[:, None] & (offs_d[None, :] < D)
        tl.store(DK + dk_off, _round(dk_acc * sm_scale, ET, RNE), mask=dk_mask)
    if NEED_DV:
        dv_off = (krow0 + offs_n[:, None]) * DV + offs_dv[None, :]
        dv_mask = col_ok[:, None] & (offs_dv[None, :] < DV)
        tl.store(DVo + dv_off, _round(dv_acc, ET, RNE), mask=dv_mask)


@triton.jit
def _sdpa_bwd_q_kernel(
    Q,
    Kp,
    V,
    TQ,
    TK,
    TV,
    Mask,
    G,
    DOF,
    STATS,
    MU,
    DELTA,
    D0,
    DQ,
    sq,
    sk,
    sv,
    stq,
    stk,
    stv,
    sg,
    sc,
    msk,
    sm_scale,
    Tq,
    Tk,
    H,
    GROUPS,
    D: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr,
    MASK: tl.constexpr,
    FIRST: tl.constexpr,
    SECOND: tl.constexpr,
    HAS_TQ: tl.constexpr,
    HAS_TK: tl.constexpr,
    HAS_TV: tl.constexpr,
    SDOT: tl.constexpr,
    PREC: tl.constexpr,
    DT: tl.constexpr,
    RNE: tl.constexpr,
):
    """``dQ`` (or its tangent) of one query block of one ``(z, h)`` for cotangent
    ``c = program_id(1)``, looping over key/value blocks; arguments as in
    :func:`_sdpa_bwd_kv_kernel`. Grid ``(⌈Tq/BLOCK_M⌉·Z·H, C)``."""
    ET = Q.dtype.element_ty
    pid_m, bh, c, n_bh, z, h, hk, offs_m = _query_program(H, GROUPS, Tq, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < Tq
    row0 = bh.to(tl.int64) * Tq
    crow0 = (c * n_bh + bh) * Tq
    k_base, v_base, tk_base, tv_base = _key_heads(Kp, V, TK, TV, sk, sv, stk, stv, c, z, hk)
    mask_base = _head(Mask, msk, z, h)
    q = _tile(_head(Q, sq, z, h), offs_m, offs_d, sq[2], Tq, D, DT)
    row_max, inv_l = _row_stats(STATS, n_bh, Tq, row0, offs_m, row_ok)
    dt = _rows(DELTA, crow0, offs_m, row_ok)
    do = _tile(_tangent_head(DOF, sc, c, z, h), offs_m, offs_dv, sc[3], Tq, DV, DT) if FIRST else 0
    g = _tile(_head(G, sg, z, h), offs_m, offs_dv, sg[2], Tq, DV, DT) if SECOND else 0
    tq = _tile(_tangent_head(TQ, stq, c, z, h), offs_m, offs_d, stq[3], Tq, D, DT) if HAS_TQ else 0
    mu = _rows(MU, crow0, offs_m, row_ok) if SDOT else 0
    d0 = _rows(D0, row0, offs_m, row_ok) if SDOT else 0
    qs = (q, tq, do, g)
    rs = (row_max, inv_l, dt, mu, d0)
    zeros = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    dq_acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, _key_end(pid_m, Tk, BLOCK_M, CAUSAL), BLOCK_N):
        offs_n = start_n + offs_n0
        kt = _tile(k_base, offs_n, offs_d, sk[2], Tk, D, DT)
        vt = _tile(v_base, offs_n, offs_dv, sv[2], Tk, DV, DT)
        s = _scores(
            q, kt, sm_scale, mask_base, offs_m, offs_n, Tq, Tk, msk, CAUSAL, MASK, False, PREC
        )
        tkt = (tk_base, offs_n, offs_d, stk[3], Tk, D)
        tvt = (tv_base, offs_n, offs_dv, stv[3], Tk, DV)
        dq_acc, _ = _bwd_step(
            s, qs, (kt, vt, tkt, tvt), rs, zeros, dq_acc, 0, sm_scale, FIRST, SECOND, HAS_TQ,
            HAS_TK, HAS_TV, SDOT, True, False, False, ET, RNE, DT, PREC,
        )  # fmt: skip

    dq_off = (crow0 + offs_m[:, None]) * D + offs_d[None, :]
    dq_mask = row_ok[:, None] & (offs_d[None, :] < D)
    tl.store(DQ + dq_off, _round(dq_acc * sm_scale, ET, RNE), mask=dq_mask)


# ---- host side -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Blocks:
    """Tile sizes and launch shape of one kernel."""

    m: int
    n: int
    warps: int
    stages: int


#: GPU tiles ``(BLOCK_M, BLOCK_N, num_warps)`` per kernel, per ``(16-bit operands, wide head dim
#: > 64, heavy)``: "heavy" is a program carrying tangent state (the forward with tangents, the HVP's
#: tangent launch of the backward); the others run flash attention 2's work. Chosen from the
#: register and shared-memory use of the sm_90 compilation (``triton.compile`` for
#: ``GPUTarget("cuda", 90, 32)``, ``cuobjdump --dump-resource-usage``), not from timings (none were
#: possible while writing this): for 16-bit operands the largest tiles whose unmasked kernels
#: compile without register spills (masked ones spill a few bytes), flash attention 2's shapes
#: where they fit. Float32 operands (3×TF32 products) need more registers: their heavy kernels
#: spill at every tile size (bytes at head dim 64, kilobytes at 128, where the tiles are those
#: that stay under the 227 KiB of shared memory an H100 block may use); bf16/fp16 is the fast path.
_GPU_TILES = {
    ("fwd", True, False, False): (128, 64, 8),
    ("fwd", True, False, True): (128, 64, 8),
    ("fwd", True, True, False): (128, 64, 8),
    ("fwd", True, True, True): (128, 32, 8),
    ("kv", True, False, False): (32, 128, 8),
    ("kv", True, False, True): (32, 128, 8),
    ("kv", True, True, False): (64, 64, 8),
    ("kv", True, True, True): (32, 32, 8),
    ("q", True, False, False): (128, 64, 8),
    ("q", True, False, True): (128, 32, 8),
    ("q", True, True, False): (128, 32, 8),
    ("q", True, True, True): (64, 32, 8),
    ("fwd", False, False, False): (64, 32, 4),
    ("fwd", False, False, True): (64, 16, 4),
    ("fwd", False, True, False): (64, 32, 4),
    ("fwd", False, True, True): (64, 16, 4),
    ("kv", False, False, False): (32, 32, 8),
    ("kv", False, False, True): (16, 16, 4),
    ("kv", False, True, False): (32, 32, 8),
    ("kv", False, True, True): (16, 16, 8),
    ("q", False, False, False): (64, 16, 4),
    ("q", False, False, True): (64, 16, 4),
    ("q", False, True, False): (64, 16, 4),
    ("q", False, True, True): (16, 16, 4),
}

#: Interpreter tiles: ``tl.dot`` needs ≥ 16, and small tiles make the small test shapes span
#: several tiles, masked tails and (``BLOCK_M ≠ BLOCK_N`` in the backward) the causal bounds.
_INTERPRETER_TILES = {"fwd": (16, 16, 4), "kv": (16, 32, 4), "q": (32, 16, 4)}


def _blocks(kind: str, dtype: torch.dtype, d: int, dv: int, heavy: bool) -> _Blocks:
    """Tiles of kernel ``kind`` (``"fwd"``, ``"kv"``: the ``dK dV`` kernel, ``"q"``: the ``dQ``
    kernel) for head dims ``d``, ``dv`` (see :data:`_GPU_TILES`)."""
    if INTERPRETED:
        return _Blocks(*_INTERPRETER_TILES[kind], stages=1)
    half = dtype != torch.float32
    wide = max(d, dv) > 64
    return _Blocks(*_GPU_TILES[(kind, half, wide, heavy)], stages=2)


def _precision() -> str:
    """``tl.dot`` input precision for fp32 operands, following torch's float32 matmul setting:
    3×TF32 (fp32-level accuracy on tensor cores) under ``"highest"``, TF32 otherwise. Ignored for
    16-bit operands."""
    if torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "tf32x3"


def _dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """The ``tl.dot`` operand type: the input dtype, except bfloat16 in the interpreter (fp32, see
    the module docstring; operands are first rounded to bfloat16, so the values are the GPU's)."""
    if INTERPRETED and dtype == torch.bfloat16:
        return tl.float32
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[
        dtype
    ]


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


@dataclass
class _Geometry:
    """Shapes of one call, the mask as a ``[Z, H, Tq, Tk]`` strided view, the launch switches."""

    out_shape: tuple
    dtype: torch.dtype
    z: int
    h: int
    hkv: int
    tq: int
    tk: int
    d: int
    dv: int
    scale: float
    causal: bool
    mask: Tensor | None
    mask_kind: int
    prec: str
    dot_dtype: tl.dtype
    rne: bool

    @property
    def groups(self) -> int:
        return self.h // self.hkv

    def mask_args(self, like: Tensor) -> tuple[Tensor, tuple]:
        """The mask's pointer and strides ``(z, h, query, key)`` (``like`` and zeros without one:
        never read)."""
        if self.mask is None:
            return like, (0, 0, 0, 0)
        mask = self.mask.view(torch.uint8) if self.mask_kind == _BOOL_MASK else self.mask
        return mask, tuple(mask.stride())

    def launch(self, kernel, kind: str, heavy: bool, programs: tuple, *args, **flags) -> None:
        """Launch ``kernel`` (``kind`` and ``heavy`` as in :func:`_blocks`) on the grid
        ``(blocks of its own axis × heads, C)`` for ``programs = (heads, C)`` (key blocks for
        ``"kv"``, query blocks otherwise) with ``args``, ``flags`` and the arguments every kernel
        takes, on the device of ``args[0]``."""
        blk = _blocks(kind, self.dtype, self.d, self.dv, heavy)
        n_blocks = triton.cdiv(self.tk, blk.n) if kind == "kv" else triton.cdiv(self.tq, blk.m)
        heads, c = programs
        grid = (n_blocks * heads, c)
        if grid[0] > MAX_GRID_0 or c > MAX_GRID_1:
            raise ValueError(f"attention launch grid {grid} exceeds ({MAX_GRID_0}, {MAX_GRID_1})")
        with on_device(args[0]):
            kernel[grid](
                *args,
                **flags,
                sm_scale=self.scale,
                Tq=self.tq,
                Tk=self.tk,
                H=self.h,
                GROUPS=self.groups,
                D=self.d,
                DV=self.dv,
                BLOCK_M=blk.m,
                BLOCK_N=blk.n,
                BLOCK_D=_pad(self.d),
                BLOCK_DV=_pad(self.dv),
                CAUSAL=self.causal,
                MASK=self.mask_kind,
                PREC=self.prec,
                DT=self.dot_dtype,
                RNE=self.rne,
                num_warps=blk.warps,
                num_stages=blk.stages,
            )


def _heads(x: Tensor) -> tuple[tuple, int]:
    """Leading (batch) axes and head count of ``x [..., H, T, D]`` (``H = 1`` for 2-D)."""
    if x.dim() == 2:
        return (), 1
    return tuple(x.shape[:-3]), x.shape[-3]


def _geometry(call: Call) -> _Geometry:
    q, k, v, mask, _dropout_p, is_causal, scale, _gqa = call.args
    lead, h = _heads(q)
    hkv = _heads(k)[1]
    tq, d = q.shape[-2:]
    tk, dv = v.shape[-2:]
    z = math.prod(lead)
    out_shape = (*q.shape[:-1], dv)
    m4 = None
    if mask is not None:
        m4 = mask.expand(*q.shape[:-1], tk).reshape(z, h, tq, tk)
    return _geometry_of(out_shape, q.dtype, z, h, hkv, tq, tk, d, dv, scale, is_causal, m4)


def _geometry_of(
    out_shape: tuple,
    dtype: torch.dtype,
    z: int,
    h: int,
    hkv: int,
    tq: int,
    tk: int,
    d: int,
    dv: int,
    scale: float | None,
    is_causal: bool,
    m4: Tensor | None,
) -> _Geometry:
    """The geometry from the shapes; ``m4`` is the ``[Z, H, Tq, Tk]`` mask view."""
    kind = _NO_MASK
    if m4 is not None:
        kind = _BOOL_MASK if m4.dtype == torch.bool else _FLOAT_MASK
    return _Geometry(
        out_shape=out_shape,
        dtype=dtype,
        z=z,
        h=h,
        hkv=hkv,
        tq=tq,
        tk=tk,
        d=d,
        dv=dv,
        scale=float(scale) if scale is not None else 1.0 / math.sqrt(d),
        causal=bool(is_causal),
        mask=m4,
        mask_kind=kind,
        prec=_precision(),
        dot_dtype=_dot_dtype(dtype),
        rne=INTERPRETED and dtype == torch.bfloat16,
    )


def _unit_last(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _view4(x: Tensor, z: int, h: int) -> Tensor:
    """``x [..., H, T, D]`` as ``[Z, H, T, D]`` (a view where the strides allow)."""
    return _unit_last(x.reshape(z, h, *x.shape[-2:]))


def _view5(x: Tensor | None, z: int, h: int, dtype: torch.dtype) -> Tensor | None:
    """A tangent ``[K, ..., H, T, D]`` as ``[K, Z, H, T, D]`` in ``dtype``."""
    if x is None:
        return None
    return _unit_last(x.to(dtype).reshape(x.shape[0], z, h, *x.shape[-2:]))


def _strides(x: Tensor | None, n: int) -> tuple:
    """The first ``n`` strides of ``x`` (zeros for an absent operand)."""
    return tuple(x.stride()[:n]) if x is not None else (0,) * n


def _qkv_args(
    q: Tensor, k: Tensor, v: Tensor, tq: Tensor | None, tk: Tensor | None, tv: Tensor | None
) -> tuple[tuple, tuple]:
    """The kernels' pointers ``Q, Kp, V, TQ, TK, TV`` (``q`` standing in for an absent tangent:
    never read) and strides ``sq, sk, sv, stq, stk, stv``."""
    tangents = (tq, tk, tv)
    pointers = (q, k, v, *(t if t is not None else q for t in tangents))
    strides = (*(_strides(x, 3) for x in (q, k, v)), *(_strides(t, 4) for t in tangents))
    return pointers, strides


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``Σ_d a ⊙ b`` over the last axis in fp32, broadcasting ``[.., Z, H, T, Dv]`` operands, as
    ``[..., Z·H, T]``."""
    r = (a.float() * b.float()).sum(-1)
    return r.reshape(*r.shape[:-3], -1, r.shape[-1])


def _op_geometry(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, causal: bool
) -> _Geometry:
    """The geometry inside an op, from ``q [Z, H, Tq, D]``, ``k [Z, Hkv, Tk, D]``,
    ``v [Z, Hkv, Tk, Dv]`` and the ``[Z, H, Tq, Tk]`` mask view."""
    z, h, tq, d = q.shape
    hkv, tk, dv = k.shape[1], k.shape[2], v.shape[3]
    return _geometry_of((), q.dtype, z, h, hkv, tq, tk, d, dv, scale, causal, mask)


def _fwd_shapes(
    q: Tensor, v: Tensor, n: int, tangent: bool, sdot: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The empty outputs ``(O [Z, H, Tq, Dv], (m, 1/l) [2, Z·H, Tq], Ȯ [n, Z, H, Tq, Dv],
    μ̇ [n, Z·H, Tq])`` of :func:`_fwd_op` (:func:`absent` without tangents / without ``Ṡ``)."""
    z, h, tq, _ = q.shape
    dv = v.shape[3]
    f32 = {"dtype": torch.float32, "device": q.device}
    o = torch.empty(z, h, tq, dv, dtype=q.dtype, device=q.device)
    stats = torch.empty(2, z * h, tq, **f32)
    od = torch.empty(n, z, h, tq, dv, dtype=q.dtype, device=q.device) if tangent else absent(q)
    mu = torch.empty(n, z * h, tq, **f32) if sdot else absent(q)
    return o, stats, od, mu


@torch.library.custom_op("hessfast::triton_sdpa_fwd_jvp", mutates_args=())
def _fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tq: Tensor | None,
    tk: Tensor | None,
    tv: Tensor | None,
    mask: Tensor | None,
    scale: float,
    causal: bool,
    n: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The forward kernel: ``q, k, v`` as ``[Z, H(kv), T, D]``, their tangents
    ``[n, Z, H(kv), T, D]`` or ``None`` (any strides; copied when the last one is not 1), the mask
    as a ``[Z, H, Tq, Tk]`` view or ``None``. Returns :func:`_fwd_shapes`' tensors, written."""
    q, k, v, tq, tk, tv = (None if t is None else _unit_last(t) for t in (q, k, v, tq, tk, tv))
    geo = _op_geometry(q, k, v, mask, scale, causal)
    sdot = tq is not None or tk is not None
    tangent = sdot or tv is not None
    o, stats, od, mu = _fwd_shapes(q, v, n, tangent, sdot)
    pointers, strides = _qkv_args(q, k, v, tq, tk, tv)
    mask, msk = geo.mask_args(q)
    geo.launch(
        _sdpa_fwd_kernel,
        "fwd",
        tangent,
        (geo.z * geo.h, n if tangent else 1),
        *pointers,
        mask,
        o,
        od if tangent else o,
        stats,
        mu if sdot else stats,
        *strides,
        msk,
        HAS_TQ=tq is not None,
        HAS_TK=tk is not None,
        HAS_TV=tv is not None,
        SDOT=sdot,
        TANGENT=tangent,
    )
    return o, stats, od, mu


@_fwd_op.register_fake
def _(q, k, v, tq, tk, tv, mask, scale, causal, n):
    sdot = tq is not None or tk is not None
    return _fwd_shapes(q, v, n, sdot or tv is not None, sdot)


def _bwd_shapes(
    q: Tensor, k: Tensor, v: Tensor, c: int, need_q: bool, need_k: bool, need_dv: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """The empty outputs ``(dQ [C, Z·H, Tq, D], dK [C, Z·Hkv, Tk, D], dV [C, Z·Hkv, Tk, Dv])`` of
    :func:`_bwd_op` (:func:`absent` where not needed)."""
    z, h, tq, d = q.shape
    hkv, tk, dv = k.shape[1], k.shape[2], v.shape[3]
    like = {"dtype": q.dtype, "device": q.device}
    return (
        torch.empty(c, z * h, tq, d, **like) if need_q else absent(q),
        torch.empty(c, z * hkv, tk, d, **like) if need_k else absent(q),
        torch.empty(c, z * hkv, tk, dv, **like) if need_dv else absent(q),
    )


@torch.library.custom_op("hessfast::triton_sdpa_bwd_jvp", mutates_args=())
def _bwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    tq: Tensor | None,
    tk: Tensor | None,
    tv: Tensor | None,
    mask: Tensor | None,
    second: Tensor | None,
    first: Tensor | None,
    stats: Tensor,
    mu: Tensor | None,
    dt: Tensor,
    d0: Tensor | None,
    scale: float,
    causal: bool,
    c: int,
    need_q: bool,
    need_k: bool,
    need_v: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """One launch of each backward kernel (see :meth:`TritonScaledDotProductAttention._backward`):
    the input tangents (``tq, tk, tv``, ``mu``) only with ``second``; returns ``(dQ, dK, dV)`` as
    in :func:`_bwd_shapes`."""
    q, k, v, tq, tk, tv, second, first = (
        None if t is None else _unit_last(t) for t in (q, k, v, tq, tk, tv, second, first)
    )
    stats, mu, dt, d0 = (None if t is None else t.contiguous() for t in (stats, mu, dt, d0))
    geo = _op_geometry(q, k, v, mask, scale, causal)
    sdot = tq is not None or tk is not None
    need_dv = need_v and (first is not None or sdot)
    flags = dict(
        FIRST=first is not None,
        SECOND=second is not None,
        HAS_TQ=tq is not None,
        HAS_TK=tk is not None,
        HAS_TV=tv is not None,
        SDOT=sdot,
    )
    pointers, strides = _qkv_args(q, k, v, tq, tk, tv)
    mask, msk = geo.mask_args(q)
    pointers = (
        *pointers,
        mask,
        second if second is not None else q,
        first if first is not None else q,
        stats,
        mu if sdot else stats,
        dt,
        d0 if d0 is not None else stats,
    )
    strides = (*strides, _strides(second, 3), _strides(first, 4), msk)
    heavy = second is not None
    bh, bhk = geo.z * geo.h, geo.z * geo.hkv
    dq, dk, dv = _bwd_shapes(q, k, v, c, need_q, need_k, need_dv)
    if need_k or need_dv:
        like = {"dtype": q.dtype, "device": q.device}
        geo.launch(
            _sdpa_bwd_kv_kernel,
            "kv",
            heavy,
            (bhk, c),
            *pointers,
            dk if need_k else torch.empty(c, bhk, geo.tk, geo.d, **like),
            dv if need_dv else torch.empty(c, bhk, geo.tk, geo.dv, **like),
            *strides,
            HKV=geo.hkv,
            **flags,
            NEED_DK=need_k,
            NEED_DV=need_dv,
        )
    if need_q:
        geo.launch(_sdpa_bwd_q_kernel, "q", heavy, (bh, c), *pointers, dq, *strides, **flags)
    return dq, dk, dv


@_bwd_op.register_fake
def _(q, k, v, tq, tk, tv, mask, second, first, stats, mu, dt, d0, scale, causal, c, nq, nk, nv):
    need_dv = nv and (first is not None or tq is not None or tk is not None)
    return _bwd_shapes(q, k, v, c, nq, nk, need_dv)


@dataclass
class _Saved:
    """Residuals of one call: everything ``O(T)``."""

    geo: _Geometry
    q: Tensor
    k: Tensor
    v: Tensor
    tq: Tensor | None
    tk: Tensor | None
    tv: Tensor | None
    o: Tensor
    od: Tensor | None
    stats: Tensor
    mu: Tensor | None
    active: tuple
    shapes: tuple
    k_count: int


class TritonScaledDotProductAttention(TritonRule):
    """Flash-style forward-over-reverse rule for SDPA (see the module docstring)."""

    ops = (aten.scaled_dot_product_attention.default,)
    name = "scaled_dot_product_attention"
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    tolerances = {
        torch.float32: (1e-4, 1e-5),
        torch.bfloat16: (1e-2, 1e-2),
        torch.float16: (2e-3, 2e-3),
    }

    def not_supported_reasons(self, call: Call) -> list[str]:
        why = _REFERENCE.declines(call)
        if why:
            return [why]
        q, k, v, mask, _dropout_p, _causal, _scale, enable_gqa = call.args
        out = []
        if len({q.dtype, k.dtype, v.dtype}) > 1:
            out.append("q, k, v of mixed dtypes")
        if len({q.device, k.device, v.device}) > 1:
            out.append("q, k, v on different devices")
        if q.dim() != k.dim() or q.dim() != v.dim():
            out.append("q, k, v of different ranks (the kernels do not broadcast batch axes)")
        else:
            (lq, hq), (lk, hk), (lv, hv) = _heads(q), _heads(k), _heads(v)
            if not lq == lk == lv:
                out.append(
                    f"batch axes differ between q {list(lq)}, k {list(lk)}, v {list(lv)} "
                    "(the kernels do not broadcast them)"
                )
            if hk != hv or (hk != hq and not enable_gqa):
                out.append(
                    f"key/value heads ({hk}, {hv}) differ from the query heads ({hq}) without "
                    "enable_gqa (the kernels do not broadcast heads)"
                )
        d, dv = q.shape[-1], v.shape[-1]
        if max(d, dv) > _MAX_HEAD_DIM:
            out.append(f"head dim {max(d, dv)} > {_MAX_HEAD_DIM} (the tiles would not fit)")
        if 0 in (*q.shape, *k.shape, *v.shape):
            out.append("empty q, k or v")
        if call.k > MAX_GRID_1:
            out.append(f"{call.k} tangents: the launch grid takes at most {MAX_GRID_1}")
        if mask is not None:
            want = (*q.shape[:-1], k.shape[-2])
            try:
                fits = torch.broadcast_shapes(mask.shape, want) == torch.Size(want)
            except RuntimeError:
                fits = False
            if not fits:
                out.append(
                    f"attention mask {list(mask.shape)} is not broadcastable to [..., H, Tq, Tk] "
                    f"= {list(want)}"
                )
            if mask.device != q.device:
                out.append("attention mask on another device than q")
        return out

    def device_reasons(self, device: torch.device, dtype: torch.dtype | None = None) -> list[str]:
        out = super().device_reasons(device, dtype)
        if torch.version.hip and dtype == torch.float32:
            out.append(
                "float32 attention multiplies in 3×TF32 (input_precision='tf32x3'), which Triton's "
                "AMD backend rejects; use bfloat16/float16 or the torch rule"
            )
        return out

    def auto_reasons(self, call: Call) -> list[str]:
        """Unmeasured (:data:`hessfast.dispatch.MEASURED`): automatic dispatch keeps the torch
        rule, except where that cannot run: its ``[K + 2, ..., H, Tq, Tk]`` scores and
        probabilities would not fit in the device's free memory (:func:`math_attention_bytes`)."""
        why = super().auto_reasons(call)
        if not why:
            return why
        need = math_attention_bytes(call)
        if need < _SMALL:
            return why
        free = _free_bytes(call.args[0].device)
        if free is not None and need > free:
            return []
        return why

    def fwd_jvp(self, call: Call):
        q, k, v = call.args[:3]
        geo = _geometry(call)
        n = call.k
        q4, k4, v4 = _view4(q, geo.z, geo.h), _view4(k, geo.z, geo.hkv), _view4(v, geo.z, geo.hkv)
        tq, tk, tv = (
            _view5(call.tangents[i], geo.z, hh, q.dtype)
            if n and call.is_active(i) and call.tangents[i] is not None
            else None
            for i, hh in ((0, geo.h), (1, geo.hkv), (2, geo.hkv))
        )
        sdot = tq is not None or tk is not None
        tangent = sdot or tv is not None
        o, stats, od, mu = _fwd_op(q4, k4, v4, tq, tk, tv, geo.mask, geo.scale, geo.causal, n)
        od = od if tangent else None
        mu = mu if sdot else None
        active = tuple(call.is_active(i) for i in range(3))
        saved = _Saved(
            geo, q4, k4, v4, tq, tk, tv, o, od, stats, mu, active, (q.shape, k.shape, v.shape), n
        )
        y = o.view(geo.out_shape)
        ydot = od.view(n, *geo.out_shape) if od is not None else None
        return y, ydot, saved

    def bwd_jvp(self, res: _Saved, g, gdot):
        geo = res.geo
        need_q, need_k, need_v = res.active
        g4 = _view4(g, geo.z, geo.h) if g is not None else None
        gd5 = _view5(gdot, geo.z, geo.h, res.q.dtype) if gdot is not None else None
        grads, tangents = [None] * 3, [None] * 3
        d0 = _rowdot(g4, res.o) if g4 is not None else None
        if g4 is not None:
            grads = self._backward(
                res, first=g4.unsqueeze(0), dt=d0.unsqueeze(0), second=None, d0=None
            )
        has_tan = res.od is not None
        second = g4 is not None and has_tan
        if res.k_count and (gd5 is not None or second):
            dt = _rowdot(gd5, res.o) if gd5 is not None else None
            if second:
                extra = _rowdot(g4, res.od)
                dt = extra if dt is None else dt + extra
            tangents = self._backward(
                res, first=gd5, dt=dt, second=g4 if second else None, d0=d0 if second else None
            )
        q_shape, k_shape, v_shape = res.shapes
        gq, gk, gv = grads
        tq_, tk_, tv_ = tangents
        n = res.k_count
        return (
            (
                _shape(gq, q_shape, need_q),
                _shape(gk, k_shape, need_k),
                _shape(gv, v_shape, need_v),
                *nones(5),
            ),
            (
                _shape(tq_, (n, *q_shape), need_q),
                _shape(tk_, (n, *k_shape), need_k),
                _shape(tv_, (n, *v_shape), need_v),
                *nones(5),
            ),
        )

    def _backward(self, res: _Saved, first, dt, second, d0):
        """One launch of each backward kernel for ``C`` cotangents: ``first [C, Z, H, Tq, Dv]``
        (``ḡ`` as ``C = 1``, or the ``ġ_k``) with its row sums ``dt [C, Z·H, Tq]``, and, for the
        tangent launch of an HVP, the second-order terms from ``second = ḡ [Z, H, Tq, Dv]`` and
        the saved input tangents. Returns ``(dQ, dK, dV)`` as ``[C, Z·…]`` tensors or ``None``."""
        geo = res.geo
        need_q, need_k, need_v = res.active
        c = first.shape[0] if first is not None else res.k_count
        tq, tk, tv = (res.tq, res.tk, res.tv) if second is not None else (None, None, None)
        sdot = tq is not None or tk is not None
        need_dv = need_v and (first is not None or sdot)
        dq, dk, dv = _bwd_op(
            res.q,
            res.k,
            res.v,
            tq,
            tk,
            tv,
            geo.mask,
            second,
            first,
            res.stats,
            res.mu if sdot else None,
            dt,
            d0,
            geo.scale,
            geo.causal,
            c,
            need_q,
            need_k,
            need_v,
        )
        return (dq if need_q else None), (dk if need_k else None), (dv if need_dv else None)


def math_attention_bytes(call: Call) -> int:
    """A lower bound on what the torch (math) rule allocates for one call: the scores, the
    probabilities and their K tangents, ``(K + 2)·Z·H·Tq·Tk`` elements."""
    q, k = call.args[0], call.args[1]
    rows = math.prod(q.shape[:-1])  # Z·H·Tq
    return (call.k + 2) * rows * int(k.shape[-2]) * q.element_size()


#: Below this many bytes the math rule is assumed to fit (no device query).
_SMALL = 1 << 28


def _free_bytes(device: torch.device) -> int | None:
    """Free device memory, counting what torch's caching allocator holds unused (``None``: not a
    CUDA device)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _shape(x: Tensor | None, shape: tuple, needed: bool) -> Tensor | None:
    """A kernel result ``[C, Z·H, T, D]`` as ``shape`` (``C = 1`` dropped for primal cotangents)."""
    if x is None or not needed:
        return None
    return x.reshape(shape)


IMPLEMENTATIONS = [TritonScaledDotProductAttention()]
