"""Triton implementation of the normalisation rules (``aten.layer_norm``, ``aten.rms_norm``).

Same math and contract as :mod:`hessfast.rules.layer_norm` (read its docstring for the
derivation); here the rows are fused. Index conventions: the normalised dims (the last
``len(normalized_shape)`` dims) are flattened into one row of length ``D``, the leading dims into
``N`` rows: ``x [N, D]``, ``γ, β [D]``; tangents carry a leading K: ``ẋ [K, N, D]``,
``γ̇, β̇ [K, D]``, ``ġ [K, N, D]``. Per row ``n`` (``mean`` over the ``D`` columns)::

    m = mean(x)   (layer norm; m = 0 for RMS norm),   r = (mean((x − m)²) + eps)^(−1/2)
    x̂ = (x − m) r,   y = γ x̂ + β
    a_k = mean(x̂ ẋ_k),   t_k = mean(ẋ_k) (layer norm; 0 for RMS),   ẋ̂_k = r (ẋ_k − t_k − x̂ a_k)
    ẏ_k = γ ẋ̂_k + γ̇_k x̂ + β̇_k

Backward, with ``P(c) = c − [mean(c)] − x̂ mean(x̂ c)`` and ``c = γ ḡ``, ``ċ_k = γ ġ_k + γ̇_k ḡ``::

    ḡ_x = r P(c),   ġ_x,k = r P(ċ_k) − r (r a_k P(c) + ẋ̂_k mean(x̂ c) + x̂ mean(ẋ̂_k c))
    ḡ_γ = Σ_n ḡ x̂,   ġ_γ,k = Σ_n (ġ_k x̂ + ḡ ẋ̂_k),   ḡ_β = Σ_n ḡ,   ġ_β,k = Σ_n ġ_k

(the terms with ``ḡ`` next to a tangent are second order; they vanish in GGN mode, where ``ḡ`` is
``None``).

Kernels:

- :func:`_norm_fwd_kernel`: one program per tile of ``BLOCK_R`` rows × ``BLOCK_D ≥ D`` columns
  (a whole row in one block): the row statistics ``m, r`` in fp32 (two passes over registers, not
  over memory), ``y``, then a loop over the K tangents computing ``a_k``, ``t_k`` and ``ẏ_k``.
  ``x`` is read once for all K. It saves ``m, r [N]`` and ``a, t [K, N]`` (fp32) for the backward.
- :func:`_norm_bwd_kernel`: grid ``(J, G)`` with ``J = [ḡ present] + K`` "cotangent programs"
  (``j = 0`` the primal ``ḡ`` when present, then one per tangent ``k``; the primal program is the
  tangent formula with ``u = ḡ`` and ``ẋ = γ̇ = 0``) and ``G`` groups of consecutive rows. Each
  program recomputes ``x̂`` (and ``ẋ̂_k``) from ``x``, ``ẋ_k`` and the saved statistics, writes
  ``ḡ_x`` or ``ġ_x,k`` for its rows and one row of partial sums of ``ḡ_γ``/``ġ_γ,k`` and
  ``ḡ_β``/``ġ_β,k`` into ``[J, G, D]`` fp32 buffers; ``torch.sum`` over ``G`` finishes them
  (deterministic: no atomics). The ``J`` programs of a row group are adjacent in launch order, so
  that their re-reads of ``x`` and ``ḡ`` can hit L2.

Half inputs are loaded and accumulated in fp32 and rounded once when stored, as the torch rule does.
Non-contiguous inputs are made contiguous first. Declines (with the reason): rows longer than
:data:`MAX_D` (one row must fit in one block), float64 (the oracle's precision; the torch rule is
the right tool), empty inputs, and shapes the torch rule also rejects.

Bytes moved per row (compulsory HBM traffic; ``e`` bytes per element of ``x``, its tangents and
cotangents; ``s = 2`` fp32 statistics per row for layer norm (``m, r``), ``1`` for RMS norm (``r``);
``[·]`` is 1 when the thing is present). ``γ, β, γ̇, β̇`` (``(1 + K) D`` elements) and the
``[J, G, D]`` fp32 partial sums (written once, read once, ``G ≤ 1024 / J``) are per call:

- ``fwd_jvp``: ``e D (2 + [ẋ] K + [any tangent] K) + 4 s (1 + [ẋ] K)``
  (reads ``x``, ``ẋ``; writes ``y``, ``ẏ``, the statistics and ``a, t``);
- ``bwd_jvp``: ``e D (1 + [ḡ] + [ġ] K + [ḡ ∧ ẋ] K + [x active] ([ḡ] + [ġ_x ≠ 0] K))
  + 4 s (1 + [ḡ ∧ ẋ] K)``; by mode, with ``x`` active and ``ẋ`` present:
  hvp ``e D (3 + 3K) + 4 s (1 + K)``, hvp without ``ġ`` ``e D (3 + 2K) + 4 s (1 + K)``,
  GGN ``e D (1 + 2K) + 4 s``, grad ``3 e D + 4 s``.

The ``J`` programs of one row group each load ``x`` (and ``ḡ``): the model counts that traffic
once, assuming L2 serves the repeats.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..rules.base import Call
from ..rules.layer_norm import LayerNormSchema, RMSNormSchema
from . import TritonRule, absent, on_device

Tensor = torch.Tensor
aten = torch.ops.aten

#: Longest row (product of ``normalized_shape``) taken: a row lives in one block of registers
#: (sm_90, 16 warps: the backward compiles without spills up to D = 4096 and with ~0.5 KB per
#: thread at 8192; at 16384 it would spill ~5 KB per thread).
MAX_D = 8192
#: Elements per ``[BLOCK_R, BLOCK_D]`` tile: short rows are batched so a tile stays this size.
TILE = 4096
#: Programs the backward aims to launch (``J × G``): enough to fill an H100/H200 several times
#: while keeping the ``[J, G, D]`` partial-sum buffers small.
BWD_PROGRAMS = 1024


@triton.jit
def _norm_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    tx_ptr,
    tw_ptr,
    tb_ptr,
    y_ptr,
    ydot_ptr,
    mean_ptr,
    rstd_ptr,
    a_ptr,
    t_ptr,
    N,
    D,
    ND,
    K,
    eps,
    CENTER: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    HAS_TX: tl.constexpr,
    HAS_TW: tl.constexpr,
    HAS_TB: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rows ``[pid·BLOCK_R, (pid+1)·BLOCK_R)``: ``y``, ``m``, ``r``, then for each ``k < K``
    ``ẏ_k``, ``a_k``, ``t_k`` (see the module docstring). ``x, y [N, D]``, ``ẋ, ẏ [K, N, D]``,
    ``γ, β [D]``, ``γ̇, β̇ [K, D]``, ``m, r [N]``, ``a, t [K, N]``; all contiguous; ``ND = N·D``."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < N
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if CENTER:
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        tl.store(mean_ptr + rows, mean, mask=rmask)
    else:
        xc = x
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / D + eps)
    tl.store(rstd_ptr + rows, rstd, mask=rmask)
    xhat = xc * rstd[:, None]
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        y = xhat * w
    else:
        y = xhat
    if HAS_B:
        y += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    if HAS_TX or HAS_TW or HAS_TB:
        tx_k = tx_ptr + offs
        ydot_k = ydot_ptr + offs
        for k in range(K):
            ydot = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
            if HAS_TX:
                t = tl.load(tx_k, mask=mask, other=0.0).to(tl.float32)
                a = tl.sum(xhat * t, axis=1) / D
                p = t - xhat * a[:, None]
                tl.store(a_ptr + k * N + rows, a, mask=rmask)
                if CENTER:
                    tmean = tl.sum(t, axis=1) / D
                    p -= tmean[:, None]
                    tl.store(t_ptr + k * N + rows, tmean, mask=rmask)
                txhat = p * rstd[:, None]
                if HAS_W:
                    ydot += txhat * w
                else:
                    ydot += txhat
            if HAS_TW:
                tw = tl.load(tw_ptr + k * D + cols, mask=cmask, other=0.0).to(tl.float32)
                ydot += tw[None, :] * xhat
            if HAS_TB:
                tb = tl.load(tb_ptr + k * D + cols, mask=cmask, other=0.0).to(tl.float32)
                ydot += tb[None, :]
            tl.store(ydot_k, ydot.to(ydot_ptr.dtype.element_ty), mask=mask)
            tx_k += ND
            ydot_k += ND


@triton.jit
def _norm_bwd_kernel(
    x_ptr,
    w_ptr,
    tw_ptr,
    tx_ptr,
    g_ptr,
    gdot_ptr,
    mean_ptr,
    rstd_ptr,
    a_ptr,
    t_ptr,
    gx_ptr,
    gdx_ptr,
    pw_ptr,
    pb_ptr,
    N,
    D,
    ND,
    NG,
    G,
    ROWS_PER_GROUP,
    CENTER: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_TW: tl.constexpr,
    HAS_TX: tl.constexpr,
    HAS_G: tl.constexpr,
    HAS_GDOT: tl.constexpr,
    STORE_GX: tl.constexpr,
    STORE_GDX: tl.constexpr,
    ACC_W: tl.constexpr,
    ACC_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program ``(j, grp)``: cotangent ``j`` (``j < NG``: the primal ``ḡ``; else tangent
    ``k = j − NG``) over rows ``[grp·ROWS_PER_GROUP, (grp+1)·ROWS_PER_GROUP)``, tiles of
    ``BLOCK_R`` rows. Writes ``ḡ_x`` / ``ġ_x,k`` rows and the partial sums
    ``pw[j, grp] = Σ_rows (u x̂ + ḡ ẋ̂_k)``, ``pb[j, grp] = Σ_rows u`` (``u = ḡ`` or ``ġ_k``)."""
    j = tl.program_id(0)
    grp = tl.program_id(1)
    primal = j < NG
    tangent = j >= NG
    kc = tl.maximum(j - NG, 0)
    k_nd = kc.to(tl.int64) * ND
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_TW:
        tw = tl.load(tw_ptr + kc * D + cols, mask=cmask & tangent, other=0.0).to(tl.float32)
    acc_w = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_D,), dtype=tl.float32)
    row0 = grp * ROWS_PER_GROUP
    for start in range(0, ROWS_PER_GROUP, BLOCK_R):
        rows = row0 + start + tl.arange(0, BLOCK_R)
        rmask = rows < N
        mask = rmask[:, None] & cmask[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)[:, None]
        if CENTER:
            mean = tl.load(mean_ptr + rows, mask=rmask, other=0.0)[:, None]
            xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        else:
            xhat = x * rstd
        u = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        if HAS_GDOT:
            u = tl.load(gdot_ptr + k_nd + offs, mask=mask & tangent, other=0.0).to(tl.float32)
        if HAS_G:
            g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            u = tl.where(primal, g, u)
        if HAS_W:
            cu = u * w
        else:
            cu = u
        if HAS_TW and HAS_G:
            cu += tw[None, :] * g
        out = cu - xhat * (tl.sum(xhat * cu, axis=1) / D)[:, None]
        if CENTER:
            out -= (tl.sum(cu, axis=1) / D)[:, None]
        out *= rstd
        if HAS_TX and HAS_G:
            t = tl.load(tx_ptr + k_nd + offs, mask=mask & tangent, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + kc * N + rows, mask=rmask & tangent, other=0.0)[:, None]
            p = t - xhat * a
            if HAS_W:
                c = g * w
            else:
                c = g
            mc = (tl.sum(xhat * c, axis=1) / D)[:, None]
            pc = c - xhat * mc
            if CENTER:
                p -= tl.load(t_ptr + kc * N + rows, mask=rmask & tangent, other=0.0)[:, None]
                pc -= (tl.sum(c, axis=1) / D)[:, None]
            txhat = p * rstd
            mdc = (tl.sum(txhat * c, axis=1) / D)[:, None]
            out -= rstd * (rstd * a * pc + txhat * mc + xhat * mdc)
        if STORE_GX:
            tl.store(gx_ptr + offs, out.to(gx_ptr.dtype.element_ty), mask=mask & primal)
        if STORE_GDX:
            tl.store(gdx_ptr + k_nd + offs, out.to(gdx_ptr.dtype.element_ty), mask=mask & tangent)
        if ACC_W:
            pw = u * xhat
            if HAS_TX and HAS_G:
                pw += g * txhat
            acc_w += tl.sum(pw, axis=0)
        if ACC_B:
            acc_b += tl.sum(u, axis=0)
    part = (j * G + grp).to(tl.int64) * D + cols
    if ACC_W:
        tl.store(pw_ptr + part, acc_w, mask=cmask)
    if ACC_B:
        tl.store(pb_ptr + part, acc_b, mask=cmask)


