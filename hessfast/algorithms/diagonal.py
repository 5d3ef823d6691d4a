"""The diagonal and the Frobenius norm of a curvature operator from products.

Diagonal (:func:`diagonal`):

- ``"hutchinson"``: ``diag(H) ≈ (1/n) Σ_i z_i ⊙ H z_i`` with Rademacher ``z_i``; unbiased, with
  variance ``Σ_{j≠i} H_ij² / n`` for entry ``i`` (a per-entry standard error is returned).
- ``"xdiag"`` (Epperly, Tropp and Webber, "XTrace: making the most of every sample in stochastic
  trace estimation", SIMAX 2024, whose diagonal counterpart this is): half of the ``m`` products
  sketch the range of ``H`` (``Y = H Ω``, ``Q = qr(Y)``), the other half form ``Z = H Q``. For
  each probe ``ω_i`` the low-rank part ``Q₋ᵢ Q₋ᵢᵀ H`` of the basis *without* that probe's column
  is exact and ``ω_i`` estimates the rest by Hutchinson; the ``s = m/2`` leave-one-out estimates
  are averaged without any further product (``Q₋ᵢ Q₋ᵢᵀ = Q Qᵀ − q_i q_iᵀ`` with ``q_i = Q s_i``,
  ``s_i`` the normalised ``i``-th column of ``R⁻ᵀ``). Unbiased; exact when ``rank(H) < s``; for
  the fast-decaying spectra of Hessians far more accurate than Hutchinson for the same products.
  It uses the symmetry of ``H`` (``Hᵀ Q = H Q``).
- ``"exact"``: ``H e_j`` for every unit vector, ``block_size`` at a time (``P`` products).

Frobenius norm (:func:`frobenius_norm`): ``‖H‖_F² = E ‖H z‖²`` for Rademacher ``z``
(``E z zᵀ = I``), so ``(1/n) Σ_i ‖H z_i‖²`` is unbiased for ``‖H‖_F²``; exact from the ``P`` unit
vectors when ``num_matvecs ≥ P``.

Every estimator draws its probes on the CPU from ``seed`` (the same numbers on any device and for
any ``block_size``) and multiplies them through :class:`~hessfast.algorithms.krylov.Products`
(``block_size`` columns per ``matmat`` call; default all at once, halved automatically on CUDA
out-of-memory). Memory: the probe block and its product (``2 · P · K`` numbers, ``K`` the columns
of one call) and, for XDiag, ``Ω``, ``Y``/``Q`` and ``Z`` (``3 · P · m/2`` numbers); a
``MemoryError`` says how much is needed before anything is allocated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .krylov import (
    Operator,
    Products,
    as_operator,
    check_memory,
    check_positive_int,
    nbytes_of,
    rademacher,
    work_dtype,
)

Tensor = torch.Tensor

__all__ = ["diagonal", "frobenius_norm", "DiagonalEstimate", "FrobeniusEstimate", "METHODS"]

METHODS = ("xdiag", "hutchinson", "exact")


@dataclass
class DiagonalEstimate:
    """The result of :func:`diagonal`.

    ``diagonal``: the estimate ``[P]`` (the operator's dtype and device); ``stderr``: its
    per-entry standard error (Hutchinson: the sample standard deviation of the ``n`` terms over
    ``√n``, ``inf`` for ``n = 1``; zeros for ``"exact"``; ``None`` for XDiag, whose terms are not
    independent); ``num_matvecs``: products used; ``method``: ``"xdiag"``, ``"hutchinson"`` or
    ``"exact"``.

    >>> import torch
    >>> from hessfast.algorithms.diagonal import diagonal
    >>> est = diagonal(torch.diag(torch.tensor([1.0, 2.0])), method="exact")
    >>> est.diagonal.tolist(), est.num_matvecs, est.method
    ([1.0, 2.0], 2, 'exact')
    """

    diagonal: Tensor
    stderr: Tensor | None
    num_matvecs: int
    method: str


@dataclass
class FrobeniusEstimate:
    """The result of :func:`frobenius_norm`: ``estimate`` (``‖H‖_F``, the square root of
    ``squared``), ``squared`` (the estimate of ``‖H‖_F²``, unbiased), ``stderr`` (the standard
    error of ``squared``; 0 when exact), ``num_matvecs`` and ``method`` (``"hutchinson"`` or
    ``"exact"``).

    >>> import torch
    >>> from hessfast.algorithms.diagonal import frobenius_norm
    >>> r = frobenius_norm(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
    >>> r.estimate, r.squared, r.method
    (5.0, 25.0, 'exact')
    """

    estimate: float
    squared: float
    stderr: float
    num_matvecs: int
    method: str

    def __float__(self) -> float:
        return self.estimate


def _probes(P: int, k: int, gen: torch.Generator) -> Tensor:
    """``[P, k]`` float64 Rademacher probes, drawn column by column on the CPU."""
    if k == 0:
        return torch.zeros(P, 0, dtype=torch.float64)
    return torch.stack([rademacher(P, gen) for _ in range(k)], 1)


def _check_block_memory(P: int, K: int, dtype: torch.dtype, device: Any, what: str) -> None:
    check_memory(
        2 * nbytes_of((P, K), dtype),
        device,
        f"{what} (a [{P}, {K}] probe block and its product)",
        "pass a smaller block_size",
    )


def _setup(H: Operator | Tensor, block_size: int | None) -> tuple[Operator, Products, int]:
    op = as_operator(H)
    if block_size is not None:
        check_positive_int("block_size", block_size)
    return op, Products(op, block_size), op.shape[0]


def _unit_columns(products: Products, P: int, block: int, what: str):
    """``(a, b, H[:, a:b])`` for consecutive ranges of ``block`` unit columns."""
    op = products.op
    _check_block_memory(P, min(block, P), op.dtype, op.device, what)
    for a in range(0, P, block):
        b = min(P, a + block)
        X = torch.zeros(P, b - a, dtype=op.dtype, device=op.device)
        idx = torch.arange(a, b, device=op.device)
        X[idx, idx - a] = 1
        yield a, b, products.matmat(X)


def diagonal(
    H: Operator | Tensor,
    num_matvecs: int = 100,
    method: str = "xdiag",
    seed: int = 0,
    block_size: int | None = None,
) -> DiagonalEstimate:
    """Estimate ``diag(H)`` from ``num_matvecs`` products (see the module docstring).

    ``method``: ``"xdiag"`` (default; ``num_matvecs`` is rounded down to an even number, at least
    2), ``"hutchinson"`` or ``"exact"`` (``P`` products, ``num_matvecs`` is ignored). With
    ``num_matvecs ≥ P`` every method returns the exact diagonal, which then costs no more.
    ``block_size``: columns per ``matmat`` call (default: all the probes at once; for
    ``"exact"``, all ``P`` unit columns at once — pass a ``block_size`` for a large operator).

    Raises ``ValueError`` for an unknown method, ``num_matvecs`` or ``block_size`` < 1 or a
    non-square operator; ``MemoryError`` (before allocating) when the probe blocks or the XDiag
    basis do not fit in the free memory of the device, saying how many bytes they need;
    ``NonFiniteError`` when a product has NaN or Inf.

    >>> import torch, hessfast
    >>> A = torch.randn(40, 3, dtype=torch.float64)
    >>> H = hessfast.DenseOperator(A @ A.T + torch.diag(torch.arange(40.0, dtype=torch.float64)))
    >>> est = hessfast.diagonal(H, num_matvecs=10, method="xdiag", seed=0)
    >>> est.diagonal.shape, est.num_matvecs
    (torch.Size([40]), 10)
    >>> exact = hessfast.diagonal(H, method="exact").diagonal
    >>> bool(torch.allclose(exact, H.matrix.diagonal()))
    True
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n = check_positive_int("num_matvecs", num_matvecs)
    op, products, P = _setup(H, block_size)
    if method == "exact" or n >= P:
        d = torch.empty(P, dtype=op.dtype, device=op.device)
        for a, b, HX in _unit_columns(products, P, block_size or P, "the exact diagonal"):
            idx = torch.arange(a, b, device=op.device)
            d[a:b] = HX[idx, idx - a]
        return DiagonalEstimate(d, torch.zeros_like(d), P, "exact")
    gen = torch.Generator().manual_seed(int(seed))
    work = work_dtype(op.dtype, None)
    if method == "hutchinson":
        return _hutchinson(products, P, n, gen, work, block_size)
    return _xdiag(products, P, max(2, n - n % 2), gen, work)


def _hutchinson(
    products: Products, P: int, n: int, gen: torch.Generator, work: torch.dtype, block: int | None
) -> DiagonalEstimate:
    op = products.op
    block = n if block is None else block
    _check_block_memory(P, min(block, n), work, op.device, "the Hutchinson diagonal")
    total = torch.zeros(P, dtype=torch.float64, device=op.device)
    total_sq = torch.zeros(P, dtype=torch.float64, device=op.device)
    for a in range(0, n, block):
        Z = _probes(P, min(block, n - a), gen).to(op.device)
        terms = Z * products.matmat(Z.to(op.dtype)).double()
        total += terms.sum(1)
        total_sq += (terms * terms).sum(1)
    mean = total / n
    if n > 1:
        var = (total_sq - n * mean * mean).clamp_min(0) / (n - 1)
        stderr = (var / n).sqrt()
    else:
        stderr = torch.full_like(mean, math.inf)
    return DiagonalEstimate(mean.to(op.dtype), stderr.to(op.dtype), n, "hutchinson")


def _xdiag(
    products: Products, P: int, m: int, gen: torch.Generator, work: torch.dtype
) -> DiagonalEstimate:
    """XDiag with ``m`` products (``m`` even): see the module docstring for the estimator."""
    op = products.op
    s = m // 2
    check_memory(
        3 * nbytes_of((P, s), work),
        op.device,
        f"XDiag with num_matvecs={m} (three [{P}, {s}] blocks: the probes, the sketch and its "
        "product)",
        "pass a smaller num_matvecs (or block_size to bound the product's columns)",
    )
    Om = _probes(P, s, gen).to(op.device, work)
    Y = products.matmat(Om.to(op.dtype)).to(work)
    Q, R = torch.linalg.qr(Y)
    R64 = R.double().cpu()
    rdiag = R64.diagonal().abs()
    eps = torch.finfo(work).eps
    if float(rdiag.min()) <= s * eps * float(rdiag.max()):
        # Y has numerically lower rank than s: then rank(H) = rank(Y) < s, range(Y) = range(H)
        # and H = Q Qᵀ H for the orthonormal basis of the range: the diagonal is exact
        U, sv, _ = torch.linalg.svd(Y.double(), full_matrices=False)
        r = int((sv > s * torch.finfo(work).eps * sv[0]).sum())
        Qr = U[:, :r].to(work)
        Zr = products.matmat(Qr.to(op.dtype)).to(work)
        d = (Qr.double() * Zr.double()).sum(1)
        return DiagonalEstimate(d.to(op.dtype), None, s + r, "xdiag")
    Z = products.matmat(Q.to(op.dtype)).to(work)  # H Q  (= Hᵀ Q: H is symmetric)
    T = (Z.mT @ Om).double()  # [s, s]: column i is Zᵀ ω_i
    Sinv = torch.linalg.solve_triangular(R64, torch.eye(s, dtype=torch.float64), upper=True)
    S = Sinv.T  # R⁻ᵀ
    S = S / torch.linalg.vector_norm(S, dim=0)
    S = S.to(op.device)
    Qd, Zd, Omd, Yd = Q.double(), Z.double(), Om.double(), Y.double()
    QS, ZS = Qd @ S, Zd @ S
    dQZ = (Qd * Zd).sum(1)
    dQSSZ = (QS * ZS).sum(1)
    dOmY = (Omd * Yd).sum(1)
    dOmQT = (Omd * (Qd @ T)).sum(1)
    dOmQSST = (Omd * (QS * (S * T).sum(0))).sum(1)
    d = dQZ + (-dQSSZ + dOmY - dOmQT + dOmQSST) / s
    return DiagonalEstimate(d.to(op.dtype), None, m, "xdiag")


def frobenius_norm(
    H: Operator | Tensor,
    num_matvecs: int = 100,
    seed: int = 0,
    block_size: int | None = None,
) -> FrobeniusEstimate:
    """Estimate ``‖H‖_F`` from ``num_matvecs`` products: ``(1/n) Σ ‖H z_i‖²`` over Rademacher
    probes is unbiased for ``‖H‖_F²`` (its variance is ``2 (‖H²‖_F² − Σ_i (H²)_ii²) / n``); exact
    from the ``P`` unit vectors when ``num_matvecs ≥ P``. ``block_size`` as in :func:`diagonal`.

    Raises ``ValueError`` for ``num_matvecs`` or ``block_size`` < 1 or a non-square operator,
    ``MemoryError`` when a probe block does not fit.

    >>> import torch, hessfast
    >>> A = torch.randn(200, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    >>> H = hessfast.DenseOperator(A + A.T)
    >>> est = hessfast.frobenius_norm(H, num_matvecs=50, seed=0)
    >>> abs(est.estimate / float(torch.linalg.norm(H.matrix)) - 1) < 0.05, est.method
    (True, 'hutchinson')
    """
    n = check_positive_int("num_matvecs", num_matvecs)
    op, products, P = _setup(H, block_size)
    if n >= P:
        sq = 0.0
        for _, _, HX in _unit_columns(products, P, block_size or P, "the exact Frobenius norm"):
            sq += float((HX.double() ** 2).sum())
        return FrobeniusEstimate(math.sqrt(sq), sq, 0.0, P, "exact")
    gen = torch.Generator().manual_seed(int(seed))
    work = work_dtype(op.dtype, None)
    block = n if block_size is None else block_size
    _check_block_memory(P, min(block, n), work, op.device, "the Frobenius-norm estimate")
    samples = []
    for a in range(0, n, block):
        Z = _probes(P, min(block, n - a), gen).to(op.device, op.dtype)
        samples.append((products.matmat(Z).double() ** 2).sum(0).cpu())
    x = torch.cat(samples)
    sq = float(x.mean())
    stderr = float(x.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.inf
    return FrobeniusEstimate(math.sqrt(max(sq, 0.0)), sq, stderr, n, "hutchinson")
