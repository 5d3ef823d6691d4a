"""Broadcasting elementwise arithmetic: ``add``/``sub``/``rsub``/``neg`` (affine), ``mul`` (bilinear),
``div`` (``a / b``), and scaling by a python scalar.

Index conventions: the operands ``a`` (``self``) and ``b`` (``other``) broadcast, right-aligned, to
the output ``y``; either may be a python scalar or an inactive (possibly integer/bool) tensor. A
tangent ``ȧ`` is ``[K, *a.shape]``; :func:`lift` views it as ``[K, 1, …, 1, *a.shape]`` so that it
broadcasts against ``y`` with the K axis leading, and :func:`sum_to` reduces an output-shaped
cotangent (``[*y]`` or ``[K, *y]``) back to an operand's shape (the adjoint of broadcasting).
Tangents and cotangents are cast to the dtype of the value they belong to (type promotion may make
``y``'s dtype differ from an operand's).

Affine ops ``y = cₐ a + c_b b (+ const)``: ``ẏ = cₐ ȧ + c_b ḃ`` (expanded to ``[K, *y]`` when an
operand broadcasts), ``ḡ_a = sum_to(cₐ ḡ)``, ``ġ_a = sum_to(cₐ ġ)``; no second-order term.
Coefficients: ``add(a, b, α) = a + α b``, ``sub(a, b, α) = a − α b``, ``rsub(a, b, α) = b − α a``,
``neg(a) = −a``; the ``.Scalar`` overloads have a constant ``b``.

``mul(a, b) = a b``: ``ẏ = ȧ b + a ḃ``; ``ḡ_a = sum_to(ḡ b)``,
``ġ_a = sum_to(ġ b + ḡ ḃ)`` (the second-order term ``ḡ ḃ`` only when ``b`` is active too), and
symmetrically for ``b``.

``div(a, b) = a / b = y``: ``∂y/∂a = 1/b``, ``∂y/∂b = −y/b``, ``∂²y/∂a∂b = −1/b²``,
``∂²y/∂b² = 2y/b²``. With ``q = ḡ / b``:
``ẏ = (ȧ − y ḃ) / b``; ``ḡ_a = sum_to(q)``, ``ġ_a = sum_to((ġ − q ḃ) / b)``;
``ḡ_b = sum_to(−q y)``, ``ġ_b = sum_to((−ġ y + q (2 y ḃ − ȧ)) / b)``.

``mul.Scalar(a, s)``/``div.Scalar(a, s)``: ``ẏ = ȧ s`` (``ȧ / s``), cotangents likewise.

Declined: calls whose tensor operands sit on several devices while an active operand is 0-d (a
CPU scalar tensor's lifted tangent would no longer be a scalar).
"""

from __future__ import annotations

import torch

from .base import Call, Rule, add, invoke, lift, sum_to

Tensor = torch.Tensor
aten = torch.ops.aten


def _shape(x) -> tuple:
    return tuple(x.shape) if isinstance(x, Tensor) else ()


def _cast(t: Tensor | None, dtype) -> Tensor | None:
    if t is None or dtype is None or t.dtype == dtype:
        return t
    return t.to(dtype)


def _full(t: Tensor | None, shape) -> Tensor | None:
    """Expand a K-leading tangent to ``[K, *shape]`` (a view) where an operand broadcast."""
    if t is None:
        return None
    full = (t.shape[0], *shape)
    return t if tuple(t.shape) == full else t.expand(full)


def _tangent(call: Call, i: int) -> Tensor | None:
    if call.k == 0 or not call.active[i]:
        return None
    return call.tangents[i]


def _scale(t: Tensor | None, c) -> Tensor | None:
    if t is None:
        return None
    return t if c == 1 else t * c


class _Elementwise(Rule):
    def declines(self, call: Call) -> str | None:
        tensors = [a for a in call.args if isinstance(a, Tensor)]
        if len({t.device for t in tensors}) > 1 and any(
            isinstance(a, Tensor) and a.dim() == 0 and call.active[i]
            for i, a in enumerate(call.args)
        ):
            return "an active 0-d operand on another device than the other operands"
        return None


#: op -> function(alpha) giving the coefficients of (self, other); ``None``: other is a constant.
_AFFINE = {
    aten.add.Tensor: lambda al: (1, al),
    aten.sub.Tensor: lambda al: (1, -al),
    aten.rsub.Tensor: lambda al: (-al, 1),
    aten.add.Scalar: lambda al: (1, None),
    aten.sub.Scalar: lambda al: (1, None),
    aten.rsub.Scalar: lambda al: (-al, None),
    aten.neg.default: lambda al: (-1,),
}


class Affine(_Elementwise):
    """``add``/``sub``/``rsub`` (Tensor and Scalar overloads, with ``alpha``) and ``neg``."""

    ops = tuple(_AFFINE)
    name = "affine elementwise"

    def fwd_jvp(self, call: Call):
        y = invoke(call.op, call.args)
        alpha = call.args[2] if len(call.args) > 2 else 1
        coefs = _AFFINE[call.op](alpha)
        ydot = None
        for i, c in enumerate(coefs):
            if c is None:
                continue
            t = _tangent(call, i)
            if t is not None:
                ydot = add(ydot, _scale(lift(t, y.dim()), c))
        ydot = _cast(_full(ydot, y.shape), y.dtype)
        info = [
            (c, _shape(call.args[i]), call.args[i].dtype)
            if c is not None and call.active[i]
            else None
            for i, c in enumerate(coefs)
        ]
        return y, ydot, (info, len(call.args))

    def bwd_jvp(self, res, g, gdot):
        info, n = res
        gs, gds = [None] * n, [None] * n
        for i, entry in enumerate(info):
            if entry is None:
                continue
            c, shape, dtype = entry
            gs[i] = _cast(sum_to(_scale(g, c), shape, False), dtype)
            gds[i] = _cast(sum_to(_scale(gdot, c), shape, True), dtype)
        return tuple(gs), tuple(gds)


