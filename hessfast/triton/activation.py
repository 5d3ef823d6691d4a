"""Fused Triton kernels for the elementwise activations relu, gelu (erf and tanh), silu, tanh,
sigmoid and hardswish: the same contract and residuals as :class:`hessfast.rules.activation.ElementwiseUnary`.

For ``y = f(x)`` elementwise, with ``x`` of N elements, K tangents ``ẋ`` of shape ``[K, *x.shape]``,
the cotangent ``ḡ`` (shape of ``y``) and its K tangents ``ġ`` (``[K, *y.shape]``):

- forward (one launch): ``y = f(x)`` and ``ẏ_k = f′(x) ẋ_k`` for every k;
- backward (one launch): ``ḡ_x = f′ ḡ`` and ``ġ_x,k = f′ ġ_k + f″ ẋ_k ḡ``; the second term is
  dropped in GGN mode (``ḡ`` absent), computed alone when ``ġ`` is absent, and never computed for
  relu (``f″ ≡ 0``); a gradient-only run (K = 0) writes ``ḡ_x`` alone.

``f′`` and ``f″`` (the table in :mod:`hessfast.rules.activation`) are computed in registers from
the residual source: the result ``y`` for relu, tanh and sigmoid, the input ``x`` for gelu,
silu and hardswish (``f′ = x/3 + ½`` and ``f″ = 1/3`` on ``(−3, 3)``, the torch rule's sides at
the kinks). The residuals are ``(source, ẋ or None, ...)`` as in the torch rule: ``ẋ`` only for curved
ops. Each program owns a ``BLOCK`` of the flattened tensor: it reads its slice of the source (and
``ḡ``) once, computes ``f′`` (and ``f″ ḡ``) once, then loops over the K tangent rows, reading
``ẋ_k`` / ``ġ_k`` and writing ``ẏ_k`` / ``ġ_x,k`` once each (row k starts k·N elements further;
offsets are int64, so N and K·N may exceed 2³¹).

Math runs in float32 for float16 / bfloat16 / float32 inputs and in float64 for float64; outputs
have the dtype torch's promotion gives the reference (the input's dtype when all operands share
it). ``tanh`` is evaluated from ``exp`` (``e = exp(−2|u|)``), with a Taylor polynomial for
``|u| < 0.55`` where the quotient of ``e`` would lose relative accuracy (about 2 ulps throughout);
gelu-tanh's ``½(1 + tanh u)`` and ``sech² u`` are quotients of ``e`` without cancellation, so its
``y`` keeps its relative accuracy for large negative ``x`` (torch's float32 ``gelu`` loses it:
30% at ``x = −5``); ``erf`` is Triton's ``tl.math.erf`` (gelu-erf's ``1 + erf`` cancels for
negative ``x``, as torch's does). No libdevice call: the same code runs in Triton's interpreter
and compiled on the GPU.

Bytes moved per element of ``x`` (``s`` = element size, all operands of one dtype), the model
behind a benchmark's GB/s:

=========================  ============================  ===============================
call                       curved (all but relu)         relu
=========================  ============================  ===============================
fwd_jvp                    (2 + 2K) s                    (2 + 2K) s
bwd_jvp hvp                (3 + 3K) s                    (3 + 2K) s
bwd_jvp hvp, ``ġ`` None    (3 + 2K) s                    3 s (ḡ_x only; ġ_x is None)
bwd_jvp ggn (``ḡ`` None)   (1 + 2K) s                    (1 + 2K) s
bwd_jvp grad (K = 0)       3 s                           3 s
=========================  ============================  ===============================

Declined: non-tensor, non-floating or complex inputs, and ``gelu`` with an ``approximate`` other
than ``"none"`` or ``"tanh"``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton
import triton.language as tl

from ..rules.base import Call, nones
from . import TritonRule, absent, on_device

Tensor = torch.Tensor
aten = torch.ops.aten

#: Activation codes (the kernels' ``ACT`` constexpr).
RELU, GELU_ERF, GELU_TANH, SILU, TANH, SIGMOID, HARDSWISH = range(7)
_RELU = tl.constexpr(RELU)
_GELU_ERF = tl.constexpr(GELU_ERF)
_GELU_TANH = tl.constexpr(GELU_TANH)
_SILU = tl.constexpr(SILU)
_TANH = tl.constexpr(TANH)
_SIGMOID = tl.constexpr(SIGMOID)
_THIRD = tl.constexpr(1.0 / 3.0)

_SQRT_2_PI = tl.constexpr(math.sqrt(2.0 / math.pi))
_INV_SQRT_2 = tl.constexpr(1.0 / math.sqrt(2.0))
_INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
_KAPPA = tl.constexpr(0.044715)
# (The interpreter needs a tensor on the left of every operator with one of these constants.)

# tanh h = h (1 + Σ_n T_{2n+1} h^{2n}): the Taylor coefficients 2^{2n}(2^{2n}−1) B_{2n} / (2n)!.
# For |h| < 0.275 the first omitted term is below 2e-17 relative.
_T3 = tl.constexpr(-1 / 3)
_T5 = tl.constexpr(2 / 15)
_T7 = tl.constexpr(-17 / 315)
_T9 = tl.constexpr(62 / 2835)
_T11 = tl.constexpr(-1382 / 155925)
_T13 = tl.constexpr(21844 / 6081075)
_T15 = tl.constexpr(-929569 / 638512875)
_T17 = tl.constexpr(6404582 / 10854718875)
_T19 = tl.constexpr(-443861162 / 1856156927625)
_T21 = tl.constexpr(18888466084 / 194896477400625)

#: Elements per program and warps per program of both kernels.
BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _tanh(u):
    """``tanh u`` to about 2 ulps. Below ``|u| < 0.55`` (``|tanh u| < ½``): the Taylor polynomial
    at ``h = u/2`` and ``tanh u = 2 tanh h / (1 + tanh² h)``; above: ``tanh |u| = 1 − 2e/(1 + e)``
    with ``e = exp(−2|u|)`` (no overflow, exact limits)."""
    a = tl.abs(u)
    h = 0.5 * u
    z = h * h
    p = z * _T21 + _T19
    p = z * p + _T17
    p = z * p + _T15
    p = z * p + _T13
    p = z * p + _T11
    p = z * p + _T9
    p = z * p + _T7
    p = z * p + _T5
    p = z * p + _T3
    th = h + h * (z * p)
    e = tl.exp(-2.0 * a)
    big = 1.0 - 2.0 * e / (1.0 + e)
    return tl.where(a < 0.55, 2.0 * th / (1.0 + th * th), tl.where(u < 0, -big, big))


@triton.jit
def _tanh_parts(u):
    """``(½(1 + tanh u), tanh u, sech² u)`` from ``e = exp(−2|u|)``, ``r = 1/(1 + e)``:
    ``½(1 + tanh u) = σ(2u)`` is ``r`` (``u ≥ 0``) or ``e r`` (``u < 0``) and ``sech² u = 4 e r²``,
    both without cancellation (``1 + tanh`` and ``1 − tanh²`` would lose them for large ``|u|``);
    ``tanh u = ±(1 − 2 e r)`` is accurate to an ulp in absolute terms, all it is used for."""
    e = tl.exp(-2.0 * tl.abs(u))
    r = 1.0 / (1.0 + e)
    er = e * r
    pos = u >= 0
    return tl.where(pos, r, er), tl.where(pos, 1.0 - 2.0 * er, 2.0 * er - 1.0), 4.0 * er * r


@triton.jit
def _sigmoid(x):
    """``(σ(x), 1 − σ(x))``, the second without cancellation for ``x ≥ 0`` (``e^{−x} σ(x)``)."""
    e = tl.exp(-x)
    s = 1.0 / (1.0 + e)
    return s, tl.where(x >= 0, e * s, 1.0 - s)


@triton.jit
def _store(ptrs, v, mask):
    """Store ``v`` in the dtype of ``ptrs``, rounded to nearest even. bfloat16 is rounded with
    integer operations on the float32 bits (what the GPU's ``cvt.rn.bf16.f32`` does): Triton's
    interpreter truncates its float32 → bfloat16 casts, and this way both give the same bits."""
    if ptrs.dtype.element_ty == tl.bfloat16:
        v32 = v.to(tl.float32)
        bits = v32.to(tl.uint32, bitcast=True)
        bits += ((bits >> 16) & 1) + 0x7FFF
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        tl.store(ptrs, tl.where(v32 == v32, out, v32.to(tl.bfloat16)), mask=mask)
    else:
        tl.store(ptrs, v.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _value(x, ACT: tl.constexpr):
    """``y = f(x)``."""
    if ACT == _RELU:
        y = tl.where(x < 0, 0.0, x)
    elif ACT == _GELU_ERF:
        y = 0.5 * x * (1.0 + tl.math.erf(x * _INV_SQRT_2))
    elif ACT == _GELU_TANH:
        q, _, _ = _tanh_parts((x + x * x * x * _KAPPA) * _SQRT_2_PI)
        y = x * q
    elif ACT == _SILU:
        s, _ = _sigmoid(x)
        y = x * s
    elif ACT == _TANH:
        y = _tanh(x)
    elif ACT == _SIGMOID:
        y, _ = _sigmoid(x)
    else:  # hardswish: x relu6(x + 3) / 6 (NaN propagates)
        r = x + 3.0
        y = x * tl.where(r < 0, 0.0, tl.where(r > 6.0, 6.0, r)) / 6.0
    return y


@triton.jit
def _slope(src, ACT: tl.constexpr):
    """``f′`` from the residual source: ``y`` for relu, tanh and sigmoid, ``x`` otherwise."""
    if ACT == _RELU:
        d1 = tl.where(src > 0, 1.0, 0.0)
    elif ACT == _GELU_ERF:
        cdf = 0.5 * (1.0 + tl.math.erf(src * _INV_SQRT_2))
        d1 = cdf + src * (tl.exp(-0.5 * src * src) * _INV_SQRT_2PI)
    elif ACT == _GELU_TANH:
        x2 = src * src
        q, _, sech2 = _tanh_parts((src + x2 * src * _KAPPA) * _SQRT_2_PI)
        du = (1.0 + x2 * (3.0 * _KAPPA)) * _SQRT_2_PI
        d1 = q + 0.5 * src * sech2 * du
    elif ACT == _SILU:
        s, s1 = _sigmoid(src)
        d1 = s + src * (s * s1)
    elif ACT == _TANH:
        d1 = 1.0 - src * src
    elif ACT == _SIGMOID:
        d1 = src * (1.0 - src)
    else:  # hardswish
        d1 = tl.where(src <= -3.0, 0.0, tl.where(src < 3.0, src * _THIRD + 0.5, 1.0))
    return d1


@triton.jit
def _curvature(src, ACT: tl.constexpr):
    """``f″`` from the residual source, for the curved ops (relu, with ``f″ ≡ 0``, never asks)."""
    if ACT == _GELU_ERF:
        d2 = (tl.exp(-0.5 * src * src) * _INV_SQRT_2PI) * (2.0 - src * src)
    elif ACT == _GELU_TANH:
        x2 = src * src
        _, t, sech2 = _tanh_parts((src + x2 * src * _KAPPA) * _SQRT_2_PI)
        du = (1.0 + x2 * (3.0 * _KAPPA)) * _SQRT_2_PI
        ddu = src * (6.0 * _SQRT_2_PI * _KAPPA)
        d2 = sech2 * (du + 0.5 * src * (ddu - 2.0 * t * du * du))
    elif ACT == _SILU:
        s, s1 = _sigmoid(src)
        d2 = s * s1 * (2.0 + src * (s1 - s))
    elif ACT == _TANH:
        d2 = -2.0 * src * (1.0 - src * src)
    elif ACT == _SIGMOID:
        d2 = src * (1.0 - src) * (1.0 - 2.0 * src)
    else:  # hardswish
        d2 = ((src > -3.0) & (src < 3.0)).to(src.dtype) * _THIRD
    return d2


@triton.jit
def _fwd_kernel(
    x_ptr,
    tx_ptr,
    y_ptr,
    ty_ptr,
    N,
    K,
    ACT: tl.constexpr,
    FROM_RESULT: tl.constexpr,
    CDT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``y = f(x)``; ``ẏ_k = f′ ẋ_k`` for k < K (rows of N elements, K may be 0)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(CDT)
    y = _value(x, ACT)
    _store(y_ptr + offs, y, mask)
    if FROM_RESULT:
        d1 = _slope(y, ACT)
    else:
        d1 = _slope(x, ACT)
    tx_ptrs = tx_ptr + offs
    ty_ptrs = ty_ptr + offs
    for _ in range(K):
        tx = tl.load(tx_ptrs, mask=mask, other=0.0).to(CDT)
        _store(ty_ptrs, d1 * tx, mask)
        tx_ptrs += N
        ty_ptrs += N


@triton.jit
def _bwd_kernel(
    src_ptr,
    g_ptr,
    gd_ptr,
    tx_ptr,
    gx_ptr,
    gdx_ptr,
    N,
    K,
    ACT: tl.constexpr,
    HAS_G: tl.constexpr,
    HAS_GDOT: tl.constexpr,
    SECOND: tl.constexpr,
    CDT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``ḡ_x = f′ ḡ`` (``HAS_G``); ``ġ_x,k = f′ ġ_k`` (``HAS_GDOT``) ``+ f″ ḡ ẋ_k`` (``SECOND``,
    which implies ``HAS_G``) for k < K."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    src = tl.load(src_ptr + offs, mask=mask, other=0.0).to(CDT)
    d1 = _slope(src, ACT)
    if HAS_G:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(CDT)
        _store(gx_ptr + offs, d1 * g, mask)
        if SECOND:
            w = _curvature(src, ACT) * g
    if HAS_GDOT or SECOND:
        gd_ptrs = gd_ptr + offs
        tx_ptrs = tx_ptr + offs
        gdx_ptrs = gdx_ptr + offs
        for _ in range(K):
            if HAS_GDOT:
                acc = d1 * tl.load(gd_ptrs, mask=mask, other=0.0).to(CDT)
                if SECOND:
                    acc += w * tl.load(tx_ptrs, mask=mask, other=0.0).to(CDT)
            else:
                acc = w * tl.load(tx_ptrs, mask=mask, other=0.0).to(CDT)
            _store(gdx_ptrs, acc, mask)
            gd_ptrs += N
            tx_ptrs += N
            gdx_ptrs += N


def _compute_dtype(*tensors: Tensor | None) -> tl.dtype:
    """float64 math when any operand is float64, else float32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return tl.float64
    return tl.float32


def _promote(*tensors: Tensor | None) -> torch.dtype:
    dts = [t.dtype for t in tensors if t is not None]
    out = dts[0]
    for dt in dts[1:]:
        out = torch.promote_types(out, dt)
    return out


def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


def _fwd_shapes(x: Tensor, tx: Tensor | None) -> tuple[Tensor, Tensor]:
    """The empty outputs ``(y, ẏ)`` of :func:`fwd` (``ẏ`` :func:`absent` without ``tx``)."""
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if tx is None:
        return y, absent(x)
    return y, torch.empty(tx.shape, dtype=_promote(x, tx), device=x.device)


@torch.library.custom_op("hessfast::triton_act_fwd_jvp", mutates_args=())
def _fwd_op(x: Tensor, tx: Tensor | None, act: int, from_result: bool) -> tuple[Tensor, Tensor]:
    """:func:`fwd` as an op: ``ẏ`` is an empty tensor when ``tx`` is ``None``."""
    x = x.contiguous()
    tx = _contiguous(tx)
    y, ydot = _fwd_shapes(x, tx)
    n = x.numel()
    if n:
        with on_device(x):
            _fwd_kernel[_grid(n)](
                x,
                tx if tx is not None else x,
                y,
                ydot if tx is not None else y,
                n,
                0 if tx is None else tx.shape[0],
                ACT=act,
                FROM_RESULT=from_result,
                CDT=_compute_dtype(x, tx),
                BLOCK=BLOCK,
                num_warps=NUM_WARPS,
            )
    return y, ydot


@_fwd_op.register_fake
def _(x: Tensor, tx: Tensor | None, act: int, from_result: bool) -> tuple[Tensor, Tensor]:
    return _fwd_shapes(x, tx)


def fwd(act: int, x: Tensor, tx: Tensor | None, from_result: bool) -> tuple[Tensor, Tensor | None]:
    """``(y, ẏ)`` for ``x`` and ``tx`` (``[K, *x.shape]`` or ``None``), both made contiguous:
    one launch of ``hessfast::triton_act_fwd_jvp``."""
    y, ydot = _fwd_op(x, tx, act, from_result)
    return y, (ydot if tx is not None else None)


def _bwd_shapes(
    src: Tensor, g: Tensor | None, gdot: Tensor | None, tx: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The empty outputs ``(ḡ_x, ġ_x)`` of :func:`bwd` (:func:`absent` where ``None``)."""
    second = g is not None and tx is not None
    gx = absent(src)
    if g is not None:
        gx = torch.empty(g.shape, dtype=_promote(src, g), device=src.device)
    gdx = absent(src)
    if gdot is not None or second:
        rows = gdot if gdot is not None else tx
        parts = (src, gdot, g, tx) if second else (src, gdot)
        gdx = torch.empty(rows.shape, dtype=_promote(*parts), device=src.device)
    return gx, gdx


@torch.library.custom_op("hessfast::triton_act_bwd_jvp", mutates_args=())
def _bwd_op(
    src: Tensor, g: Tensor | None, gdot: Tensor | None, tx: Tensor | None, act: int
) -> tuple[Tensor, Tensor]:
    """:func:`bwd` as an op: an output that :func:`bwd` returns as ``None`` is an empty tensor."""
    src, g, gdot, tx = (_contiguous(t) for t in (src, g, gdot, tx))
    second = g is not None and tx is not None
    gx, gdx = _bwd_shapes(src, g, gdot, tx)
    has_gdx = gdot is not None or second
    k = 0
    if has_gdx:
        k = (gdot if gdot is not None else tx).shape[0]
    n = src.numel()
    if n:
        with on_device(src):
            _bwd_kernel[_grid(n)](
                src,
                g if g is not None else src,
                gdot if gdot is not None else src,
                tx if second else src,
                gx if g is not None else gdx,
                gdx if has_gdx else gx,
                n,
                k,
                ACT=act,
                HAS_G=g is not None,
                HAS_GDOT=gdot is not None,
                SECOND=second,
                CDT=_compute_dtype(src, g, gdot, tx if second else None),
                BLOCK=BLOCK,
                num_warps=NUM_WARPS,
            )
    return gx, gdx


@_bwd_op.register_fake
def _(
    src: Tensor, g: Tensor | None, gdot: Tensor | None, tx: Tensor | None, act: int
) -> tuple[Tensor, Tensor]:
    return _bwd_shapes(src, g, gdot, tx)


def bwd(
    act: int, src: Tensor, g: Tensor | None, gdot: Tensor | None, tx: Tensor | None
) -> tuple[Tensor | None, Tensor | None]:
    """``(ḡ_x, ġ_x)``, at least one of ``g`` and ``gdot`` present; ``tx`` (the saved ``ẋ``)
    non-``None`` asks for the second-order term, computed when ``g`` is present. Returns ``None``
    for a zero result (``ḡ_x`` without ``g``, ``ġ_x`` without ``gdot`` and without the
    second-order term). One launch of ``hessfast::triton_act_bwd_jvp``; operands are made
    contiguous."""
    gx, gdx = _bwd_op(src, g, gdot, tx, act)
    has_gdx = gdot is not None or (g is not None and tx is not None)
    return (gx if g is not None else None), (gdx if has_gdx else None)


def _contiguous(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.contiguous()


class TritonActivation(TritonRule):
    """One activation op on the fused kernels (see the module docstring).

    ``from_result``: the derivatives are computed from ``y`` (relu, tanh, sigmoid), else from
    ``x``; ``curved``: ``f″ ≢ 0``, so ``ẋ`` is kept for the second-order term. Non-contiguous
    inputs, tangents and cotangents are made contiguous (one copy) before the launch; the outputs
    are contiguous.
    """

    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    #: Against the float64 oracle. float32: a few ulps of exp / erf / division (the GPU's fast
    #: ``exp`` included); half types: one rounding of a float32 result (the harness also holds
    #: them to 2× plain torch's error).
    tolerances = {
        torch.float32: (2e-5, 1e-5),
        torch.bfloat16: (2e-2, 2e-2),
        torch.float16: (4e-3, 4e-3),
        torch.float64: (1e-10, 1e-12),
    }

    def __init__(self, op: Any, name: str, act: int, *, from_result: bool, curved: bool):
        self.op = op
        self.ops = (op,)
        self.name = name
        self.act = act
        self.from_result = from_result
        self.curved = curved

    def code(self, args: tuple) -> int:
        """The kernels' activation code (the ``ACT`` constexpr) for these arguments."""
        return self.act

    def not_supported_reasons(self, call: Call) -> list[str]:
        x = call.args[0]
        if not isinstance(x, Tensor):
            return [f"{self.name}: input is not a tensor"]
        if not x.is_floating_point():
            return [f"{self.name}: only real floating-point inputs are handled, not {x.dtype}"]
        return []

    def fwd_jvp(self, call: Call) -> tuple[Tensor, Tensor | None, tuple]:
        x = call.args[0].contiguous()
        tx = _contiguous(call.tangents[0]) if call.is_active(0) else None  # as the torch rule
        act = self.code(call.args)
        y, ydot = fwd(act, x, tx, self.from_result)
        src = y if self.from_result else x
        res = (src, tx if self.curved else None, act, call.is_active(0), len(call.args))
        return y, ydot, res

    def bwd_jvp(self, res: tuple, g: Tensor | None, gdot: Tensor | None) -> tuple[tuple, tuple]:
        src, tx, act, active, nargs = res
        if not active or (g is None and gdot is None):
            return nones(nargs), nones(nargs)
        gx, gdx = bwd(act, src, _contiguous(g), _contiguous(gdot), tx if self.curved else None)
        rest = nones(nargs - 1)
        return (gx, *rest), (gdx, *rest)


class TritonGelu(TritonActivation):
    """``gelu`` with ``approximate="none"`` (erf) or ``"tanh"``: the code depends on the call."""

    def __init__(self) -> None:
        super().__init__(aten.gelu.default, "gelu", GELU_ERF, from_result=False, curved=True)

    def code(self, args: tuple) -> int:
        return GELU_TANH if args[1] == "tanh" else GELU_ERF

    def not_supported_reasons(self, call: Call) -> list[str]:
        why = super().not_supported_reasons(call)
        if call.args[1] not in ("none", "tanh"):
            why.append(f"{self.name}: unknown approximate={call.args[1]!r}")
        return why


IMPLEMENTATIONS = [
    TritonActivation(aten.relu.default, "relu", RELU, from_result=True, curved=False),
    TritonGelu(),
    TritonActivation(aten.silu.default, "silu", SILU, from_result=False, curved=True),
    TritonActivation(aten.tanh.default, "tanh", TANH, from_result=True, curved=True),
    TritonActivation(aten.sigmoid.default, "sigmoid", SIGMOID, from_result=True, curved=True),
    TritonActivation(
        aten.hardswish.default, "hardswish", HARDSWISH, from_result=False, curved=True
    ),
]
