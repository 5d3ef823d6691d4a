"""Arithmetic on curvature operators: lazy sums, scalings, products, adjoints and the identity.

``H - G``, ``H + G``, ``a * H``, ``H / a``, ``-H``, ``H + λ * I``, ``H.shift(λ)``, ``A @ B``,
``H.T`` build operators that hold their parts and multiply through them only when asked: a
product ``(A + B) @ V`` of a ``[P, K]`` block is ``A @ V + B @ V``, every part K-batched, and each
result is again a :class:`~hessfast.operators.CurvatureOperator` (``shape``, ``dtype``,
``device``, ``matmat``, ``to_scipy()``) that every algorithm of :mod:`hessfast.algorithms`
accepts. The dunder methods live on :class:`~hessfast.operators.CurvatureOperator`; this module
holds the composite classes and the rules:

- terms are collected: ``H + H`` is ``2 H`` (one product, not two), a scaling of a sum scales its
  terms, scalars move out of products (``(2 A) @ B`` is ``2 (A @ B)``), identities drop out of
  products;
- ``H - G`` of a :class:`~hessfast.HessianOperator` and a :class:`~hessfast.GGNOperator` built on
  the same model, loss, data, parameters and settings is the residual ``R = H − G`` as one
  operator, :class:`hessfast.operators.ResidualOperator`, whose product costs one engine pass
  rather than two (when this hessfast has it; otherwise the lazy difference);
- parts must share ``shape``, ``dtype`` and ``device``, and model operators the model and the
  parameters: anything else is a ``ValueError`` saying what differs;
- ``symmetric``: sums and scalings of symmetric operators are symmetric; a product is known
  symmetric only when its factors read the same backwards (``A @ A``, ``A @ B @ A``); otherwise
  its adjoint is the reversed product of the adjoints, and the symmetric algorithms probe it
  (``⟨u, Av⟩ = ⟨Au, v⟩``) before trusting it;
- a composite of model operators exposes ``names``, ``sizes`` and ``groups()`` (so
  :func:`~hessfast.layerwise` and dict vectors work) and is probed for symmetry by default, as a
  model operator is.

>>> import torch, hessfast
>>> A = hessfast.DenseOperator(torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)))
>>> B = hessfast.DenseOperator(torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64)))
>>> ((A - B) @ torch.ones(2, dtype=torch.float64)).tolist()
[2.0, -1.0]
>>> (2 * A + A.shift(0.5)) @ torch.ones(2, dtype=torch.float64)
tensor([9.5000, 3.5000], dtype=torch.float64)
>>> ((A @ B).T @ torch.tensor([1.0, 0.0], dtype=torch.float64)).tolist()
[3.0, 0.0]
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .operators import CurvatureOperator, is_model_operator

Tensor = torch.Tensor

__all__ = ["IdentityOperator", "ScaledOperator", "SumOperator", "ProductOperator"]

#: the settings of a model operator that the one-pass residual must share with its H and G
#: (``num_data`` where this hessfast's operators have it)
RESIDUAL_SETTINGS = (
    "backend",
    "compile",
    "output",
    "reduction",
    "max_batch_size",
    "process_group",
    "num_data",
)


class IdentityOperator(CurvatureOperator):
    """The ``(n, n)`` identity, for shifts: ``H + 0.1 * IdentityOperator(P, dtype=H.dtype,
    device=H.device)`` (or ``H.shift(0.1)``). Its product is a copy of ``V``.

    >>> import torch
    >>> I = IdentityOperator(3, dtype=torch.float64)
    >>> I.shape, (2.5 * I) @ torch.ones(3, dtype=torch.float64)
    ((3, 3), tensor([2.5000, 2.5000, 2.5000], dtype=torch.float64))
    """

    kind = "I"

    def __init__(self, n: int, dtype: torch.dtype | None = None, device: Any = None):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise ValueError(f"IdentityOperator(n): n must be a positive integer, got {n!r}")
        self.shape = (int(n), int(n))
        self.dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.device = torch.device(device) if device is not None else torch.device("cpu")

    def matmat(self, V: Tensor) -> Tensor:
        _check_block(self, V)
        return V.clone()  # never the caller's own tensor: algorithms update results in place

    def __repr__(self) -> str:
        return f"IdentityOperator({self.shape[0]}, dtype={self.dtype}, device={self.device})"


class _Composite(CurvatureOperator):
    """What sums, scalings and products share: the attributes derived from their parts."""

    parts: tuple[CurvatureOperator, ...]

    def _derive(self, parts: Sequence[CurvatureOperator]) -> None:
        self.parts = tuple(parts)
        first = self.parts[0]
        self.shape = tuple(first.shape)
        self.dtype = first.dtype
        self.device = torch.device(first.device)
        leaves = [leaf for p in self.parts for leaf in _leaves(p)]
        #: the model operators (Hessian, GGN, residual) this operator is built from
        self.model_operators = [x for x in leaves if is_model_operator(x)]
        named = [x for x in leaves if getattr(x, "names", None) is not None]
        #: parameter names and sizes when the parts that have them share them, else None
        self.names = list(named[0].names) if named else None
        sizes = getattr(named[0], "sizes", None) if named else None
        self.sizes = list(sizes) if sizes is not None else None
        groups = [x for x in named if callable(getattr(x, "groups", None))]
        if groups:
            self.groups = groups[0].groups

    @property
    def deterministic(self) -> str | None:
        """The model parts' determinism checks together: ``"skipped"`` if any part skipped it,
        ``"passed"`` once every part passed (or needed none), else ``None``."""
        states = [getattr(m, "deterministic", None) for m in self.model_operators]
        if "skipped" in states:
            return "skipped"
        if states and all(s in ("passed", "not needed") for s in states):
            return "passed"
        return None

    @property
    def kind(self) -> str:
        return _label(self)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(P={self.shape[0]:,}, {_label(self)}, dtype={self.dtype}, "
            f"device={self.device})"
        )


class ScaledOperator(_Composite):
    """``alpha * op`` (``alpha`` a finite real number)."""

    def __init__(self, op: CurvatureOperator, alpha: float):
        self.op = op
        self.alpha = float(alpha)
        self._derive([op])
        self.symmetric = bool(getattr(op, "symmetric", True))

    def matmat(self, V: Tensor) -> Tensor:
        return self.op.matmat(V) * self.alpha

    def adjoint(self) -> CurvatureOperator:
        return self if self.symmetric else ScaledOperator(self.op.adjoint(), self.alpha)


class SumOperator(_Composite):
    """``Σ_i c_i A_i``: ``terms`` is a list of ``(c_i, A_i)``; each product multiplies every
    ``A_i`` by the whole block once."""

    def __init__(self, terms: Sequence[tuple[float, CurvatureOperator]]):
        if len(terms) < 2:
            raise ValueError("SumOperator needs at least two terms")
        self.terms = [(float(c), op) for c, op in terms]
        self._derive([op for _, op in self.terms])
        self.symmetric = all(getattr(op, "symmetric", True) for _, op in self.terms)

    def matmat(self, V: Tensor) -> Tensor:
        out = None
        for c, op in self.terms:
            y = op.matmat(V)
            y = y if c == 1.0 else y * c
            out = y if out is None else out + y  # not in place: a term may return V itself
        return out

    def adjoint(self) -> CurvatureOperator:
        if self.symmetric:
            return self
        return SumOperator([(c, op.adjoint()) for c, op in self.terms])


class ProductOperator(_Composite):
    """``A_1 @ A_2 @ ... @ A_n``: a product multiplies by ``A_n`` first."""

    def __init__(self, factors: Sequence[CurvatureOperator]):
        if len(factors) < 2:
            raise ValueError("ProductOperator needs at least two factors")
        self.factors = list(factors)
        self._derive(self.factors)
        n = len(self.factors)
        self.symmetric = all(getattr(f, "symmetric", True) for f in self.factors) and all(
            self.factors[i] is self.factors[n - 1 - i] for i in range(n // 2)
        )

    def matmat(self, V: Tensor) -> Tensor:
        for f in reversed(self.factors):
            V = f.matmat(V)
        return V

    def adjoint(self) -> CurvatureOperator:
        if self.symmetric:
            return self
        return ProductOperator([f.adjoint() for f in reversed(self.factors)])


# ----------------------------------------------------------------------------------------------
# the rules behind the operators' dunder methods


def scalar(alpha: Any, what: str) -> float:
    """``alpha`` as a finite float: a real number or a one-element real tensor, else
    ``TypeError``/``ValueError`` naming ``what`` was attempted."""
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1 or alpha.is_complex():
            raise TypeError(
                f"{what}: an operator is scaled by a real number, got a tensor of shape "
                f"{list(alpha.shape)}; for the product with vectors use op @ V"
            )
        alpha = alpha.item()
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(
            f"{what}: an operator is scaled by a real number, not {type(alpha).__name__}"
        )
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"{what}: the scale factor must be finite, got {alpha}")
    return alpha


def scale(op: CurvatureOperator, alpha: float) -> CurvatureOperator:
    """``alpha * op``: a scaling of a sum scales its terms, of a scaling multiplies the factors;
    ``1 * op`` is ``op``."""
    if isinstance(op, SumOperator):
        return _combine([(alpha * c, t) for c, t in op.terms])
    if isinstance(op, ScaledOperator):
        alpha, op = alpha * op.alpha, op.op
    return op if alpha == 1.0 else ScaledOperator(op, alpha)


def add(a: CurvatureOperator, b: CurvatureOperator) -> CurvatureOperator:
    """``a + b`` as one collected sum (module docstring)."""
    check_compatible([a, b], "add")
    return _combine(_terms(a) + _terms(b))


def compose(a: CurvatureOperator, b: CurvatureOperator) -> CurvatureOperator:
    """``a @ b``: scalars move out, identities drop out, nested products flatten."""
    check_compatible([a, b], "multiply")
    coef, factors = 1.0, []
    for f in (a, b):
        if isinstance(f, ScaledOperator):
            coef, f = coef * f.alpha, f.op
        factors += f.factors if isinstance(f, ProductOperator) else [f]
    kept = [f for f in factors if not isinstance(f, IdentityOperator)]
    if not kept:
        kept = factors[:1]
    op = kept[0] if len(kept) == 1 else ProductOperator(kept)
    return scale(op, coef)


def identity_like(op: CurvatureOperator) -> IdentityOperator:
    """The identity with ``op``'s size, dtype and device."""
    return IdentityOperator(op.shape[0], dtype=op.dtype, device=op.device)


