"""Stochastic trace estimation: Hutchinson and Hutch++ with K-batched products.

Hutchinson: ``tr(H) ≈ (1/n) Σ_i z_iᵀ H z_i`` with Rademacher ``z_i``; its variance is
``2 (‖H‖_F² − Σ_i H_ii²) / n``. Hutch++ (Meyer, Musco, Musco and Woodruff, "Hutch++: Optimal
Stochastic Trace Estimation", SOSA 2021) spends a third of the products on a sketch ``Q`` of the
top of the spectrum, computes ``tr(QᵀHQ)`` exactly and runs Hutchinson only on the deflated rest
``(I − QQᵀ) H (I − QQᵀ)``; for operators with a few large eigenvalues (Hessians) its error is much
smaller for the same number of products, and it is exact when ``rank(H) ≤ num_matvecs // 3``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .krylov import Operator, Products, as_operator, check_positive_int, rademacher, work_dtype

Tensor = torch.Tensor

__all__ = ["trace", "TraceEstimate", "TraceProbes", "trace_probes", "trace_with_probes"]

METHODS = ("hutchinson", "hutch++")


@dataclass
class TraceEstimate:
    """The result of :func:`trace`.

    ``estimate``: the trace estimate; ``stderr``: its standard error (the sample standard deviation
    of the Hutchinson terms divided by ``√n``; for Hutch++ that of its residual Hutchinson part,
    the sketched part being exact; 0 for an exact trace; ``inf`` when a single sample gives no
    spread); ``num_matvecs``: operator-vector products used; ``method``: ``"hutchinson"``,
    ``"hutch++"`` or ``"exact"``.

    >>> import torch
    >>> from hessfast.algorithms.trace import trace
    >>> est = trace(torch.eye(4, dtype=torch.float64), num_matvecs=4)
    >>> float(est), est.to_dict()
    (4.0, {'estimate': 4.0, 'stderr': 0.0, 'num_matvecs': 4, 'method': 'exact'})
    """

    estimate: float
    stderr: float
    num_matvecs: int
    method: str

    def __float__(self) -> float:
        return self.estimate

    def to_dict(self) -> dict[str, Any]:
        return {
            "estimate": self.estimate,
            "stderr": self.stderr,
            "num_matvecs": self.num_matvecs,
            "method": self.method,
        }


def standard_error(samples: Tensor) -> float:
    """The standard error of the mean of ``samples`` (``inf`` for fewer than two).

    >>> standard_error(torch.tensor([1.0, 3.0], dtype=torch.float64))
    1.0
    """
    n = samples.numel()
    if n < 2:
        return math.inf
    return float(samples.std(unbiased=True)) / math.sqrt(n)


def _quad_forms(products: Products, Z: Tensor, batch: int) -> Tensor:
    """``z_iᵀ H z_i`` (float64) for the columns of ``Z`` (work dtype), ``batch`` columns at a time."""
    out = []
    for a in range(0, Z.shape[1], batch):
        Zc = Z[:, a : a + batch]
        HZ = products.matmat(Zc.to(products.op.device, products.op.dtype))
        out.append((Zc.double() * HZ.to(Zc.device).double()).sum(0))
    return torch.cat(out)


@dataclass
class TraceProbes:
    """The probes of one trace estimate, to be shared by several operators
    (:func:`trace_probes`, :func:`trace_with_probes`).

    ``basis``: ``[P, s]`` orthonormal columns whose part of the trace is computed exactly
    (Hutch++'s sketch ``Q``; ``s = 0`` for Hutchinson); ``probes``: ``[P, m]`` Rademacher probes
    with ``QQᵀ`` projected out; both in the work dtype on the operator's device, ``None`` for
    ``method="exact"`` (the ``P`` unit vectors, made chunk by chunk). ``sketch_matvecs``: the
    products that built ``basis``.
    """

    basis: Tensor | None
    probes: Tensor | None
    method: str
    size: int
    sketch_matvecs: int = 0

    @property
    def num_matvecs(self) -> int:
        """Products one operator spends on these probes."""
        if self.method == "exact":
            return self.size
        return int(self.basis.shape[1] + self.probes.shape[1])


def _check(H: Operator | Tensor, num_matvecs: int, method: str, batch_size: int | None):
    op = as_operator(H)
    n = check_positive_int("num_matvecs", num_matvecs)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
    return op, n


def _make_probes(
    products: Products, n: int, method: str, seed: int, batch_size: int | None
) -> TraceProbes:
    op = products.op
    P = op.shape[0]
    if n >= P:
        return TraceProbes(None, None, "exact", P)
    work = work_dtype(op.dtype, None)
    dev = op.device
    g = torch.Generator().manual_seed(int(seed))

    def probes(k: int) -> Tensor:
        if k == 0:
            return torch.zeros(P, 0, dtype=work, device=dev)
        return torch.stack([rademacher(P, g) for _ in range(k)], 1).to(dev, work)

    batch = n if batch_size is None else batch_size
    s = n // 3 if method == "hutch++" else 0
    if s == 0:
        return TraceProbes(probes(0), probes(n), method, P)
    S = probes(s)
    HS = torch.cat(
        [products.matmat(S[:, a : a + batch].to(dev, op.dtype)) for a in range(0, s, batch)], 1
    )
    Q, _ = torch.linalg.qr(HS.to(work))
    G = probes(n - 2 * s)
    G = G - Q @ (Q.T @ G)
    return TraceProbes(Q, G, method, P, sketch_matvecs=s)


def _estimate(products: Products, tp: TraceProbes, batch_size: int | None) -> TraceEstimate:
    op = products.op
    P = op.shape[0]
    if tp.size != P:
        raise ValueError(f"the probes are for an operator of size {tp.size}, not {P}")
    dev = op.device
    if tp.method == "exact":
        batch = P if batch_size is None else batch_size
        total = 0.0
        for a in range(0, P, batch):
            b = min(P, a + batch)
            X = torch.zeros(P, b - a, dtype=op.dtype, device=dev)
            idx = torch.arange(a, b, device=dev)
            X[idx, idx - a] = 1
            HX = products.matmat(X)
            total += float(HX[idx, idx - a].double().sum())
        return TraceEstimate(total, 0.0, P, "exact")
    s = tp.basis.shape[1]
    Z = torch.cat([tp.basis, tp.probes], 1).to(dev)
    batch = Z.shape[1] if batch_size is None else batch_size
    forms = _quad_forms(products, Z, batch)
    samples = forms[s:]
    return TraceEstimate(
        float(forms[:s].sum()) + float(samples.mean()),
        standard_error(samples),
        Z.shape[1],
        tp.method,
    )


def trace_probes(
    H: Operator | Tensor,
    num_matvecs: int = 100,
    method: str = "hutch++",
    seed: int = 0,
    batch_size: int | None = None,
) -> TraceProbes:
    """The probes :func:`trace` would use, for :func:`trace_with_probes` on several operators.

    Hutch++ builds its sketch basis from products of ``H`` (``num_matvecs // 3`` of them, in
    ``sketch_matvecs``); the Rademacher probes are drawn from ``seed`` exactly as :func:`trace`
    draws them, so ``trace_with_probes(H, trace_probes(H, n, m, seed))`` is ``trace(H, n, m,
    seed)`` (``num_matvecs`` there counts only the probes' products).

    >>> import torch
    >>> from hessfast.algorithms.trace import trace_probes
    >>> tp = trace_probes(torch.eye(50, dtype=torch.float64), num_matvecs=30)
    >>> tuple(tp.basis.shape), tuple(tp.probes.shape), tp.sketch_matvecs, tp.num_matvecs
    ((50, 10), (50, 10), 10, 20)
    """
    op, n = _check(H, num_matvecs, method, batch_size)
    return _make_probes(Products(op, batch_size), n, method, seed, batch_size)


def trace_with_probes(
    H: Operator | Tensor, probes: TraceProbes, batch_size: int | None = None
) -> TraceEstimate:
    """``tr(H)`` estimated on given probes (:func:`trace_probes`): the exact trace of ``H`` over
    ``probes.basis`` plus the Hutchinson mean over ``probes.probes``.

    The estimate is linear in ``H`` for fixed probes, so operators estimated on the same probes
    add up: the estimates of ``A``, ``B`` and ``A + B`` satisfy ``tr A + tr B = tr(A + B)`` up to
    the rounding of the products (how :func:`hessfast.decompose` gets ``tr H = tr G + tr R``).
    ``num_matvecs`` of the result counts this operator's products only.

    >>> import torch
    >>> from hessfast.algorithms.trace import trace_probes, trace_with_probes
    >>> A = torch.diag(torch.linspace(1.0, 2.0, 40, dtype=torch.float64))
    >>> B = torch.diag(torch.linspace(-1.0, 3.0, 40, dtype=torch.float64))
    >>> tp = trace_probes(A, num_matvecs=12, seed=0)
    >>> a, b, ab = (trace_with_probes(M, tp).estimate for M in (A, B, A + B))
    >>> abs(a + b - ab) < 1e-12
    True
    """
    op = as_operator(H)
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
    if not isinstance(probes, TraceProbes):
        raise TypeError(f"probes must come from trace_probes(), got {type(probes).__name__}")
    return _estimate(Products(op, batch_size), probes, batch_size)


def trace(
    H: Operator | Tensor,
    num_matvecs: int = 100,
    method: str = "hutch++",
    seed: int = 0,
    batch_size: int | None = None,
) -> TraceEstimate:
    """Estimate ``tr(H)`` from ``num_matvecs`` products with Rademacher probe vectors.

    - ``method="hutchinson"``: the mean of ``z_iᵀ H z_i`` over ``num_matvecs`` probes.
    - ``method="hutch++"`` (default): a sketch ``S`` of ``s = num_matvecs // 3`` probes,
      ``Q = qr(H S)``, the exact ``tr(QᵀHQ)`` (``s`` products) plus Hutchinson on
      ``(I − QQᵀ) H (I − QQᵀ)`` with the remaining ``num_matvecs − 2s`` probes. With fewer than 3
      products it is Hutchinson.
    - ``num_matvecs ≥ P``: the exact trace ``Σ_i e_iᵀ H e_i`` from the ``P`` unit vectors
      (``method="exact"``, ``stderr=0``, ``num_matvecs=P``).

    Products: probes go into ``matmat`` calls of ``batch_size`` columns (default: all at once —
    one call for Hutchinson, two for Hutch++ — halved automatically if CUDA runs out of memory).
    Probes are drawn from ``seed`` on the CPU, column by column, so the estimate depends neither on
    the device nor on ``batch_size``.

    Raises ``ValueError`` for ``num_matvecs < 1``, an unknown method or a non-square operator, and
    ``NonFiniteError`` (a ``FloatingPointError``) when a product has NaN or Inf.

    >>> import torch, hessfast
    >>> from hessfast.algorithms.trace import trace
    >>> H = hessfast.DenseOperator(torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64)))
    >>> est = trace(H, num_matvecs=30, method="hutch++", seed=0)
    >>> abs(est.estimate - 5050.0) < 4 * est.stderr, est.num_matvecs
    (True, 30)
    >>> trace(H, num_matvecs=100).estimate, trace(H, num_matvecs=100).method
    (5050.0, 'exact')
    """
    op, n = _check(H, num_matvecs, method, batch_size)
    products = Products(op, batch_size)
    tp = _make_probes(products, n, method, seed, batch_size)
    est = _estimate(products, tp, batch_size)
    if tp.method != "exact":
        est.num_matvecs = n
    return est
