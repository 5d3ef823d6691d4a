"""Elementwise unary activations and functions: one generic rule parameterised by ``(f, f′, f″)``.

For ``y = f(x)`` applied elementwise (``f`` may carry scalar parameters, ``call.args[1:]``):

- forward tangent: ``ẏ = f′(x) ẋ`` (``ẋ`` is ``[K, *x.shape]``, ``f′(x)`` broadcasts over K);
- backward: ``ḡ_x = f′(x) ḡ``;
- tangent of the backward: ``ġ_x = f′(x) ġ + f″(x) ẋ ḡ``. The last term is the op's second-order
  term: it is dropped when ``ḡ`` is absent (GGN mode) and computed alone when ``ġ`` is absent.

Residuals are minimal: the one tensor the derivatives are computed from (``x``, or ``y`` where
``f′`` and ``f″`` are cheapest in terms of the result, which a following layer usually holds
anyway) and, only for ops with ``f″ ≢ 0``, the input tangent ``ẋ``. ``f′`` and ``f″`` are recomputed
in the backward (elementwise, cheap), ``f″`` only when the second-order term is needed.

Kernels: where torch has a fused backward kernel for the op (``threshold_backward``,
``gelu_backward``, ``silu_backward``, ``tanh_backward``, ``sigmoid_backward``,
``leaky_relu_backward``, ``elu_backward``, ``hardtanh_backward``, ``softplus_backward``,
``hardswish_backward``, ``mish_backward``; ``log``:
one division) the products ``f′(x) c`` that need nothing else go through it, as in autograd: the
gradient ``ḡ_x`` alone, and ``ẏ`` / ``ġ_x`` for up to :data:`NATIVE_K` vectors. With more vectors, or
when ``f″`` is computed anyway (the second-order term), ``f′`` is formed once and multiplied.
Nothing of ``f″`` is computed in a gradient or GGN run.

Derivatives, with the conventions torch's autograd uses at kinks and region boundaries:

================  =====================================  ===========================================
op                f′                                     f″
================  =====================================  ===========================================
relu              [y > 0]                                0
gelu (erf)        Φ(x) + x φ(x)                          φ(x) (2 − x²)
gelu (tanh)       ½(1+t) + ½ x (1−t²) u′                 (1−t²) (u′ + ½ x (u″ − 2 t u′²))
                  t = tanh u, u = c (x + κ x³),          c = √(2/π), κ = 0.044715,
                  u′ = c (1 + 3κ x²)                     u″ = 6 c κ x
silu              s (1 + x (1−s)), s = σ(x)              s (1−s) (2 + x (1−2s))
tanh              1 − y²                                 −2 y (1 − y²)
sigmoid           y (1 − y)                              y (1 − y) (1 − 2y)
exp               y                                      y
log               1/x                                    −1/x²
sqrt              1/(2y)                                 −1/(4y³)
rsqrt             −½ y³                                  ¾ y⁵
pow (x ** p)      p x^(p−1)   (0 for p = 0)              p (p−1) x^(p−2)   (0 for p ∈ {0, 1})
sin               cos x                                  −sin x
cos               −sin x                                 −cos x
reciprocal        −y²                                    2 y³
abs               sgn x                                  0
softplus(β, θ)    σ(βx)   ([βx > θ]: 1)                  β σ(βx)(1 − σ(βx))   ([βx > θ]: 0)
leaky_relu(a)     [x > 0] + a [x ≤ 0]                    0
elu(α, s, i)      s [x > 0] + α s i e^{ix} [x ≤ 0]       α s i² e^{ix} [x ≤ 0]
hardtanh(lo, hi)  [lo < x < hi]                          0
square            2x                                     2
hardsigmoid       [−3 < x < 3] / 6                       0
hardswish         0 (x ≤ −3), x/3 + ½ (−3 < x < 3),      [−3 < x < 3] / 3
                  1 (x ≥ 3)
mish              t + x s (1 − t²),                      s (1 − t²) (2 + x (1 − s − 2 t s))
                  t = tanh(softplus x), s = σ(x)
================  =====================================  ===========================================

Declined (the engine uses the ``torch.func`` fallback): non-floating or complex inputs, ``gelu``
with an unknown ``approximate`` string, ``pow`` with a complex or non-numeric exponent.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Number
from typing import Any

import torch

from .base import Call, Rule, add, invoke, nones

Tensor = torch.Tensor
aten = torch.ops.aten

#: ``derivs(src, *params, second) -> (f′, f″ or None)``; ``src`` is ``x`` or ``y``; ``f″`` is only
#: computed when ``second`` is true (``None`` stands for zero).
Derivs = Callable[..., tuple[Any, Any]]

_SQRT_2_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_KAPPA = 0.044715


# ---- plain-torch derivative functions (see the table in the module docstring) -------------------


def relu_derivs(y, second=False):
    """From the result: ``f′ = [y > 0]`` (0 at the kink, as torch), ``f″ = 0``."""
    return (y > 0).to(y.dtype), None


def gelu_derivs(x, approximate="none", second=False):
    """Exact GELU ``x Φ(x)`` or its tanh approximation ``½ x (1 + tanh(c (x + κ x³)))``."""
    if approximate == "tanh":
        x2 = x * x
        u = _SQRT_2_PI * (x + _KAPPA * x2 * x)
        t = torch.tanh(u)
        sech2 = 1 - t * t
        du = _SQRT_2_PI * (1 + 3 * _KAPPA * x2)
        d1 = 0.5 * (1 + t) + 0.5 * x * sech2 * du
        d2 = None
        if second:
            ddu = (6 * _SQRT_2_PI * _KAPPA) * x
            d2 = sech2 * (du + 0.5 * x * (ddu - 2 * t * du * du))
        return d1, d2
    cdf = 0.5 * (1 + torch.erf(x * _INV_SQRT_2))
    pdf = _INV_SQRT_2PI * torch.exp(-0.5 * x * x)
    d1 = cdf + x * pdf
    d2 = pdf * (2 - x * x) if second else None
    return d1, d2


def gelu_d2(x, approximate="none"):
    """``f″`` of GELU alone (beside the fused ``gelu_backward`` for ``f′ ⊙ c``): exact,
    ``φ(x) (2 − x²)``; tanh approximation, from :func:`gelu_derivs`."""
    if approximate == "tanh":
        return gelu_derivs(x, approximate, second=True)[1]
    x2 = x * x
    return (_INV_SQRT_2PI * torch.exp(-0.5 * x2)) * (2 - x2)


def silu_derivs(x, second=False):
    """``x σ(x)``: ``f′ = s (1 + x (1−s))``, ``f″ = s (1−s) (2 + x (1−2s))``."""
    s = torch.sigmoid(x)
    ds = s * (1 - s)
    d1 = s + x * ds
    d2 = ds * (2 + x * (1 - 2 * s)) if second else None
    return d1, d2


def tanh_derivs(y, second=False):
    d1 = 1 - y * y
    return d1, (-2 * y * d1 if second else None)


def sigmoid_derivs(y, second=False):
    d1 = y * (1 - y)
    return d1, (d1 * (1 - 2 * y) if second else None)


def exp_derivs(y, second=False):
    return y, (y if second else None)


def log_derivs(x, second=False):
    r = torch.reciprocal(x)
    return r, (-(r * r) if second else None)


def sqrt_derivs(y, second=False):
    r = torch.reciprocal(y)
    return 0.5 * r, (-0.25 * r * r * r if second else None)


def rsqrt_derivs(y, second=False):
    y3 = y * y * y
    return -0.5 * y3, (0.75 * y3 * y * y if second else None)


def pow_derivs(x, p, second=False):
    """``x ** p`` for a real python number ``p``; ``p = 0`` and ``p = 1`` as torch (exact zeros)."""
    if p == 0:
        return torch.zeros_like(x), None
    if p == 1:
        return torch.ones_like(x), None
    d1 = p * x.pow(p - 1)
    d2 = None
    if second:
        d2 = 2.0 if p == 2 else (p * (p - 1)) * x.pow(p - 2)
    return d1, d2


def sin_derivs(x, second=False):
    return torch.cos(x), (-torch.sin(x) if second else None)


def cos_derivs(x, second=False):
    return -torch.sin(x), (-torch.cos(x) if second else None)


def reciprocal_derivs(y, second=False):
    y2 = y * y
    return -y2, (2 * y2 * y if second else None)


def abs_derivs(x, second=False):
    """``f′ = sgn x`` (0 at 0, as torch), ``f″ = 0``."""
    return torch.sign(x), None


def softplus_derivs(x, beta=1.0, threshold=20.0, second=False):
    """``log(1 + e^{βx}) / β`` where ``βx ≤ θ``, ``x`` (linear) where ``βx > θ``, as torch."""
    bx = x * beta
    lin = bx > threshold
    s = torch.sigmoid(bx)
    d1 = torch.where(lin, torch.ones_like(s), s)
    d2 = None
    if second:
        d2 = torch.where(lin, torch.zeros_like(s), beta * s * (1 - s))
    return d1, d2


def leaky_relu_derivs(x, negative_slope=0.01, second=False):
    one = torch.ones((), dtype=x.dtype, device=x.device)
    return torch.where(x > 0, one, one * negative_slope), None


def elu_derivs(x, alpha=1.0, scale=1.0, input_scale=1.0, second=False):
    """``s x`` for ``x > 0``, ``α s (e^{ix} − 1)`` for ``x ≤ 0`` (torch's boundary side)."""
    pos = x > 0
    e = torch.exp(x * input_scale) * (alpha * scale * input_scale)
    d1 = torch.where(pos, torch.full_like(x, scale), e)
    d2 = torch.where(pos, torch.zeros_like(x), e * input_scale) if second else None
    return d1, d2


def hardtanh_derivs(x, min_val=-1.0, max_val=1.0, second=False):
    """``f′ = [lo < x < hi]`` (0 on the boundaries, as torch), ``f″ = 0``."""
    return ((x > min_val) & (x < max_val)).to(x.dtype), None


def square_derivs(x, second=False):
    return 2 * x, (2.0 if second else None)


def hardsigmoid_derivs(x, second=False):
    """``relu6(x + 3) / 6``: ``f′ = [−3 < x < 3] / 6`` (0 on the boundaries, as torch), ``f″ = 0``."""
    return ((x > -3) & (x < 3)).to(x.dtype) * (1.0 / 6.0), None


def hardswish_derivs(x, second=False):
    """``x relu6(x + 3) / 6``: ``f′ = x/3 + ½`` on ``(−3, 3)``, 0 for ``x ≤ −3``, 1 for ``x ≥ 3``
    (the sides torch's ``hardswish_backward`` takes at the kinks); ``f″ = 1/3`` on ``(−3, 3)`` (as
    torch's double backward), 0 elsewhere."""
    mid = x * (1.0 / 3.0) + 0.5
    d1 = torch.where(x <= -3, torch.zeros_like(x), torch.where(x < 3, mid, torch.ones_like(x)))
    d2 = ((x > -3) & (x < 3)).to(x.dtype) * (1.0 / 3.0) if second else None
    return d1, d2


def mish_derivs(x, second=False):
    """``x tanh(softplus x)``: with ``t = tanh(softplus x)``, ``s = σ(x)`` (``t′ = s (1 − t²)``),
    ``f′ = t + x s (1 − t²)``, ``f″ = s (1 − t²) (2 + x (1 − s − 2 t s))``."""
    t = torch.tanh(torch.nn.functional.softplus(x))
    s = torch.sigmoid(x)
    ds = s * (1 - t * t)
    d1 = t + x * ds
    d2 = ds * (2 + x * (1 - s - 2 * t * s)) if second else None
    return d1, d2


# ---- fused ``f′(src) ⊙ c`` through torch's backward kernels ----------------------------------

#: Up to this many tangent vectors, ``f′ ⊙ ẋ`` and ``f′ ⊙ ġ`` call the fused kernel (on ``src``'s
#: shape, never broadcast: oneDNN's CPU ``gelu_backward`` rejects broadcasting, and a broadcast
#: operand's output layout can differ between fake and real tensors in a traced product); beyond
#: it ``f′`` is formed once and multiplied.
NATIVE_K = 1


def relu_vjp(c, y):
    return aten.threshold_backward(c, y, 0)


def gelu_vjp(c, x, approximate="none"):
    return aten.gelu_backward(c, x, approximate=approximate)


def silu_vjp(c, x):
    return aten.silu_backward(c, x)


def tanh_vjp(c, y):
    return aten.tanh_backward(c, y)


def sigmoid_vjp(c, y):
    return aten.sigmoid_backward(c, y)


def log_vjp(c, x):
    return c / x


def leaky_relu_vjp(c, x, negative_slope=0.01):
    return aten.leaky_relu_backward(c, x, negative_slope, False)


def elu_vjp(c, x, alpha=1.0, scale=1.0, input_scale=1.0):
    return aten.elu_backward(c, alpha, scale, input_scale, False, x)


def hardtanh_vjp(c, x, min_val=-1.0, max_val=1.0):
    return aten.hardtanh_backward(c, x, min_val, max_val)


def softplus_vjp(c, x, beta=1.0, threshold=20.0):
    return aten.softplus_backward(c, x, beta, threshold)


def hardswish_vjp(c, x):
    return aten.hardswish_backward(c, x)


def mish_vjp(c, x):
    return aten.mish_backward(c, x)


#: The fused ``f′ ⊙ c`` of each op that has one: a property of the op, so every rule built for it
#: (whatever its ``derivs``) computes these products with the same kernel.
FUSED_VJP = {
    aten.relu.default: relu_vjp,
    aten.gelu.default: gelu_vjp,
    aten.silu.default: silu_vjp,
    aten.tanh.default: tanh_vjp,
    aten.sigmoid.default: sigmoid_vjp,
    aten.log.default: log_vjp,
    aten.leaky_relu.default: leaky_relu_vjp,
    aten.elu.default: elu_vjp,
    aten.hardtanh.default: hardtanh_vjp,
    aten.softplus.default: softplus_vjp,
    aten.hardswish.default: hardswish_vjp,
    aten.mish.default: mish_vjp,
}


# ---- the generic rule ---------------------------------------------------------------------------


class ElementwiseUnary(Rule):
    """``y = f(x, *params)`` elementwise, from ``f`` (default: the aten op), ``f′`` and ``f″``.

    ``derivs(src, *params, second=...)`` returns ``(f′, f″)`` evaluated at ``src``, which is ``x``
    (``from_result=False``) or ``y`` (``from_result=True``). ``curved=False`` marks ``f″ ≡ 0``: the
    input tangent is then not kept and the second-order term never computed. ``check(args)`` may
    return a reason to decline. ``vjp(c, src, *params)`` computes ``f′(src) ⊙ c`` with a fused
    kernel, ``c`` of ``src``'s shape; by default the op's entry of
    :data:`FUSED_VJP`, ``False`` for none. ``d2(src, *params)`` computes ``f″`` alone: where it
    is given, the second-order backward keeps the fused kernel for ``f′ ⊙ ḡ`` and ``f′ ⊙ ġ`` and
    forms only ``f″`` (fewer passes than forming ``f′`` too, as autograd's double backward).
    """

    def __init__(
        self,
        op: Any,
        name: str,
        derivs: Derivs,
        *,
        from_result: bool = False,
        curved: bool = True,
        f: Callable[..., Tensor] | None = None,
        check: Callable[[tuple], str | None] | None = None,
        vjp: Callable[..., Tensor] | None | bool = None,
        d2: Callable[..., Tensor] | None = None,
    ):
        self.op = op
        self.ops = (op,)
        self.name = name
        self.derivs = derivs
        self.from_result = from_result
        self.curved = curved
        self.f = f
        self.check = check
        self.vjp = FUSED_VJP.get(op) if vjp is None else (vjp or None)
        self.d2 = d2

    def declines(self, call: Call) -> str | None:
        x = call.args[0]
        if not isinstance(x, Tensor):
            return f"{self.name}: input is not a tensor"
        if not x.is_floating_point():
            return f"{self.name}: only real floating-point inputs are handled"
        if self.check is not None:
            return self.check(call.args)
        return None

    def fwd_jvp(self, call: Call):
        x, params = call.args[0], tuple(call.args[1:])
        tx = call.tangents[0] if call.is_active(0) else None
        y = self.f(x, *params) if self.f is not None else invoke(self.op, call.args)
        src = y if self.from_result else x
        ydot = None
        if tx is not None:
            if self.vjp is not None and tx.shape[0] <= NATIVE_K:
                ydot = self.vjp(tx[0], src, *params).unsqueeze(0)
            else:
                d1, _ = self.derivs(src, *params, second=False)
                ydot = d1 * tx
        keep_tx = tx if self.curved else None
        return y, ydot, (src, keep_tx, params, call.is_active(0), len(call.args))

    def bwd_jvp(self, res, g, gdot):
        src, tx, params, active, nargs = res
        if not active or (g is None and gdot is None):
            return nones(nargs), nones(nargs)
        second = self.curved and g is not None and tx is not None
        fused = self.vjp is not None and (not second or self.d2 is not None)
        gx = gdx = None
        if fused and (gdot is None or gdot.shape[0] <= NATIVE_K):
            # f′ is not needed otherwise: the fused kernel, as autograd's backward
            gx = self.vjp(g, src, *params) if g is not None else None
            if gdot is not None:
                gdx = self.vjp(gdot[0], src, *params).unsqueeze(0)
            if second:
                gdx = add(gdx, (self.d2(src, *params) * g) * tx)
        else:
            d1, d2 = self.derivs(src, *params, second=second)
            gx = d1 * g if g is not None else None
            gdx = d1 * gdot if gdot is not None else None
            if second and d2 is not None:
                gdx = add(gdx, (d2 * g) * tx)
        rest = nones(nargs - 1)
        return (gx, *rest), (gdx, *rest)


def _gelu_check(args) -> str | None:
    if args[1] not in ("none", "tanh"):
        return f"gelu: unknown approximate={args[1]!r}"
    return None


def _pow_check(args) -> str | None:
    p = args[1]
    if isinstance(p, (bool, complex)) or not isinstance(p, Number):
        return f"pow: exponent {p!r} is not a real python number"
    return None


RULES = [
    ElementwiseUnary(aten.relu.default, "relu", relu_derivs, from_result=True, curved=False),
    ElementwiseUnary(aten.gelu.default, "gelu", gelu_derivs, check=_gelu_check, d2=gelu_d2),
    ElementwiseUnary(aten.silu.default, "silu", silu_derivs),
    ElementwiseUnary(aten.tanh.default, "tanh", tanh_derivs, from_result=True),
    ElementwiseUnary(aten.sigmoid.default, "sigmoid", sigmoid_derivs, from_result=True),
    ElementwiseUnary(aten.exp.default, "exp", exp_derivs, from_result=True),
    ElementwiseUnary(aten.log.default, "log", log_derivs),
    ElementwiseUnary(aten.sqrt.default, "sqrt", sqrt_derivs, from_result=True),
    ElementwiseUnary(aten.rsqrt.default, "rsqrt", rsqrt_derivs, from_result=True),
    ElementwiseUnary(aten.pow.Tensor_Scalar, "pow", pow_derivs, check=_pow_check),
    ElementwiseUnary(aten.sin.default, "sin", sin_derivs),
    ElementwiseUnary(aten.cos.default, "cos", cos_derivs),
    ElementwiseUnary(aten.reciprocal.default, "reciprocal", reciprocal_derivs, from_result=True),
    ElementwiseUnary(aten.abs.default, "abs", abs_derivs, curved=False),
    ElementwiseUnary(aten.softplus.default, "softplus", softplus_derivs),
    ElementwiseUnary(aten.leaky_relu.default, "leaky_relu", leaky_relu_derivs, curved=False),
    ElementwiseUnary(aten.elu.default, "elu", elu_derivs),
    ElementwiseUnary(aten.hardtanh.default, "hardtanh", hardtanh_derivs, curved=False),
    ElementwiseUnary(aten.square.default, "square", square_derivs),
    # not torch's hardsigmoid_backward: on the CPU it multiplies float64 by a float32 1/6 (3e-8 off)
    ElementwiseUnary(
        aten.hardsigmoid.default, "hardsigmoid", hardsigmoid_derivs, curved=False, vjp=False
    ),
    ElementwiseUnary(aten.hardswish.default, "hardswish", hardswish_derivs),
    ElementwiseUnary(aten.mish.default, "mish", mish_derivs),
]
