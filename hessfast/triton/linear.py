"""Triton implementation of the linear rule (``aten.linear``): the tangent GEMMs, K-batched and fused.

Index conventions (as in :mod:`hessfast.rules.linear`): ``x [..., I]`` flattened to ``[N, I]``
(``N`` = all leading axes), ``W [O, I]``, ``b [O]``, ``y [..., O]``; tangents and cotangent
tangents carry a leading ``K``: ``ẋ [K, N, I]``, ``Ẇ [K, O, I]``, ``ḃ [K, O]``, ``ġ [K, N, O]``.

Every tangent product is one launch of :func:`_dual_gemm_kernel`, which computes for each ``k``

    ``C_k = A1_k B1_k + A2_k B2_k (+ bias_k broadcast over rows)``

as a single GEMM over the concatenated reduction axis ``[A1_k | A2_k] · [B1_k ; B2_k]``: the
reduction loop runs over the first pair and then over the second, accumulating into the same fp32
tile, without materialising the concatenation. Each operand is either batched (its own matrix per
``k``) or shared by all ``k`` (batch stride 0); the K tangents are the batch axis of the launch
grid, so one launch serves all K. Operands are strided views (transposes cost nothing):

- forward tangent ``ẏ_k = ẋ_k Wᵀ + x Ẇ_kᵀ + ḃ_k``: ``A1 = ẋ_k [N, I]``, ``B1 = Wᵀ``,
  ``A2 = x``, ``B2 = Ẇ_kᵀ [I, O]``, bias ``ḃ_k``; reduction over ``I`` twice;
- input-cotangent tangent ``ġ_x,k = ġ_k W + ḡ Ẇ_k``: ``A1 = ġ_k [N, O]``, ``B1 = W``,
  ``A2 = ḡ``, ``B2 = Ẇ_k [O, I]``; reduction over ``O`` twice;
- weight-cotangent tangent ``ġ_W,k = ġ_kᵀ x + ḡᵀ ẋ_k``: ``A1 = ġ_kᵀ [O, N]``, ``B1 = x``,
  ``A2 = ḡᵀ``, ``B2 = ẋ_k [N, I]``; reduction over ``N`` twice.

A pair whose tangent is absent (``None`` = zero: the input or the weight is inactive, GGN mode's
absent ``ḡ``, a missing ``ġ``) is skipped at compile time (``HAS_1`` / ``HAS_2``), so every mode
costs only the products it needs. The primal ``y = x Wᵀ + b`` and the primal cotangents
``ḡ_x = ḡ W``, ``ḡ_W = ḡᵀ x``, ``ḡ_b = Σ_n ḡ`` stay on torch (cuBLAS): they are the gradient's own
GEMMs, with nothing to fuse. The bias cotangent tangent ``ġ_b,k = Σ_n ġ_k`` is a bandwidth-bound
row sum, also left to torch.

Precision: fp32 accumulation for every dtype. Float32 operands multiply in IEEE fp32
(``input_precision="ieee"``) under torch's default ``torch.get_float32_matmul_precision() ==
"highest"``, which the declared float32 tolerance assumes; with ``"high"`` or ``"medium"`` the
kernels use TF32 tensor cores, like cuBLAS under the same setting, and the float32 tolerance no
longer holds (expect TF32's ~1e-3 relative error).

FLOPs (a multiply-add counts 2; ``P = N·I·O``; ``a_x``, ``a_w``, ``a_b`` ∈ {0, 1}: input, weight,
bias active; ``h_g`` = ``ḡ`` present, ``h_d`` = ``ġ`` present), the model behind a TFLOP/s figure:

- ``fwd_jvp``: ``2P`` (primal, torch) ``+ 2KP·(a_x + a_w)`` (one launch) ``+ K·N·O·a_b``;
- ``bwd_jvp``: ``h_g·2P·(a_x + a_w)`` (primal cotangents, torch)
  ``+ a_x·2KP·(h_d + h_g·a_w)`` (``ġ_x``) ``+ a_w·2KP·(h_d + h_g·a_x)`` (``ġ_W``)
  ``+ a_b·(h_g + K·h_d)·N·O`` (bias sums);
- modes: hvp ``h_g = h_d = 1``; hvp with ``ġ`` absent ``h_g = 1, h_d = 0``; GGN ``h_g = 0,
  h_d = 1``; gradient ``K = 0, h_g = 1``. Everything active, hvp: ``2P(1 + 2K)`` forward,
  ``4P(1 + 2K)`` backward, ``6P(1 + 2K)`` in all.

Declines (with the reason): float64 (the oracle's precision: cuBLAS DGEMM via the torch rule is
the right tool, and Triton's fp64 ``tl.dot`` is not a tensor-core path); operands of mixed dtypes
or devices; a weight that is not 2-D; a bias that is not ``[O]``. No size-based decline: under an
explicit ``backend="triton"`` every supported call runs these kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..rules.base import Call
from . import INTERPRETED, TritonRule, on_device

Tensor = torch.Tensor
aten = torch.ops.aten

#: Tile configurations autotuned on the GPU (the Triton matmul tutorial's H100 set plus a
#: 128×128×64 tile for bf16/fp16), pruned to the problem's size by :func:`_prune_configs`;
#: configurations that exceed shared memory for fp32 are dropped by the autotuner. The interpreter gets one small configuration: ``tl.dot`` there needs tiles ≥ 16,
#: and small tiles make the tests cover several tiles and the masked tails.
_GPU_CONFIGS = [
    triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w
    )
    for bm, bn, bk, s, w in (
        (128, 256, 64, 3, 8),
        (128, 128, 64, 3, 8),
        (64, 256, 32, 4, 4),
        (128, 128, 32, 4, 4),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 32, 32, 5, 2),
        (32, 64, 32, 5, 2),
    )
]


def _prune_configs(configs: list, named_args: dict, **kwargs) -> list:
    """Keep the tiles that fit the output ``[M, N]`` (a side at most the next power of two, at least
    32): small GEMMs then compile and run one or two configurations instead of benchmarking all.
    Falls back to the smallest tile when none fits."""
    cap_m = max(32, triton.next_power_of_2(named_args["M"]))
    cap_n = max(32, triton.next_power_of_2(named_args["N"]))
    fit = [c for c in configs if c.kwargs["BLOCK_M"] <= cap_m and c.kwargs["BLOCK_N"] <= cap_n]
    return fit or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


_INTERPRETER_CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4)
]


@triton.jit
def _accumulate(
    acc,
    a_ptr,
    b_ptr,
    rm,
    rn,
    rk,
    red,
    s_am,
    s_ak,
    s_bk,
    s_bn,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """``acc += A[rm, :red] @ B[:red, rn]``, BLOCK_K columns of A / rows of B at a time; the
    reduction tail is masked to zero (``rm`` and ``rn`` are already clamped in bounds). ``UPCAST``
    converts the tiles to fp32 before the product (interpreter only, see :func:`_upcast`)."""
    a = a_ptr + rm[:, None] * s_am + rk[None, :] * s_ak
    b = b_ptr + rk[:, None] * s_bk + rn[None, :] * s_bn
    for step in range(0, tl.cdiv(red, BLOCK_K)):
        left = red - step * BLOCK_K
        a_tile = tl.load(a, mask=rk[None, :] < left, other=0.0)
        b_tile = tl.load(b, mask=rk[:, None] < left, other=0.0)
        if UPCAST:
            a_tile = a_tile.to(tl.float32)
            b_tile = b_tile.to(tl.float32)
        acc = tl.dot(a_tile, b_tile, acc, input_precision=PRECISION)
        a += BLOCK_K * s_ak
        b += BLOCK_K * s_bk
    return acc


@triton.autotune(
    configs=_INTERPRETER_CONFIGS if INTERPRETED else _GPU_CONFIGS,
    key=["M", "N", "K1", "K2", "HAS_1", "HAS_2"],
    prune_configs_by={"early_config_prune": _prune_configs},
)
@triton.jit
def _dual_gemm_kernel(
    a1_ptr,
    b1_ptr,
    a2_ptr,
    b2_ptr,
    bias_ptr,
    c_ptr,
    M,
    N,
    K1,
    K2,
    s_a1b,
    s_a1m,
    s_a1k,
    s_b1b,
    s_b1k,
    s_b1n,
    s_a2b,
    s_a2m,
    s_a2k,
    s_b2b,
    s_b2k,
    s_b2n,
    s_biasb,
    s_biasn,
    s_cb,
    s_cm,
    s_cn,
    HAS_1: tl.constexpr,
    HAS_2: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``C[k] = A1[k] @ B1[k] + A2[k] @ B2[k] + bias[k][None, :]`` for one ``[BLOCK_M, BLOCK_N]``
    tile of one batch entry ``k``; ``C [B, M, N]``, ``A1 [B, M, K1]``, ``B1 [B, K1, N]``, ``A2 [B,
    M, K2]``, ``B2 [B, K2, N]``, ``bias [B, N]``, any strides (batch stride 0: shared by all k).

    The 1-D grid is ``B × tiles``, batch-major; within a batch the tiles are ordered in groups of
    ``GROUP_M`` row tiles so that concurrent programs reuse the same A rows and B columns in L2.
    Rows and columns past ``M`` / ``N`` are clamped for the loads (``% M``) and masked at the store.
    """
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    tiles = num_m * num_n
    batch = (pid // tiles).to(tl.int64)
    tile = pid % tiles
    per_group = GROUP_M * num_n
    first_m = (tile // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % per_group) % group_m
    pid_n = (tile % per_group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    lm = (rm % M).to(tl.int64)
    ln = (rn % N).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_1:
        acc = _accumulate(
            acc,
            a1_ptr + batch * s_a1b,
            b1_ptr + batch * s_b1b,
            lm,
            ln,
            rk,
            K1,
            s_a1m,
            s_a1k,
            s_b1k,
            s_b1n,
            PRECISION,
            UPCAST,
            BLOCK_K,
        )
    if HAS_2:
        acc = _accumulate(
            acc,
            a2_ptr + batch * s_a2b,
            b2_ptr + batch * s_b2b,
            lm,
            ln,
            rk,
            K2,
            s_a2m,
            s_a2k,
            s_b2k,
            s_b2n,
            PRECISION,
            UPCAST,
            BLOCK_K,
        )
    if HAS_BIAS:
        bias = tl.load(bias_ptr + batch * s_biasb + ln * s_biasn)
        acc += bias.to(tl.float32)[None, :]
    c = c_ptr + batch * s_cb + rm.to(tl.int64)[:, None] * s_cm + rn.to(tl.int64)[None, :] * s_cn
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask)


def _batched_strides(t: Tensor) -> tuple[int, int, int]:
    """(batch, row, column) strides of a ``[K, R, C]`` operand, or of a shared ``[R, C]`` one
    (batch stride 0)."""
    if t.dim() == 3:
        return t.stride(0), t.stride(1), t.stride(2)
    return 0, t.stride(0), t.stride(1)


def _precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision for fp32 operands, following torch's float32 matmul setting
    (ignored for bf16/fp16)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _upcast(dtype: torch.dtype) -> bool:
    """Whether to multiply the tiles in fp32: only for bfloat16 in Triton's interpreter, whose
    ``tl.dot`` multiplies bfloat16's raw uint16 bit patterns (triton-lang/triton#11584; the
    interpreter supports no bfloat16 arithmetic). bf16 × bf16 products are exact in fp32 and the
    compiled kernel accumulates in fp32 too, so the interpreter then computes what the GPU does up
    to the summation order. Compiled kernels never upcast."""
    return INTERPRETED and dtype == torch.bfloat16


def dual_gemm(
    out: Tensor,
    first: tuple[Tensor, Tensor] | None,
    second: tuple[Tensor, Tensor] | None,
    bias: Tensor | None = None,
) -> Tensor:
    """Write ``out[k] = A1[k] @ B1[k] + A2[k] @ B2[k] + bias[k][None, :]`` for every ``k`` in one
    launch and return ``out [K, M, N]``.

    ``first = (A1, B1)`` and ``second = (A2, B2)`` are (strided) views ``A [K, M, R]`` or
    ``[M, R]``, ``B [K, R, N]`` or ``[R, N]`` (2-D: shared by all k); ``None`` drops the pair.
    ``bias`` is ``[K, N]`` or ``None``. All operands must share ``out``'s dtype and device.
    """
    kb, m, n = out.shape
    operands: list = []
    for pair in (first, second):
        if pair is None:  # never read (HAS_1 / HAS_2 is False): any pointer, zero sizes
            operands.append((out, out, 0, 0, 0, 0, 0, 0, 0))
            continue
        a, b = pair
        if a.dtype != out.dtype or b.dtype != out.dtype:
            raise TypeError(f"dual_gemm: operands {a.dtype}, {b.dtype} but output {out.dtype}")
        operands.append((a, b, a.shape[-1], *_batched_strides(a), *_batched_strides(b)))
    (a1, b1, k1, *s1), (a2, b2, k2, *s2) = operands
    if bias is not None and bias.dtype != out.dtype:
        raise TypeError(f"dual_gemm: bias {bias.dtype} but output {out.dtype}")
    if out.numel() == 0:
        return out
    s_bias = (bias.stride(0), bias.stride(1)) if bias is not None else (0, 0)

    def grid(meta: dict) -> tuple[int]:
        return (kb * triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    # Triton launches on the current CUDA device: make it the operands' one (multi-GPU runs).
    with on_device(out):
        _dual_gemm_kernel[grid](
            a1,
            b1,
            a2,
            b2,
            out if bias is None else bias,
            out,
            m,
            n,
            k1,
            k2,
            *s1,
            *s2,
            *s_bias,
            *out.stride(),
            HAS_1=first is not None,
            HAS_2=second is not None,
            HAS_BIAS=bias is not None,
            PRECISION=_precision(out.dtype),
            UPCAST=_upcast(out.dtype),
        )
    return out


def _gemm_out(
    operands: tuple[Tensor | None, ...], k: int, m: int, n: int, dtype: torch.dtype
) -> Tensor:
    device = next(t.device for t in operands if t is not None)
    return torch.empty((k, m, n), dtype=dtype, device=device)


@torch.library.custom_op("hessfast::triton_dual_gemm", mutates_args=())
def _dual_gemm_op(
    a1: Tensor | None,
    b1: Tensor | None,
    a2: Tensor | None,
    b2: Tensor | None,
    bias: Tensor | None,
    k: int,
    m: int,
    n: int,
    dtype: torch.dtype,
) -> Tensor:
    """:func:`dual_gemm` into a fresh ``[K, M, N]`` output of ``dtype``: a pair is dropped when its
    ``A`` is ``None``; at least one operand is present (it gives the device)."""
    out = _gemm_out((a1, a2, bias), k, m, n, dtype)
    return dual_gemm(out, None if a1 is None else (a1, b1), None if a2 is None else (a2, b2), bias)


@_dual_gemm_op.register_fake
def _(a1, b1, a2, b2, bias, k, m, n, dtype):
    return _gemm_out((a1, a2, bias), k, m, n, dtype)


def gemm(
    k: int,
    m: int,
    n: int,
    dtype: torch.dtype,
    first: tuple[Tensor, Tensor] | None,
    second: tuple[Tensor, Tensor] | None,
    bias: Tensor | None = None,
) -> Tensor:
    """A fresh ``[K, M, N]`` result of :func:`dual_gemm` (one launch of
    ``hessfast::triton_dual_gemm``)."""
    a1, b1 = first if first is not None else (None, None)
    a2, b2 = second if second is not None else (None, None)
    return _dual_gemm_op(a1, b1, a2, b2, bias, k, m, n, dtype)


def linear_fwd_jvp(
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    tx: Tensor | None,
    tw: Tensor | None,
    tb: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """``y = x Wᵀ + b`` (torch) and ``ẏ_k = ẋ_k Wᵀ + x Ẇ_kᵀ + ḃ_k`` (one fused launch for all k);
    ``ẏ [K, ..., O]`` or ``None`` when every tangent is ``None``."""
    y = torch.nn.functional.linear(x, w, b)
    if tx is None and tw is None and tb is None:
        return y, None
    o, i = w.shape
    k = next(t.shape[0] for t in (tx, tw, tb) if t is not None)
    x2 = x.reshape(-1, i)
    out = gemm(
        k,
        x2.shape[0],
        o,
        y.dtype,
        None if tx is None else (tx.reshape(k, -1, i), w.t()),
        None if tw is None else (x2, tw.transpose(1, 2)),
        tb,
    )
    return y, out.reshape(k, *x.shape[:-1], o)


def linear_bwd_jvp(
    x: Tensor,
    w: Tensor,
    tx: Tensor | None,
    tw: Tensor | None,
    g: Tensor | None,
    gdot: Tensor | None,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[tuple, tuple]:
    """``((ḡ_x, ḡ_W, ḡ_b), (ġ_x, ġ_W, ġ_b))`` with the semantics of
    :func:`hessfast.rules.linear.linear_bwd_jvp_ref`: ``ġ_x,k = ġ_k W + ḡ Ẇ_k`` and
    ``ġ_W,k = ġ_kᵀ x + ḡᵀ ẋ_k`` as one fused launch each (a term is dropped when a factor is
    ``None``), ``ġ_b,k = Σ_n ġ_k``; the primal cotangents through torch."""
    o, i = w.shape
    x2 = x.reshape(-1, i)
    gx = gw = gb = gdx = gdw = gdb = None
    g2 = None if g is None else g.reshape(-1, o)
    if g2 is not None:
        if need_x:
            gx = g @ w
        if need_w:
            gw = g2.t() @ x2
        if need_b:
            gb = g2.sum(0)
    gd2 = None if gdot is None else gdot.reshape(gdot.shape[0], -1, o)
    k = next((t.shape[0] for t in (gdot, tx, tw) if t is not None), 0)
    if need_x:
        first = None if gd2 is None else (gd2, w)
        second = None if g2 is None or tw is None else (g2, tw)
        if first is not None or second is not None:
            gdx = gemm(k, x2.shape[0], i, x.dtype, first, second).reshape(k, *x.shape)
    if need_w:
        first = None if gd2 is None else (gd2.transpose(1, 2), x2)
        second = None if g2 is None or tx is None else (g2.t(), tx.reshape(k, -1, i))
        if first is not None or second is not None:
            gdw = gemm(k, o, i, w.dtype, first, second)
    if need_b and gd2 is not None:
        gdb = gd2.sum(1)
    return (gx, gw, gb), (gdx, gdw, gdb)


class TritonLinear(TritonRule):
    """``aten.linear`` with the tangent GEMMs fused and K-batched in Triton (see the module
    docstring); residuals ``(x, W, ẋ, Ẇ, active)`` as in the torch rule."""

    ops = (aten.linear.default,)
    name = "linear"
    dtypes = (torch.float32, torch.bfloat16, torch.float16)

    def not_supported_reasons(self, call: Call) -> list[str]:
        x, w, b = call.args
        if x.dim() < 1 or w.dim() != 2:
            return ["linear needs x [..., I] and a 2-D weight [O, I]"]
        out = []
        if b is not None and tuple(b.shape) != (w.shape[0],):
            out.append(f"bias of shape {list(b.shape)}: only a bias [O] = [{w.shape[0]}] is fused")
        tensors = [t for t in (*call.args, *call.tangents) if isinstance(t, Tensor)]
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors})
        if len(dtypes) > 1:
            out.append(f"operands and tangents of mixed dtypes ({', '.join(dtypes)})")
        devices = sorted({str(t.device) for t in tensors})
        if len(devices) > 1:
            out.append(f"operands and tangents on several devices ({', '.join(devices)})")
        return out

    def auto_reasons(self, call: Call) -> list[str]:
        """cuBLAS (the torch rule) stays the automatic choice for linear until a committed GPU
        benchmark (``benchmarks/bench_linear.py``) shows where this GEMM wins
        (:data:`hessfast.dispatch.MEASURED`)."""
        return super().auto_reasons(call)

    def fwd_jvp(self, call: Call):
        x, w, b = call.args
        tx, tw, tb = call.tangents
        y, ydot = linear_fwd_jvp(x, w, b, tx, tw, tb)
        return y, ydot, (x, w, tx, tw, call.active)

    def bwd_jvp(self, res, g, gdot):
        x, w, tx, tw, active = res
        return linear_bwd_jvp(x, w, tx, tw, g, gdot, active[0], active[1], bool(active[2]))


IMPLEMENTATIONS = [TritonLinear()]