def check_compatible(ops: Sequence[Any], verb: str) -> None:
    """``ValueError`` unless the operators can be combined: the same shape, dtype and device, and
    model operators over the same model and the same parameters."""
    for x in ops:
        if not isinstance(x, CurvatureOperator):
            raise TypeError(f"cannot {verb} a {type(x).__name__} and a curvature operator")
    a = ops[0]
    for b in ops[1:]:
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(
                f"cannot {verb} operators of shapes {tuple(a.shape)} and {tuple(b.shape)}: "
                "both must be (P, P) with the same P"
            )
        if a.dtype != b.dtype:
            raise ValueError(
                f"cannot {verb} operators of dtypes {a.dtype} and {b.dtype}: build them in one "
                "dtype (an IdentityOperator takes dtype= and device=; H.shift(λ) picks H's)"
            )
        if not _same_device(a.device, b.device):
            raise ValueError(
                f"cannot {verb} operators on {a.device} and {b.device}: put them on one device"
            )
    leaves = [leaf for x in ops for leaf in _leaves(x)]
    models = [x for x in leaves if isinstance(getattr(x, "model", None), nn.Module)]
    for m in models[1:]:
        if m.model is not models[0].model:
            raise ValueError(
                f"cannot {verb} curvature operators of two different models "
                f"({type(models[0].model).__name__} object at {id(models[0].model):#x} and "
                f"{type(m.model).__name__} object at {id(m.model):#x}): operator arithmetic "
                "combines curvatures over one model's parameters; build both operators on the "
                "same model object"
            )
    named = [x for x in leaves if getattr(x, "names", None) is not None]
    for m in named[1:]:
        if list(m.names) != list(named[0].names):
            only_a = sorted(set(named[0].names) - set(m.names))[:3]
            only_b = sorted(set(m.names) - set(named[0].names))[:3]
            raise ValueError(
                f"cannot {verb} operators over different parameters (only in the first: "
                f"{only_a or 'none'}; only in the second: {only_b or 'none'}; or another order): "
                "build both with the same params="
            )


