"""Softmax and log-softmax along one dimension: ``aten.softmax.int``, ``aten._softmax``,
``aten.log_softmax.int``, ``aten._log_softmax``.

Index conventions: ``x`` and ``y`` have the same shape; ``⟨a, b⟩`` is ``Σ_dim a⊙b`` (kept as a size-1
axis so it broadcasts), ``Σ a`` the plain sum over ``dim``. Tangents carry a leading K axis, so the
reduction axis of a tangent is ``dim + 1`` (``dim`` normalised to be non-negative first).

Softmax ``y = softmax(x)``:

- ``ẏ = y⊙(ẋ − ⟨y, ẋ⟩)``;
- ``ḡ_x = y⊙(ḡ − ⟨y, ḡ⟩)``;
- ``ġ_x = y⊙(ġ − ⟨y, ġ⟩) + ẏ⊙(ḡ − ⟨y, ḡ⟩) − y⊙⟨ẏ, ḡ⟩``; the last two terms are the second-order
  ones (dropped without ``ḡ``).

Log-softmax ``y = log_softmax(x)``, ``p = exp(y)``:

- ``ẏ = ẋ − ⟨p, ẋ⟩``;
- ``ḡ_x = ḡ − p Σḡ``;
- ``ġ_x = ġ − p Σġ − (p⊙ẏ) Σḡ`` (the last term second order, from ``ṗ = p⊙ẏ``).

A dtype change (``softmax.int``'s ``dtype``, ``_softmax``'s ``half_to_float``) is a cast before the
op: tangents are cast to the output dtype in the forward, cotangents back to the input dtype in the
backward. Residuals: ``y`` and ``ẏ``. Declined: 0-d inputs, non-floating or complex dtypes.
"""

from __future__ import annotations

import torch

from .base import Call, Rule, add, invoke, nones

Tensor = torch.Tensor
aten = torch.ops.aten


def _out_dtype(call: Call) -> torch.dtype:
    x = call.args[0]
    if call.op in (aten.softmax.int, aten.log_softmax.int):
        return call.args[2] if call.args[2] is not None else x.dtype
    return torch.float32 if call.args[2] else x.dtype


def _dot(a: Tensor, b: Tensor, axis: int) -> Tensor:
    return (a * b).sum(axis, keepdim=True)


def softmax_fwd_jvp_ref(y: Tensor, tx: Tensor | None, dim: int) -> Tensor | None:
    """``ẏ = y⊙(ẋ − ⟨y, ẋ⟩)`` for ``ẋ [K, *y.shape]``; ``dim`` non-negative (a primal axis)."""
    if tx is None:
        return None
    return y * (tx - _dot(y, tx, dim + 1))


def softmax_bwd_jvp_ref(y, ydot, g, gdot, dim):
    """``(ḡ_x, ġ_x)`` for softmax (module docstring); any of ``ydot``, ``g``, ``gdot`` may be None."""
    gx = gdx = None
    if g is not None:
        u = g - _dot(y, g, dim)
        gx = y * u
        if ydot is not None:
            gdx = ydot * u - y * _dot(ydot, g, dim + 1)
    if gdot is not None:
        gdx = add(y * (gdot - _dot(y, gdot, dim + 1)), gdx)
    return gx, gdx


def log_softmax_fwd_jvp_ref(y: Tensor, tx: Tensor | None, dim: int) -> Tensor | None:
    """``ẏ = ẋ − ⟨p, ẋ⟩`` with ``p = exp(y)``."""
    if tx is None:
        return None
    return tx - _dot(torch.exp(y), tx, dim + 1)


def log_softmax_bwd_jvp_ref(y, ydot, g, gdot, dim):
    """``(ḡ_x, ġ_x)`` for log-softmax (module docstring)."""
    p = torch.exp(y)
    gx = gdx = None
    if g is not None:
        sg = g.sum(dim, keepdim=True)
        gx = g - p * sg
        if ydot is not None:
            gdx = -(p * ydot) * sg
    if gdot is not None:
        gdx = add(gdot - p * gdot.sum(dim + 1, keepdim=True), gdx)
    return gx, gdx


class _SoftmaxBase(Rule):
    fwd_ref = staticmethod(softmax_fwd_jvp_ref)
    bwd_ref = staticmethod(softmax_bwd_jvp_ref)

    def declines(self, call: Call) -> str | None:
        x = call.args[0]
        if not isinstance(x, Tensor) or not x.is_floating_point():
            return f"{self.name}: only real floating-point inputs are handled"
        if x.dim() == 0:
            return f"{self.name}: 0-d input"
        out = _out_dtype(call)
        if not isinstance(out, torch.dtype) or not out.is_floating_point:
            return f"{self.name}: output dtype {out} is not a real floating type"
        return None

    def fwd_jvp(self, call: Call):
        x, dim = call.args[0], call.args[1]
        d = dim % x.dim()
        y = invoke(call.op, call.args)
        tx = call.tangents[0]
        if tx is not None and tx.dtype != y.dtype:
            tx = tx.to(y.dtype)
        ydot = self.fwd_ref(y, tx, d)
        return y, ydot, (y, ydot, d, x.dtype, call.is_active(0), len(call.args))

    def bwd_jvp(self, res, g, gdot):
        y, ydot, d, in_dtype, active, nargs = res
        if not active or (g is None and gdot is None):
            return nones(nargs), nones(nargs)
        gx, gdx = self.bwd_ref(y, ydot, g, gdot, d)
        if gx is not None and gx.dtype != in_dtype:
            gx = gx.to(in_dtype)
        if gdx is not None and gdx.dtype != in_dtype:
            gdx = gdx.to(in_dtype)
        rest = nones(nargs - 1)
        return (gx, *rest), (gdx, *rest)


class Softmax(_SoftmaxBase):
    ops = (aten.softmax.int, aten._softmax.default)
    name = "softmax"


class LogSoftmax(_SoftmaxBase):
    ops = (aten.log_softmax.int, aten._log_softmax.default)
    name = "log_softmax"
    fwd_ref = staticmethod(log_softmax_fwd_jvp_ref)
    bwd_ref = staticmethod(log_softmax_bwd_jvp_ref)


RULES = [Softmax(), LogSoftmax()]