def _blocks(n: int, d: int) -> tuple[int, int, int]:
    """``(BLOCK_R, BLOCK_D, num_warps)`` for ``n`` rows of length ``d``."""
    block_d = triton.next_power_of_2(d)
    block_r = max(1, min(TILE // block_d, triton.next_power_of_2(n)))
    num_warps = min(max(block_r * block_d // 256, 1), 16)
    return block_r, block_d, num_warps


def _flat(t: Tensor | None, *shape: int) -> Tensor | None:
    return None if t is None else t.reshape(shape).contiguous()


class _Saved(NamedTuple):
    """What the backward needs: the inputs as contiguous rows and the fp32 row statistics (a
    tuple, so that byte counters that walk residuals see its tensors)."""

    x: Tensor  # [N, D]
    w: Tensor | None  # [D]
    tx: Tensor | None  # [K, N, D]
    tw: Tensor | None  # [K, D]
    mean: Tensor | None  # [N] (layer norm)
    rstd: Tensor  # [N]
    a: Tensor | None  # [K, N]
    tmean: Tensor | None  # [K, N] (layer norm)
    shape: tuple[int, ...]  # x's shape
    wshape: tuple[int, ...]  # normalized_shape
    k: int
    center: bool


def _fwd_shapes(
    x: Tensor, tx: Tensor | None, k: int, any_t: bool, center: bool
) -> tuple[Tensor, ...]:
    """The empty outputs ``(y, ẏ, m, r, a, t)`` of :func:`_fwd_op` for rows ``x [N, D]``
    (:func:`absent` where there is nothing to compute)."""
    n, d = x.shape
    f32 = {"device": x.device, "dtype": torch.float32}
    return (
        torch.empty((n, d), dtype=x.dtype, device=x.device),
        torch.empty((k, n, d), dtype=x.dtype, device=x.device) if any_t else absent(x),
        torch.empty(n, **f32) if center else absent(x),
        torch.empty(n, **f32),
        torch.empty((k, n), **f32) if tx is not None else absent(x),
        torch.empty((k, n), **f32) if tx is not None and center else absent(x),
    )


def _tangent_count(*tangents: Tensor | None) -> int:
    return next((t.shape[0] for t in tangents if t is not None), 0)


@torch.library.custom_op("hessfast::triton_norm_fwd_jvp", mutates_args=())
def _fwd_op(
    x: Tensor,
    w: Tensor | None,
    b: Tensor | None,
    tx: Tensor | None,
    tw: Tensor | None,
    tb: Tensor | None,
    eps: float,
    center: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward kernel on rows: ``x [N, D]``, ``w, b [D]``, ``tx [K, N, D]``, ``tw, tb [K, D]``
    → ``(y [N, D], ẏ [K, N, D], m [N], r [N], a [K, N], t [K, N])``, each output an empty tensor
    where :func:`norm_fwd_jvp` has ``None``."""
    x, w, b, tx, tw, tb = (None if t is None else t.contiguous() for t in (x, w, b, tx, tw, tb))
    n, d = x.shape
    k = _tangent_count(tx, tw, tb)
    any_t = k > 0 and any(t is not None for t in (tx, tw, tb))
    y, ydot, mean, rstd, a, tmean = _fwd_shapes(x, tx, k, any_t, center)
    block_r, block_d, warps = _blocks(n, d)
    with on_device(x):
        _norm_fwd_kernel[(triton.cdiv(n, block_r),)](
            x,
            w if w is not None else x,
            b if b is not None else x,
            tx if tx is not None else x,
            tw if tw is not None else x,
            tb if tb is not None else x,
            y,
            ydot if any_t else y,
            mean if center else rstd,
            rstd,
            a if tx is not None else rstd,
            tmean if tx is not None and center else rstd,
            n,
            d,
            n * d,
            k if any_t else 0,
            float(eps),
            CENTER=center,
            HAS_W=w is not None,
            HAS_B=b is not None,
            HAS_TX=tx is not None and k > 0,
            HAS_TW=tw is not None and k > 0,
            HAS_TB=tb is not None and k > 0,
            BLOCK_R=block_r,
            BLOCK_D=block_d,
            num_warps=warps,
        )
    return y, ydot, mean, rstd, a, tmean


@_fwd_op.register_fake
def _(x, w, b, tx, tw, tb, eps, center):
    k = _tangent_count(tx, tw, tb)
    any_t = k > 0 and any(t is not None for t in (tx, tw, tb))
    return _fwd_shapes(x, tx, k, any_t, center)


def norm_fwd_jvp(
    x: Tensor,
    normalized_shape: tuple[int, ...],
    w: Tensor | None,
    b: Tensor | None,
    eps: float,
    tx: Tensor | None,
    tw: Tensor | None,
    tb: Tensor | None,
    center: bool,
) -> tuple[Tensor, Tensor | None, _Saved]:
    """``(y, ẏ, saved)`` for layer norm (``center=True``) or RMS norm over the trailing
    ``normalized_shape``; ``ẏ [K, *x.shape]`` or ``None`` when every tangent is ``None``. The
    rows are flattened here and the kernel runs as ``hessfast::triton_norm_fwd_jvp``."""
    d = math.prod(normalized_shape)
    n = x.numel() // d
    k = _tangent_count(tx, tw, tb)
    x2 = _flat(x, n, d)
    w1, b1 = _flat(w, d), _flat(b, d)
    tx2, tw2, tb2 = _flat(tx, k, n, d), _flat(tw, k, d), _flat(tb, k, d)
    y, ydot, mean, rstd, a, tmean = _fwd_op(x2, w1, b1, tx2, tw2, tb2, float(eps), center)
    any_t = k > 0 and any(t is not None for t in (tx, tw, tb))
    saved = _Saved(
        x2,
        w1,
        tx2,
        tw2,
        mean if center else None,
        rstd,
        a if tx is not None else None,
        tmean if tx is not None and center else None,
        tuple(x.shape),
        tuple(normalized_shape),
        k,
        center,
    )
    ydot = ydot.reshape(k, *x.shape) if any_t else None
    return y.reshape(x.shape), ydot, saved


class _BwdPlan(NamedTuple):
    """Which cotangent programs of the backward produce something nonzero, and what they write."""

    has_tx: bool  # second-order terms of ẋ (needs ḡ)
    has_tw: bool  # second-order terms of γ̇ (needs ḡ)
    prim: bool  # the primal ḡ program
    tan_x: bool  # ġ_x
    tan_w: bool  # ġ_γ
    tan_b: bool  # ġ_β
    ng: int  # primal programs (0 or 1)
    nj: int  # all programs
    need: tuple[bool, bool, bool]  # x, γ, β active

    @property
    def store_gx(self) -> bool:
        return self.prim and self.need[0]


def _bwd_plan(
    k: int,
    has_g: bool,
    has_gdot: bool,
    tx: bool,
    tw: bool,
    need: tuple[bool, bool, bool],
) -> _BwdPlan:
    need_x, need_w, need_b = need
    has_gdot = has_gdot and k > 0
    has_tx = tx and has_g
    has_tw = tw and has_g
    prim = has_g and (need_x or need_w or need_b)
    tan_x = need_x and (has_gdot or has_tx or has_tw)
    tan_w = need_w and (has_gdot or has_tx)
    tan_b = need_b and has_gdot
    ng = 1 if prim else 0
    nk = k if (tan_x or tan_w or tan_b) else 0
    return _BwdPlan(has_tx, has_tw, prim, tan_x, tan_w, tan_b, ng, ng + nk, need)


def _bwd_shapes(
    x: Tensor, k: int, plan: _BwdPlan, w_dtype: torch.dtype, b_dtype: torch.dtype
) -> tuple[Tensor, ...]:
    """The empty outputs ``(ḡ_x [N, D], ġ_x [K, N, D], ḡ_γ [D], ġ_γ [K, D], ḡ_β [D], ġ_β [K, D])``
    of :func:`_bwd_op` (:func:`absent` where nothing is computed)."""
    n, d = x.shape
    _, need_w, need_b = plan.need
    dev = x.device
    return (
        torch.empty((n, d), dtype=x.dtype, device=dev) if plan.store_gx else absent(x),
        torch.empty((k, n, d), dtype=x.dtype, device=dev) if plan.tan_x else absent(x),
        torch.empty(d, dtype=w_dtype, device=dev) if plan.prim and need_w else absent(x),
        torch.empty((k, d), dtype=w_dtype, device=dev) if plan.tan_w else absent(x),
        torch.empty(d, dtype=b_dtype, device=dev) if plan.prim and need_b else absent(x),
        torch.empty((k, d), dtype=b_dtype, device=dev) if plan.tan_b else absent(x),
    )


@torch.library.custom_op("hessfast::triton_norm_bwd_jvp", mutates_args=())
def _bwd_op(
    x: Tensor,
    w: Tensor | None,
    tw: Tensor | None,
    tx: Tensor | None,
    g: Tensor | None,
    gdot: Tensor | None,
    mean: Tensor | None,
    rstd: Tensor,
    a: Tensor | None,
    tmean: Tensor | None,
    k: int,
    need_x: bool,
    need_w: bool,
    need_b: bool,
    w_dtype: torch.dtype,
    b_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward kernel on rows (the forward's ``x [N, D]``, ``w``, ``tw``, ``tx`` and
    statistics, ``g [N, D]``, ``gdot [K, N, D]``; ``mean`` absent for RMS norm) and the sums of its
    partial ``γ``/``β`` cotangents: ``(ḡ_x, ġ_x, ḡ_γ, ġ_γ, ḡ_β, ġ_β)`` as in
    :func:`_bwd_shapes`."""
    x, w, tw, tx, g, gdot, mean, rstd, a, tmean = (
        None if t is None else t.contiguous() for t in (x, w, tw, tx, g, gdot, mean, rstd, a, tmean)
    )
    center = mean is not None
    plan = _bwd_plan(k, g is not None, gdot is not None, tx is not None, tw is not None,
                     (need_x, need_w, need_b))  # fmt: skip
    gx, gdx, gw, gdw, gb, gdb = _bwd_shapes(x, k, plan, w_dtype, b_dtype)
    if plan.nj == 0:
        return gx, gdx, gw, gdw, gb, gdb
    n, d = x.shape
    has_gdot = gdot is not None and k > 0
    acc_w = (plan.prim and need_w) or plan.tan_w
    acc_b = (plan.prim and need_b) or plan.tan_b
    block_r, block_d, warps = _blocks(n, d)
    groups = min(triton.cdiv(n, block_r), max(1, BWD_PROGRAMS // plan.nj))
    rows_per_group = triton.cdiv(triton.cdiv(n, groups), block_r) * block_r
    groups = triton.cdiv(n, rows_per_group)
    f32 = {"device": x.device, "dtype": torch.float32}
    pw = torch.empty((plan.nj, groups, d), **f32) if acc_w else None
    pb = torch.empty((plan.nj, groups, d), **f32) if acc_b else None
    dummy = rstd
    with on_device(x):
        _norm_bwd_kernel[(plan.nj, groups)](
            x,
            w if w is not None else dummy,
            tw if plan.has_tw else dummy,
            tx if plan.has_tx else dummy,
            g if g is not None else dummy,
            gdot if has_gdot else dummy,
            mean if center else dummy,
            rstd,
            a if plan.has_tx else dummy,
            tmean if plan.has_tx and center else dummy,
            gx if plan.store_gx else dummy,
            gdx if plan.tan_x else dummy,
            pw if pw is not None else dummy,
            pb if pb is not None else dummy,
            n,
            d,
            n * d,
            plan.ng,
            groups,
            rows_per_group,
            CENTER=center,
            HAS_W=w is not None,
            HAS_TW=plan.has_tw,
            HAS_TX=plan.has_tx,
            HAS_G=g is not None,
            HAS_GDOT=has_gdot,
            STORE_GX=plan.store_gx,
            STORE_GDX=plan.tan_x,
            ACC_W=acc_w,
            ACC_B=acc_b,
            BLOCK_R=block_r,
            BLOCK_D=block_d,
            num_warps=warps,
        )
    ng = plan.ng
    if plan.prim and need_w:
        gw = pw[0].sum(0).to(w_dtype)
    if plan.tan_w:
        gdw = pw[ng:].sum(1).to(w_dtype)
    if plan.prim and need_b:
        gb = pb[0].sum(0).to(b_dtype)
    if plan.tan_b:
        gdb = pb[ng:].sum(1).to(b_dtype)
    return gx, gdx, gw, gdw, gb, gdb


@_bwd_op.register_fake
def _(x, w, tw, tx, g, gdot, mean, rstd, a, tmean, k, need_x, need_w, need_b, w_dtype, b_dtype):
    plan = _bwd_plan(k, g is not None, gdot is not None, tx is not None, tw is not None,
                     (need_x, need_w, need_b))  # fmt: skip
    return _bwd_shapes(x, k, plan, w_dtype, b_dtype)


def norm_bwd_jvp(
    s: _Saved,
    g: Tensor | None,
    gdot: Tensor | None,
    need: tuple[bool, bool, bool],
    dtypes: tuple[torch.dtype | None, ...],
) -> tuple[tuple, tuple]:
    """``((ḡ_x, ḡ_γ, ḡ_β), (ġ_x, ġ_γ, ġ_β))`` for the forward that saved ``s`` (``None`` for a zero
    or an inactive input); ``need`` says which of ``x, γ, β`` are active, ``dtypes`` their dtypes.
    The kernel and the sums of its partial results run as ``hessfast::triton_norm_bwd_jvp``."""
    n, d = s.x.shape
    k = s.k
    has_g = g is not None
    plan = _bwd_plan(k, has_g, gdot is not None, s.tx is not None, s.tw is not None, need)
    if plan.nj == 0:
        return (None, None, None), (None, None, None)
    has_gdot = gdot is not None and k > 0
    x_dtype = s.x.dtype
    gx, gdx, gw, gdw, gb, gdb = _bwd_op(
        s.x,
        s.w,
        s.tw if plan.has_tw else None,
        s.tx if plan.has_tx else None,
        _flat(g, n, d),
        _flat(gdot, k, n, d) if has_gdot else None,
        s.mean,
        s.rstd,
        s.a if plan.has_tx else None,
        s.tmean if plan.has_tx and s.center else None,
        k,
        *need,
        dtypes[1] or x_dtype,
        dtypes[2] or x_dtype,
    )
    _, need_w, need_b = need
    gx = gx.reshape(s.shape) if plan.store_gx else None
    gdx = gdx.reshape(k, *s.shape) if plan.tan_x else None
    gw = gw.reshape(s.wshape) if plan.prim and need_w else None
    gdw = gdw.reshape(k, *s.wshape) if plan.tan_w else None
    gb = gb.reshape(s.wshape) if plan.prim and need_b else None
    gdb = gdb.reshape(k, *s.wshape) if plan.tan_b else None
    return (gx, gw, gb), (gdx, gdw, gdb)


class _TritonNorm(TritonRule):
    """Shared body of the Triton layer/RMS norm rules (the argument layout comes from the schema
    mixins of ``hessfast/rules/layer_norm.py``)."""

    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    tolerances = {
        torch.float32: (1e-4, 1e-5),
        torch.bfloat16: (5e-2, 5e-2),
        torch.float16: (1e-2, 1e-2),
    }

    def not_supported_reasons(self, call: Call) -> list[str]:
        x, ns, w, b, _ = self._unpack(call)
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return [f"{self.name} needs a floating-point input"]
        ns = tuple(int(s) for s in ns)
        if len(ns) == 0 or x.dim() < len(ns) or tuple(x.shape[x.dim() - len(ns) :]) != ns:
            return [f"normalized_shape {list(ns)} does not match the input's trailing dims"]
        out = []
        for name, t in (("weight", w), ("bias", b)):
            if t is not None and (tuple(t.shape) != ns or not t.is_floating_point()):
                out.append(f"{name} must be a floating-point tensor of shape {list(ns)}")
        d = math.prod(ns)
        if d > MAX_D:
            out.append(
                f"rows of {d} elements (normalized_shape {list(ns)}) exceed the kernel's maximum "
                f"of {MAX_D}: a row must fit in one block"
            )
        if x.numel() == 0:
            out.append("empty input (no rows to normalise)")
        tensors = [t for t in (*call.args, *call.tangents) if isinstance(t, Tensor)]
        devices = sorted({str(t.device) for t in tensors})
        if len(devices) > 1:
            out.append(f"operands and tangents on several devices ({', '.join(devices)})")
        return out

    def fwd_jvp(self, call: Call):
        x, ns, w, b, eps = self._unpack(call)
        ix, iw, ib = self.slots
        tx, tw = call.tangents[ix], call.tangents[iw]
        tb = call.tangents[ib] if ib is not None else None
        if eps is None:
            eps = torch.finfo(torch.float32).eps  # the computation dtype's, as in torch
        ns = tuple(int(s) for s in ns)
        y, ydot, saved = norm_fwd_jvp(x, ns, w, b, eps, tx, tw, tb, self.center)
        need = (
            call.is_active(ix),
            w is not None and call.is_active(iw),
            ib is not None and b is not None and call.is_active(ib),
        )
        dtypes = (x.dtype, None if w is None else w.dtype, None if b is None else b.dtype)
        return y, ydot, (saved, need, dtypes)

    def _bwd(self, res, g, gdot):
        saved, need, dtypes = res
        return norm_bwd_jvp(saved, g, gdot, need, dtypes)


class TritonLayerNorm(LayerNormSchema, _TritonNorm):
    """``layer_norm`` fused in Triton."""


class TritonRMSNorm(RMSNormSchema, _TritonNorm):
    """``rms_norm`` fused in Triton."""


IMPLEMENTATIONS = [TritonLayerNorm(), TritonRMSNorm()]