# ----------------------------------------------------------------------------------------------
# helpers


def _check_block(op: CurvatureOperator, V: Tensor) -> None:
    if V.dim() != 2 or V.shape[0] != op.shape[0]:
        raise ValueError(f"V must be [P, K] with P={op.shape[0]}, got {list(V.shape)}")


def _same_device(a: Any, b: Any) -> bool:
    a, b = torch.device(a), torch.device(b)
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _leaves(op: Any) -> list:
    if isinstance(op, _Composite):
        return [leaf for p in op.parts for leaf in _leaves(p)]
    return [op]


def _terms(op: CurvatureOperator) -> list[tuple[float, CurvatureOperator]]:
    if isinstance(op, SumOperator):
        return list(op.terms)
    if isinstance(op, ScaledOperator):
        return [(op.alpha, op.op)]
    return [(1.0, op)]


def _combine(terms: list[tuple[float, CurvatureOperator]]) -> CurvatureOperator:
    """The collected sum: equal operators (and identities) merged, H and G with opposite
    coefficients turned into the one-pass residual, zero terms dropped."""
    merged: list[list] = []
    for c, op in terms:
        for m in merged:
            if m[1] is op or (
                isinstance(m[1], IdentityOperator) and isinstance(op, IdentityOperator)
            ):
                m[0] += c
                break
        else:
            merged.append([c, op])
    merged = _pair_residuals(merged)
    kept = [(c, op) for c, op in merged if c != 0.0]
    if not kept:  # everything cancelled: zero times the first operator
        return ScaledOperator(merged[0][1], 0.0)
    if len(kept) == 1:
        c, op = kept[0]
        return op if c == 1.0 else ScaledOperator(op, c)
    return SumOperator(kept)


