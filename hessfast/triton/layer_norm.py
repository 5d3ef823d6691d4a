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
from . import TritonRule

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
    ``normalized_shape``; ``ẏ [K, *x.shape]`` or ``None`` when every tangent is ``None``."""
    d = math.prod(normalized_shape)
    n = x.numel() // d
    k = next((t.shape[0] for t in (tx, tw, tb) if t is not None), 0)
    x2 = _flat(x, n, d)
    w1, b1 = _flat(w, d), _flat(b, d)
    tx2, tw2, tb2 = _flat(tx, k, n, d), _flat(tw, k, d), _flat(tb, k, d)
    f32 = {"device": x.device, "dtype": torch.float32}
    y = torch.empty((n, d), dtype=x.dtype, device=x.device)
    any_t = k > 0 and any(t is not None for t in (tx, tw, tb))
    ydot = torch.empty((k, n, d), dtype=x.dtype, device=x.device) if any_t else None
    mean = torch.empty(n, **f32) if center else None
    rstd = torch.empty(n, **f32)
    a = torch.empty((k, n), **f32) if tx is not None else None
    tmean = torch.empty((k, n), **f32) if tx is not None and center else None
    block_r, block_d, warps = _blocks(n, d)
    _norm_fwd_kernel[(triton.cdiv(n, block_r),)](
        x2,
        w1 if w1 is not None else x2,
        b1 if b1 is not None else x2,
        tx2 if tx2 is not None else x2,
        tw2 if tw2 is not None else x2,
        tb2 if tb2 is not None else x2,
        y,
        ydot if ydot is not None else y,
        mean if mean is not None else rstd,
        rstd,
        a if a is not None else rstd,
        tmean if tmean is not None else rstd,
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
    saved = _Saved(
        x2, w1, tx2, tw2, mean, rstd, a, tmean, tuple(x.shape), tuple(normalized_shape), k, center
    )
    ydot = None if ydot is None else ydot.reshape(k, *x.shape)
    return y.reshape(x.shape), ydot, saved


def norm_bwd_jvp(
    s: _Saved,
    g: Tensor | None,
    gdot: Tensor | None,
    need: tuple[bool, bool, bool],
    dtypes: tuple[torch.dtype | None, ...],
) -> tuple[tuple, tuple]:
    """``((ḡ_x, ḡ_γ, ḡ_β), (ġ_x, ġ_γ, ġ_β))`` for the forward that saved ``s`` (``None`` for a zero
    or an inactive input); ``need`` says which of ``x, γ, β`` are active, ``dtypes`` their dtypes."""
    need_x, need_w, need_b = need
    n, d = s.x.shape
    k = s.k
    has_g, has_gdot = g is not None, gdot is not None and k > 0
    has_tx = s.tx is not None and has_g
    has_tw = s.tw is not None and has_g
    # which cotangent programs produce something nonzero
    prim = has_g and (need_x or need_w or need_b)
    tan_x = need_x and (has_gdot or has_tx or has_tw)
    tan_w = need_w and (has_gdot or has_tx)
    tan_b = need_b and has_gdot
    ng = 1 if prim else 0
    nk = k if (tan_x or tan_w or tan_b) else 0
    nj = ng + nk
    gx = gw = gb = gdx = gdw = gdb = None
    if nj == 0:
        return (gx, gw, gb), (gdx, gdw, gdb)
    dev = s.x.device
    g2 = _flat(g, n, d)
    gd2 = _flat(gdot, k, n, d) if has_gdot else None
    store_gx = prim and need_x
    if store_gx:
        gx = torch.empty((n, d), dtype=dtypes[0], device=dev)
    if tan_x:
        gdx = torch.empty((k, n, d), dtype=dtypes[0], device=dev)
    acc_w = (prim and need_w) or tan_w
    acc_b = (prim and need_b) or tan_b
    block_r, block_d, warps = _blocks(n, d)
    groups = min(triton.cdiv(n, block_r), max(1, BWD_PROGRAMS // nj))
    rows_per_group = triton.cdiv(triton.cdiv(n, groups), block_r) * block_r
    groups = triton.cdiv(n, rows_per_group)
    f32 = {"device": dev, "dtype": torch.float32}
    pw = torch.empty((nj, groups, d), **f32) if acc_w else None
    pb = torch.empty((nj, groups, d), **f32) if acc_b else None
    dummy = s.rstd
    _norm_bwd_kernel[(nj, groups)](
        s.x,
        s.w if s.w is not None else dummy,
        s.tw if has_tw else dummy,
        s.tx if has_tx else dummy,
        g2 if g2 is not None else dummy,
        gd2 if gd2 is not None else dummy,
        s.mean if s.mean is not None else dummy,
        s.rstd,
        s.a if has_tx else dummy,
        s.tmean if has_tx and s.center else dummy,
        gx if gx is not None else dummy,
        gdx if gdx is not None else dummy,
        pw if pw is not None else dummy,
        pb if pb is not None else dummy,
        n,
        d,
        n * d,
        ng,
        groups,
        rows_per_group,
        CENTER=s.center,
        HAS_W=s.w is not None,
        HAS_TW=has_tw,
        HAS_TX=has_tx,
        HAS_G=has_g,
        HAS_GDOT=has_gdot,
        STORE_GX=store_gx,
        STORE_GDX=tan_x,
        ACC_W=acc_w,
        ACC_B=acc_b,
        BLOCK_R=block_r,
        BLOCK_D=block_d,
        num_warps=warps,
    )
    if gx is not None:
        gx = gx.reshape(s.shape)
    if gdx is not None:
        gdx = gdx.reshape(k, *s.shape)
    if prim and need_w:
        gw = pw[0].sum(0).to(dtypes[1]).reshape(s.wshape)
    if tan_w:
        gdw = pw[ng:].sum(1).to(dtypes[1]).reshape(k, *s.wshape)
    if prim and need_b:
        gb = pb[0].sum(0).to(dtypes[2]).reshape(s.wshape)
    if tan_b:
        gdb = pb[ng:].sum(1).to(dtypes[2]).reshape(k, *s.wshape)
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