class Mul(_Elementwise):
    """``mul.Tensor``: ``y = a b`` with broadcasting (see the module docstring)."""

    ops = (aten.mul.Tensor,)
    name = "mul"

    def fwd_jvp(self, call: Call):
        a, b = call.args
        y = invoke(call.op, call.args)
        ta, tb = _tangent(call, 0), _tangent(call, 1)
        ydot = None
        if ta is not None:
            ydot = lift(ta, y.dim()) * b
        if tb is not None:
            ydot = add(ydot, a * lift(tb, y.dim()))
        ydot = _cast(_full(ydot, y.shape), y.dtype)
        act_a, act_b = bool(call.active[0]), bool(call.active[1])
        res = (
            a if act_b else None,
            b if act_a else None,
            ta if act_b else None,  # the second-order term of ġ_b
            tb if act_a else None,  # the second-order term of ġ_a
            act_a,
            act_b,
            _shape(a),
            _shape(b),
            getattr(a, "dtype", None),
            getattr(b, "dtype", None),
            y.dim(),
        )
        return y, ydot, res

    def bwd_jvp(self, res, g, gdot):
        a, b, ta, tb, act_a, act_b, sa, sb, da, db, ndim = res
        ga = gb = gda = gdb = None
        if act_a:
            if g is not None:
                ga = _cast(sum_to(g * b, sa, False), da)
            gd = gdot * b if gdot is not None else None
            if g is not None and tb is not None:
                gd = add(gd, g * lift(tb, ndim))
            gda = _cast(sum_to(gd, sa, True), da)
        if act_b:
            if g is not None:
                gb = _cast(sum_to(g * a, sb, False), db)
            gd = gdot * a if gdot is not None else None
            if g is not None and ta is not None:
                gd = add(gd, g * lift(ta, ndim))
            gdb = _cast(sum_to(gd, sb, True), db)
        return (ga, gb), (gda, gdb)


class Div(_Elementwise):
    """``div.Tensor``: ``y = a / b`` with broadcasting (see the module docstring)."""

    ops = (aten.div.Tensor,)
    name = "div"

    def fwd_jvp(self, call: Call):
        a, b = call.args
        y = invoke(call.op, call.args)
        ta, tb = _tangent(call, 0), _tangent(call, 1)
        num = lift(ta, y.dim()) if ta is not None else None
        if tb is not None:
            yb = y * lift(tb, y.dim())
            num = -yb if num is None else num - yb
        ydot = _cast(_full(num / b, y.shape), y.dtype) if num is not None else None
        act_a, act_b = bool(call.active[0]), bool(call.active[1])
        res = (
            y,
            b,
            ta if act_b else None,
            tb,
            act_a,
            act_b,
            _shape(a),
            _shape(b),
            getattr(a, "dtype", None),
            getattr(b, "dtype", None),
        )
        return y, ydot, res

    def bwd_jvp(self, res, g, gdot):
        y, b, ta, tb, act_a, act_b, sa, sb, da, db = res
        nd = y.dim()
        q = g / b if g is not None else None
        tbl = lift(tb, nd) if tb is not None else None
        ga = gb = gda = gdb = None
        if act_a:
            ga = _cast(sum_to(q, sa, False), da)
            num = gdot
            if q is not None and tbl is not None:
                qt = q * tbl
                num = -qt if num is None else num - qt
            if num is not None:
                gda = _cast(sum_to(num / b, sa, True), da)
        if act_b:
            if q is not None:
                gb = _cast(sum_to(-q * y, sb, False), db)
            num = -(gdot * y) if gdot is not None else None
            if q is not None and (tbl is not None or ta is not None):
                inner = 2 * y * tbl if tbl is not None else None
                if ta is not None:
                    tal = lift(ta, nd)
                    inner = -tal if inner is None else inner - tal
                num = add(num, q * inner)
            if num is not None:
                gdb = _cast(sum_to(num / b, sb, True), db)
        return (ga, gb), (gda, gdb)


class Scale(_Elementwise):
    """``mul.Scalar``/``div.Scalar``: ``y = a s`` or ``a / s`` with a python scalar ``s``."""

    ops = (aten.mul.Scalar, aten.div.Scalar)
    name = "scale"

    def fwd_jvp(self, call: Call):
        a, s = call.args
        y = invoke(call.op, call.args)
        div = call.op is aten.div.Scalar
        t = _tangent(call, 0)
        ydot = None
        if t is not None:
            ydot = _cast(t / s if div else t * s, y.dtype)
        return y, ydot, (s, div, a.dtype)

    def bwd_jvp(self, res, g, gdot):
        s, div, dtype = res

        def f(c):
            return None if c is None else _cast(c / s if div else c * s, dtype)

        return (f(g), None), (f(gdot), None)


RULES = [Affine(), Mul(), Div(), Scale()]