def _pair_residuals(merged: list[list]) -> list[list]:
    """Replace ``a·H`` and ``−a·G`` of one model, loss, data and settings by ``a·R``."""
    residual_cls = _residual_class()
    if residual_cls is None:
        return merged
    out = list(merged)
    i = 0
    while i < len(out):
        c, h = out[i]
        if _mode(h) == "hvp" and c != 0.0:
            for j, (d, g) in enumerate(out):
                if _mode(g) == "ggn" and d == -c and residual_pair(h, g):
                    out[i] = [c, _residual(residual_cls, h, g)]
                    del out[j]
                    i -= j < i
                    break
        i += 1
    return out


def _mode(op: Any) -> str | None:
    """The engine mode of a model operator (``"hvp"``, ``"ggn"``); ``None`` for other operators."""
    return (
        getattr(op, "mode", None)
        if is_model_operator(op) and not isinstance(op, _Composite)
        else None
    )


def _residual_class():
    """:class:`hessfast.operators.ResidualOperator`, or ``None`` in a hessfast without it."""
    try:
        from .operators import ResidualOperator
    except ImportError:
        return None
    return ResidualOperator


def residual_pair(h: Any, g: Any) -> bool:
    """Whether ``h`` (a Hessian) and ``g`` (a GGN operator) share model, loss, data, parameters
    and settings, so that ``h − g`` is one residual operator."""
    from .operators import GGNOperator, HessianOperator

    if type(h) is not HessianOperator or type(g) is not GGNOperator:
        return False
    return (
        h.model is g.model
        and h.loss_fn is g.loss_fn
        and _same_data(h.data, g.data)
        and list(h.names) == list(g.names)
        and all(getattr(h, s, None) == getattr(g, s, None) for s in RESIDUAL_SETTINGS)
    )


def _same_data(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same_data, a, b))
    return False


def _residual(cls: type, h: Any, g: Any) -> CurvatureOperator:
    r = cls(
        h.model,
        h.loss_fn,
        h.data,
        list(h.names),
        h.max_batch_size,
        h.progress,
        process_group=h.process_group if h.process_group is not None else False,
        backend=h.backend,
        reduction=h.reduction,
        compile=h.compile,
        output=h.output,
        check_deterministic=h.check_deterministic or g.check_deterministic,
        **operator_options(h),
    )
    if h.deterministic == g.deterministic and h.deterministic in ("passed", "not needed"):
        r.deterministic = h.deterministic  # the same model and data: checked already
    return r


def operator_options(op: Any) -> dict[str, Any]:
    """The keyword options a model operator passes on to operators derived from it (its
    ``block``), where this hessfast's operators have them (``num_data``)."""
    options = getattr(op, "_options", None)
    return options() if callable(options) else {}


def _label(op: Any) -> str:
    """A short formula of the operator: ``Hessian - GGN``, ``2·Hessian + 0.1·I``."""
    if isinstance(op, SumOperator):
        out = ""
        for c, t in op.terms:
            mag = abs(c)
            body = _label(t)
            if isinstance(t, SumOperator) or mag != 1.0 and isinstance(t, ProductOperator):
                body = f"({body})"
            piece = body if mag == 1.0 else f"{mag:g}·{body}"
            if not out:
                out = piece if c >= 0 else f"-{piece}"
            else:
                out += f" + {piece}" if c >= 0 else f" - {piece}"
        return out
    if isinstance(op, ScaledOperator):
        body = _label(op.op)
        if isinstance(op.op, (SumOperator, ProductOperator)):
            body = f"({body})"
        return f"{op.alpha:g}·{body}"
    if isinstance(op, ProductOperator):
        return " @ ".join(
            f"({_label(f)})" if isinstance(f, (SumOperator, ScaledOperator)) else _label(f)
            for f in op.factors
        )
    return str(getattr(op, "kind", type(op).__name__))
