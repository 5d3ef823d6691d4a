"""Triton kernel of ``hessfast::cross_entropy_rows``: softmax cross-entropy rows, their gradient and
the loss-Hessian products of K tangents, in two passes over each row.

The math and the signature are those of :func:`hessfast.rules.cross_entropy.cross_entropy_rows_ref`:
for logits ``z [M, V]``, tangents ``u = zdot [K, M, V]``, targets ``y [M]``, class weights ``w [V]``,
label smoothing ``ε`` and ``scale``, with ``p = softmax(z_n)``,
``a_{n,c} = (1−ε) w_{y_n} δ_{c,y_n} + (ε/V) w_c`` (zero on ignored rows) and ``A_n = Σ_c a_{n,c}``:

- ``loss_rows[n] = scale (c_y ((m − z_y) + log s) + (ε/V) (Σ_c w_c (m − z_c) + log s Σ_c w_c))``
  with ``c_y = (1−ε) w_{y_n}``, the row max ``m`` and ``s = Σ_c exp(z_c − m)``: the log-sum-exp
  ``lse = m + log s`` is never formed, so no difference of two numbers of the logits' size
  (``lse − z_y`` rounded at float32's spacing near 1e4 is 1e-3, a 1.5e-5 relative error of the
  loss of a row offset by 1e4) appears;
- ``gz[n] = scale (A_n p − a_n)``;
- ``gdz[k, n] = scale A_n p ⊙ (u_k − ⟨p, u_k⟩)``.

Kernel layout: program ``(n, j)`` owns row ``n`` and the tangents ``k ∈ [j·BLOCK_K, (j+1)·BLOCK_K)``.
Pass 1 streams the row in ``BLOCK_V`` tiles with an online softmax: the running max ``m``, the sum
``s = Σ exp(z − m)``, and for every tangent of the block ``t_k = Σ exp(z − m) u_k`` (rescaled with
``s`` whenever ``m`` grows), so ``⟨p, u_k⟩ = t_k / s`` after one read of ``z`` and of each ``u_k``;
with smoothing also ``Σ w_c``. Pass 2 reads them again and writes ``gz`` (program ``j = 0`` only)
and ``gdz``; with smoothing it sums ``Σ w_c (m − z_c)`` (``m`` is final there), and the loss row
is written after it. Accumulation is in float32 whatever the input dtype; outputs are in the
logits' dtype, the loss rows in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..rules.base import Call
from ..rules.cross_entropy import ROWS_OP, rows_arg_reasons
from . import TritonRule, absent, on_device

Tensor = torch.Tensor


@triton.jit
def _ce_rows_kernel(
    z_ptr,
    zd_ptr,
    y_ptr,
    w_ptr,
    loss_ptr,
    gz_ptr,
    gdz_ptr,
    V,
    K,
    MV,
    ignore_index,
    eps,
    scale,
    HAS_W: tl.constexpr,
    SMOOTH: tl.constexpr,
    WANT_GRAD: tl.constexpr,
    HAS_T: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    kb = tl.program_id(1)
    base = row * V
    y = tl.load(y_ptr + row)
    valid = y != ignore_index
    in_range = (y >= 0) & (y < V)
    y_safe = tl.where(valid & in_range, y, 0)  # never read out of bounds
    if HAS_W:
        w_y = tl.load(w_ptr + y_safe).to(tl.float32)
    else:
        w_y = 1.0
    # a target out of [0, V) (and not ignored) poisons its row with NaN, as the CUDA kernel does
    w_y = tl.where(in_range, w_y, float("nan"))
    c_y = tl.where(valid, (1.0 - eps) * w_y, 0.0)  # coefficient of the target class
    c_s = tl.where(valid, eps / V, 0.0)  # smoothing coefficient, times w_c
    cols0 = tl.arange(0, BLOCK_V)
    ks = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = ks < K
    t_base = ks.to(tl.int64) * MV + base  # offsets of this block's tangent rows

    # pass 1: online softmax statistics and <exp(z - m), u_k>
    m = float("-inf")
    s = 0.0
    sum_w = 0.0
    t = tl.zeros([BLOCK_K], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        cm = cols < V
        zt = tl.load(z_ptr + base + cols, mask=cm, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(zt, axis=0))
        # while every logit so far is -inf (a masked first tile), exponentiate against 0, not
        # -inf: exp(-inf - (-inf)) is NaN; exp(-inf - 0) = 0 keeps s = t = 0
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_ref)
        e = tl.exp(zt - m_ref)
        s = s * alpha + tl.sum(e, axis=0)
        if SMOOTH:
            if HAS_W:
                wt = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
            else:
                wt = cm.to(tl.float32)
            sum_w += tl.sum(wt, axis=0)
        if HAS_T:
            u = tl.load(
                zd_ptr + t_base[:, None] + cols[None, :],
                mask=k_mask[:, None] & cm[None, :],
                other=0.0,
            ).to(tl.float32)
            t = t * alpha + tl.sum(u * e[None, :], axis=1)
        m = m_new

    log_s = tl.log(s)
    z_y = tl.load(z_ptr + base + y_safe).to(tl.float32)
    loss = c_y * ((m - z_y) + log_s)
    big_a = c_y
    if SMOOTH:
        big_a += c_s * sum_w
    sum_wd = 0.0  # pass 2: Σ w_c (m − z_c), the smoothing term's part without log s

    # pass 2: gz = scale (A p - a), gdz = scale A p (u - <p, u>)
    inv_s = 1.0 / s
    pu_mean = t * inv_s
    g_a = scale * big_a
    g_y = scale * c_y
    g_s = scale * c_s
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        cm = cols < V
        zt = tl.load(z_ptr + base + cols, mask=cm, other=float("-inf")).to(tl.float32)
        p = tl.exp(zt - m) * inv_s
        if SMOOTH:
            if HAS_W:
                ws = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
            else:
                ws = cm.to(tl.float32)
            sum_wd += tl.sum(ws * (m - tl.where(cm, zt, m)), axis=0)
        if WANT_GRAD:
            g = g_a * p - tl.where(cols == y_safe, g_y, 0.0)
            if SMOOTH:
                if HAS_W:
                    wt = tl.load(w_ptr + cols, mask=cm, other=0.0).to(tl.float32)
                    g -= g_s * wt
                else:
                    g -= g_s
            tl.store(gz_ptr + base + cols, g.to(gz_ptr.dtype.element_ty), mask=cm & (kb == 0))
        if HAS_T:
            tmask = k_mask[:, None] & cm[None, :]
            offs = t_base[:, None] + cols[None, :]
            u = tl.load(zd_ptr + offs, mask=tmask, other=0.0).to(tl.float32)
            gd = g_a * p[None, :] * (u - pu_mean[:, None])
            tl.store(gdz_ptr + offs, gd.to(gdz_ptr.dtype.element_ty), mask=tmask)
    if SMOOTH:
        loss += c_s * (sum_wd + log_s * sum_w)
    tl.store(loss_ptr + row, scale * loss, mask=kb == 0)


#: Largest BLOCK_V (a row is streamed in tiles of at most this many classes).
MAX_BLOCK_V = 4096
#: Largest number of tangents per program (more tangents: more programs per row).
MAX_BLOCK_K = 4
#: Largest tile ``BLOCK_K × BLOCK_V`` held in registers.
MAX_TILE = 8192


def blocks(v: int, k: int) -> tuple[int, int]:
    """``(BLOCK_V, BLOCK_K)`` for V classes and K tangents (powers of two)."""
    block_k = min(triton.next_power_of_2(max(k, 1)), MAX_BLOCK_K)
    block_v = min(triton.next_power_of_2(v), MAX_BLOCK_V, MAX_TILE // block_k)
    return max(block_v, 16), block_k


def _rows_shapes(z: Tensor, zdot: Tensor | None, want_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The empty outputs ``(loss [M] fp32, gz [M, V], gdz [K, M, V])`` of :func:`_rows_op`
    (:func:`absent` without ``want_grad`` / without tangents)."""
    m, v = z.shape
    k = 0 if zdot is None else zdot.shape[0]
    loss = torch.empty(m, device=z.device, dtype=torch.float32)
    gz = torch.empty((m, v), device=z.device, dtype=z.dtype) if want_grad else absent(z)
    gdz = torch.empty((k, m, v), device=z.device, dtype=z.dtype) if k else absent(z)
    return loss, gz, gdz


@torch.library.custom_op("hessfast::triton_ce_rows", mutates_args=())
def _rows_op(
    z: Tensor,
    zdot: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    scale: float,
    want_grad: bool,
    block_v: int,
    block_k: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel launch of :func:`cross_entropy_rows_triton` (block sizes 0: the defaults of
    :func:`blocks`); ``gz`` / ``gdz`` are empty tensors where that function returns ``None``."""
    M, V = z.shape
    K = 0 if zdot is None else zdot.shape[0]
    bv, bk = blocks(V, K)
    bv, bk = block_v or bv, block_k or bk
    z = z.contiguous()
    target = target.contiguous()
    loss, gz, gdz = _rows_shapes(z, zdot, want_grad)
    if M == 0:
        return loss, gz, gdz
    zd = zdot.contiguous() if K else z
    w = weight.contiguous() if weight is not None else z
    eps = float(label_smoothing)
    grid = (M, triton.cdiv(K, bk) if K else 1)
    with on_device(z):
        _ce_rows_kernel[grid](
            z,
            zd,
            target,
            w,
            loss,
            gz if want_grad else z,
            gdz if K else z,
            V,
            K,
            M * V,
            ignore_index,
            eps,
            float(scale),
            HAS_W=weight is not None,
            SMOOTH=eps != 0.0,
            WANT_GRAD=bool(want_grad),
            HAS_T=K > 0,
            BLOCK_V=bv,
            BLOCK_K=bk,
            num_warps=8 if bv * bk >= 4096 else 4,
        )
    return loss, gz, gdz


@_rows_op.register_fake
def _(z, zdot, target, weight, ignore_index, label_smoothing, scale, want_grad, block_v, block_k):
    return _rows_shapes(z, zdot, want_grad)


def cross_entropy_rows_triton(
    z: Tensor,
    zdot: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    scale: float,
    want_grad: bool,
    *,
    block_v: int | None = None,
    block_k: int | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Launch the kernel (see the module docstring) as ``hessfast::triton_ce_rows``; the signature
    of ``cross_entropy_rows_ref`` plus block sizes to override (tests force several tiles and
    tangent blocks). Non-contiguous inputs are made contiguous. (The fused head passes
    ``scale=1`` and applies its tensor scale itself, so that a traced product bakes nothing in.)"""
    loss, gz, gdz = _rows_op(
        z,
        zdot,
        target,
        weight,
        int(ignore_index),
        float(label_smoothing),
        float(scale),
        bool(want_grad),
        block_v or 0,
        block_k or 0,
    )
    k = 0 if zdot is None else zdot.shape[0]
    gz = gz if want_grad else None
    gdz = gdz if k else None
    return loss, gz, gdz


class CrossEntropyRowsTriton(TritonRule):
    """``hessfast::cross_entropy_rows`` in Triton (:func:`cross_entropy_rows_triton`)."""

    ops = (ROWS_OP,)
    name = "cross_entropy_rows"
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    tolerances = {
        torch.float32: (1e-5, 1e-6),
        torch.bfloat16: (5e-2, 5e-2),
        torch.float16: (1e-2, 1e-2),
    }

    def not_supported_reasons(self, call: Call) -> list[str]:
        return rows_arg_reasons(call)

    def rows(
        self,
        z: Tensor,
        zdot: Tensor | None,
        target: Tensor,
        weight: Tensor | None,
        ignore_index: int,
        label_smoothing: float,
        scale: float,
        want_grad: bool,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        return cross_entropy_rows_triton(
            z, zdot, target, weight, ignore_index, label_smoothing, scale, want_grad
        )


IMPLEMENTATIONS = [CrossEntropyRowsTriton()]
