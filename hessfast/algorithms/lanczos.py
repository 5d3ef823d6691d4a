"""Block Lanczos for the ends of the spectrum of a symmetric curvature operator.

:func:`eigsh` is a thick-restart block Lanczos method (the block form of Wu and Simon's
thick-restart Lanczos) on the Krylov layer of :mod:`hessfast.algorithms.krylov`:

- **one product per step**: each step multiplies the operator by one block of ``b`` basis vectors
  (one K-batched pass of the model with ``K = b``) through :class:`~.krylov.Products`, which
  counts, times and checks it; nothing else touches the operator;
- **full reorthogonalisation at the cost of one pass**: the new block is first orthogonalised
  against the last two blocks (the three-term part of the recurrence, which cancels most of its
  norm), then against the whole basis by one classical Gram-Schmidt pass as two BLAS-3 GEMMs
  (:func:`~.krylov.project_out`); a second pass runs only for columns that lost more than
  ``1 − 1/√2`` of their norm in the first (DGKS). The basis is kept as rows ``[n, P]`` in its own
  dtype (no float64 copy), so each GEMM reads it once. The older part is subtracted only when
  the new block's components along it exceed ``eps^(3/4)`` (semi-orthogonality); at block size 1
  Simon's ω-recurrence (:class:`_Omega`, in a bounding form that survives thick restarts)
  estimates those components from ``T`` alone, and the older basis is not even read while the
  estimate stays below a read threshold (``info.skipped_reads``): ``eps^(3/4)``, or, where
  ``tol`` asks for less, ``0.001 · tol`` times the smallest wanted ``|θ| / ‖H‖`` (a loss of
  orthogonality ``δ`` moves the Ritz residuals by about ``δ·‖H‖``; the threshold keeps that
  below 0.1% of what ``tol`` allows), never above ``√eps``; the returned vectors then get one
  Cholesky-QR pass where they are not orthonormal to ``100·eps`` (a pass over ``k`` vectors).
  On the race's float64 MLP (P = 269 k, top 10 at ``tol=1e-6``) this skips 68 reads of 178
  instead of 29 and cuts the time outside the products by 18%. Once it is read (one GEMV) and a
  measured component does exceed the threshold, usually only a few vectors do (1–11, typically
  5, of about 30 on an MLP): only those are subtracted, one AXPY each, instead of a second pass
  over the whole older basis (``info.partial_reorthogonalizations``; a full pass when they are
  a third of the older rows or more). Their coefficients enter ``T``; the components left
  behind, measured and increased by what the subtractions add to them, feed the recurrence
  (:meth:`_Omega.after_partial`). On an MLP with P = 1.2 M (float32, top 10 to 1e-4, one thread)
  this cuts the basis rows read outside the local window from 3896 to 3000 and the time outside
  the products by 7–10%; what remains is mostly the GEMV reads, which the bounding recurrence
  asks for on about 95% of the steps. The recurrence takes the local rows to be orthogonal to
  ``eps`` after their projection; in float32 at P ~ 10⁶ one classical Gram-Schmidt pass leaves
  them at up to ~150·eps (the dot products' rounding, ~√P·eps), so there the older components
  it lets through reach ~2–4·``eps^(3/4)`` (measured against float64 on that MLP), still far
  below the ``√eps`` that semi-orthogonality needs for eigenvalues accurate to ``eps·‖H‖``;
- **the projected problem in float64**: the coefficients of these passes *are* the entries of
  ``T = Vᵀ H V`` (block tridiagonal after a plain start, an arrow head plus a block tridiagonal
  tail after a restart); ``T`` lives on the host in float64 and ``torch.linalg.eigh`` gives the
  Ritz pairs after every step;
- **convergence by residual norm** (or by a bound on the eigenvalue error,
  ``criterion="eigenvalue"``, :func:`eigenvalue_bounds`): a Ritz pair ``(θ, y = V z)`` has
  ``H y − θ y = Q R z_last``
  (``Q R`` the next block and its coupling, ``z_last`` the rows of ``z`` on the last block), so
  ``‖R z_last‖`` is its residual norm at no cost. A wanted pair has converged when
  ``‖R z_last‖ ≤ tol · max(|θ|, eps^(2/3) · ‖H‖)`` (the ``eps^(2/3)·‖H‖`` floor, ``eps`` of the
  basis dtype and ``‖H‖`` the largest ``|θ|`` or product-column norm seen, as in ARPACK, keeps
  eigenvalues at zero from asking for an impossible relative accuracy). ``verify=True`` spends
  ``k`` more products on the true residuals ``‖H y − θ y‖``;
- **thick restart**: the basis holds at most ``ncv`` vectors plus the next block. When it is full,
  it is compressed in place (2 MiB column chunks, no second copy) to the ``p`` most
  wanted Ritz vectors, followed by the next block; the relation ``H V = V T + Q R Eᵀ`` survives
  the restart exactly, so no product is ever repeated and ``max_iter`` bounds the total work;
- **breakdown**: the new block is made orthonormal by a rank-revealing step
  (:func:`~.krylov.orthonormalize`: the eigenvalues of its float64 ``b × b`` Gram matrix, then a
  Cholesky-QR pass). Directions whose norm is below ``200·eps·‖H‖`` lie in the span of the basis
  already (an invariant subspace: an operator of rank below ``k``, a start block in an invariant
  subspace); they are dropped from the Krylov relation and replaced by fresh random vectors
  orthogonal to the basis, which keeps the block size, never divides by a tiny norm, and never
  produces NaN. The Ritz pairs of an invariant subspace are exact yet need not be the extreme
  ones, so after a breakdown convergence is accepted only once a further step leaves the wanted
  Ritz values unchanged. When the basis spans the whole space (``P`` small), Lanczos stops.

Block size (``block_size=None``): a block of ``b`` columns needs more products than single-vector
Lanczos to converge, but one K-batched product of ``b`` columns (its primal forward and backward
shared by the K columns, docs/architecture.md §3) can cost far less than ``b`` single products
(a GPU; a conv net on a CPU: about 1.1 gradients per column at K = 8 against 6 for one column)
or nearly as much (measured in ``benchmarks/results/cpu-eigsh-race-2026-12-02.md``: a K = 8
product at 3–6× a single one on small float64 CNNs and MLPs on a CPU). So on operators with ``P ≥ 4096`` eigsh measures
the cost curve on its first products: it multiplies the start block's first column and the whole
start block ``B = min(k, 8)`` in turn until two consecutive calls of each width agree (two calls
each once hessfast has traced both widths in this process; up to four on a cold start, where a
width's first product is interpreted and its second traced, so a cold start traces the width it
does not choose too), then picks the ``b`` in ``{1, B}``
with the smallest expected time ``inflation(b) · t(b) / b``, where ``inflation(b)`` is the
measured growth of the product count with the block size (:func:`inflation`; on synthetic Hessian
spectra, top 10 at tol 1e-6: b = 2 1.25×, b = 4 1.8×, b = 8 2.6-2.9× the products of b = 1, which
itself needs about ARPACK's count). The chosen product is step one of the run (only the repeats
and the other width's product are spent on measuring: ``info.block_choice["products"]``). The
choice, the curve and the expected times are in ``info.block_choice``. Smaller operators use
``min(k, 8)`` without measuring; an explicit ``block_size`` always wins. Use at least the
multiplicity of the eigenvalues you need: single-vector Lanczos finds one vector per eigenvalue.
The inflation model holds for well separated ends (the top of a Hessian); ends inside a dense
bulk cost blocks far more (bottom 6 of a Gaussian bulk: 9× the products at b = 8).

Default basis size ``ncv``: ``2k + 20`` vectors for ``b = 1`` (while that basis takes at most a
quarter of the free memory of its device; never below ARPACK's ``max(2k + 1, 20)``) and
``2k + max(20, 4b)`` for blocks, capped at ``P``. A larger basis means fewer restarts and fewer
products: top 10 of the race's Hessians (``benchmarks/bench_eigsh.py --race``) to 1e-6 at b = 1,
ncv 21 / 40 / 60 / 100: 83 / 77 / 74 / 73 products (vgg), 254 / 200 / 196 / 193 (mlp), 93 / 83 /
79 / 79 (cnn) under the residual criterion, 71 / 66 / 65 / 65, 216 / 178 / 175 / 173 and 81 / 75
/ 72 / 72 under the eigenvalue criterion; on synthetic spectra (k = 3–20) 2k + 20 saves 0–5%
over ARPACK's size and more gains nothing. A step that reads the older basis reads all of it,
so past ``2k + 20`` the time outside the products grows faster than the products shrink (mlp,
P = 269 k on a shared CPU core, before the ω-recurrence: 3.7 s at ncv 40, 7.8 s at 60, 13.5 s
at 100). Ends inside a dense bulk converge in far fewer products with a larger ``ncv``.

Cost per step besides the product: ``4 · P · n · b`` flops of Gram-Schmidt (one pass, ``n`` the
basis size; a second only after heavy cancellation) and an ``n × n`` float64 ``eigh`` on the host;
a restart adds ``2 · P · n · p``.
"""

from __future__ import annotations

import math
import operator
import time
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .krylov import (
    CHUNK_BYTES,
    DGKS,
    Products,
    check_memory,
    check_operator,
    cholesky_qr,
    free_bytes,
    left_multiply,
    orthonormalize,
    project_out,
    random_block,
    run_symmetry_check,
    subtract,
)

Tensor = torch.Tensor

WHICH = ("LA", "SA", "LM", "BE")
CRITERIA = ("residual", "eigenvalue")
#: a restart keeps k + _KEEP·(ncv − b − k) Ritz vectors (measured on synthetic Hessian spectra)
_KEEP_SINGLE = 0.5
_KEEP_BLOCK = 0.5
_TINY = 1e-30  # relative size below which restart couplings and Ritz coefficients are flushed
#: operators smaller than this use ``min(k, 8)`` without measuring the cost curve
MEASURE_MIN_P = 4096
#: products to convergence at block size ``b`` over those at ``b = 1`` (same problem, same tol):
#: the model behind ``block_size=None``; measured, see ``benchmarks/results/cpu-eigsh-*``
INFLATION_PER_COLUMN = 0.25


def inflation(b: int) -> float:
    """Expected products at block size ``b`` relative to single-vector Lanczos.

    >>> inflation(1), round(inflation(8), 2)
    (1.0, 2.75)
    """
    return 1.0 + INFLATION_PER_COLUMN * (b - 1)


# ----------------------------------------------------------------------------------------------
# results


@dataclass
class EigshInfo:
    """What :func:`eigsh` did, returned with ``return_info=True``.

    Attributes:
        products: columns multiplied by the operator (Hessian-vector products), all included.
        iterations: Lanczos steps, each one ``matmat`` call with ``block_size`` columns.
        restarts: thick restarts.
        residuals: float64 ``[k]``, ``‖H y − θ y‖`` of each returned pair in the order of the
            eigenvalues: the Lanczos estimate, or the true norm when ``verified``.
        converged_mask: bool ``[k]``, which pairs met the tolerance under ``criterion`` (for
            ``"eigenvalue"``: the bound without its rounding floor).
        eigenvalue_bounds: float64 ``[k]``, bounds on the eigenvalue errors ``|λ − θ|``:
            ``min(‖r‖, ‖R_C‖² / gap_C)`` (:func:`eigenvalue_bounds`, from the residuals above and
            the other Ritz values) plus an estimate of the rounding floor (``(n + √P)·eps·‖H‖``,
            ``n`` the basis size; after ``verify``, ``k·eps(operator dtype)·‖H‖``). Computed
            under either criterion.
        criterion: ``"residual"`` or ``"eigenvalue"``, what ``tol`` was applied to.
        converged: all pairs met it.
        verified: ``residuals`` are true residual norms (``verify=True``).
        seconds_in_products: wall time inside the operator's ``matmat`` (synchronised on CUDA).
        seconds_total: wall time of the whole call.
        block_size: ``b``.
        ncv: the largest basis (projected problem) size.
        basis_bytes: memory of the Lanczos basis.
        deflations: directions dropped at breakdowns (and replaced by random vectors).
        block_choice: how ``b`` was chosen: ``{"how": "given" | "default" | "measured",
            "curve": {K: seconds per call}, "expected": {b: expected seconds per b=1 product},
            "products": products spent measuring beyond the first step}``.
        symmetry_probe: ``"passed"``, or ``None`` when no probe ran.
        calls: ``matmat`` calls.
        reorthogonalizations: steps that subtracted components along the older basis (the
            others found it orthogonal to ``eps^(3/4)`` and subtracted nothing), partial ones
            included.
        partial_reorthogonalizations: of those, the steps (block size 1) that subtracted only
            the few older vectors whose components exceeded the threshold, one at a time.
        skipped_reads: steps that did not even read the older basis (block size 1: the
            ω-recurrence estimated the new vector orthogonal to it to ``eps^(3/4)``).
    """

    products: int
    iterations: int
    restarts: int
    residuals: Tensor
    eigenvalue_bounds: Tensor
    criterion: str
    converged_mask: Tensor
    converged: bool
    verified: bool
    seconds_in_products: float
    seconds_total: float
    block_size: int
    ncv: int
    basis_bytes: int
    deflations: int
    block_choice: dict = field(default_factory=dict)
    symmetry_probe: str | None = None
    calls: int = 0
    reorthogonalizations: int = 0
    partial_reorthogonalizations: int = 0
    skipped_reads: int = 0

    @property
    def seconds_elsewhere(self) -> float:
        """Wall time outside the products (orthogonalisation, the small eigenproblems, ...)."""
        return self.seconds_total - self.seconds_in_products


def order_by_which(theta: Tensor, which: str) -> Tensor:
    """Indices of the Ritz values ``theta`` (float64, ascending) from most to least wanted.

    ``"BE"`` alternates the top and the bottom, starting at the top, so that its first ``k``
    entries are ``ceil(k/2)`` from the top and ``floor(k/2)`` from the bottom.

    >>> order_by_which(torch.tensor([-3.0, 1.0, 2.0]), "BE").tolist()
    [2, 0, 1]
    """
    n = theta.numel()
    if which == "LA":
        return torch.argsort(theta, descending=True, stable=True)
    if which == "SA":
        return torch.argsort(theta, stable=True)
    if which == "LM":
        return torch.argsort(theta.abs(), descending=True, stable=True)
    asc = torch.argsort(theta, stable=True)
    out, lo, hi, top = [], 0, n - 1, True
    while lo <= hi:
        if top:
            out.append(int(asc[hi]))
            hi -= 1
        else:
            out.append(int(asc[lo]))
            lo += 1
        top = not top
    return torch.tensor(out, dtype=torch.long)


def basis_bytes(P: int, columns: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes :func:`eigsh` needs for a basis of ``columns`` vectors plus its working blocks.

    >>> basis_bytes(1000, 40, 8, torch.float32)
    352000
    """
    el = torch.empty(0, dtype=dtype).element_size()
    return P * columns * el + P * block_size * (2 * el + 16)


def _check_memory(P, C, b, dtype, device) -> int:
    hint = (
        "pass basis_device='cpu' to keep the basis in host memory, "
        if torch.device(device).type != "cpu"
        else ""
    )
    return check_memory(
        basis_bytes(P, C, b, dtype),
        device,
        f"eigsh's Lanczos basis of {C} vectors of length {P:,} in {dtype} (plus working blocks)",
        "use a smaller ncv or block_size (the basis holds ncv + block_size vectors; max_iter "
        f"does not change it), {hint}or basis_dtype=torch.float32.",
    )


def _compress(Vt: Tensor, e: int, Zk: Tensor) -> None:
    """``Vt[:p] = Zkᵀ Vt[:e]`` in place, column chunk by column chunk (no second basis)."""
    Zt = torch.where(Zk.abs() < _TINY, 0.0, Zk).T.contiguous().to(Vt.device, Vt.dtype)
    left_multiply(Vt[:e], Zt)


#: the older basis is projected out only once the new block's components along it exceed
#: ``eps^_SEMI`` of its norm (semi-orthogonality, kept well below √eps so that the returned vectors
#: are orthonormal to ~eps^_SEMI). Blocks compute the components on every step (one read of the
#: basis); single vectors estimate them by Simon's ω-recurrence and read the basis only when the
#: estimate crosses the threshold (:class:`_Omega`)
_SEMI = 0.75
#: single vectors read the older basis once the ω bound exceeds ``_TRIGGER_TOL · tol ·
#: max(min |θ_wanted| / ‖H‖, eps^(2/3))``, clamped to ``[eps^_SEMI, √eps]``: the orthogonality
#: the requested residual tolerance needs (a loss of orthogonality ``δ`` moves the Ritz residuals
#: by about ``δ·‖H‖``: measured 3.8e-9 at ``δ ≈ 1e-8·θ/‖H‖`` on a float64 test spectrum), and
#: never beyond semi-orthogonality
_TRIGGER_TOL = 0.001
#: single vectors: once the measured components cross the threshold, only the rows whose component
#: exceeds ``_PARTIAL × eps^_SEMI`` are subtracted (one AXPY each), as long as that costs less than
#: the full pass (``_PARTIAL_COST`` row passes per AXPY against one per older row)
_PARTIAL = 1.0
_PARTIAL_COST = 3


class _Projection(NamedTuple):
    """What :func:`_project` did to the older rows ``Vt[:lo]``.

    ``h``: the coefficients ``[e, b]`` subtracted (zero for rows left alone); ``full``: all older
    rows were subtracted; ``components``: ``|Vt[:lo]ᵀ W| / beta`` (float64, host, max over the
    columns) as measured *before* any subtraction, ``None`` when the older rows were not read or
    were all subtracted; ``rows``: the older rows subtracted by a partial step, else ``None``.
    """

    h: Tensor
    full: bool
    components: Tensor | None = None
    rows: list[int] | None = None
    norm: Tensor | None = None  # ‖W‖ per column after the projection, when nothing followed it


def _project(
    Vt: Tensor,
    W: Tensor,
    s: int,
    e: int,
    lo: int,
    wcol: Tensor,
    semi: float,
    need_older=None,
    partial: float | None = None,
) -> _Projection | None:
    """Orthogonalise the product ``W`` of the block ``Vt[s:e]`` against the basis ``Vt[:e]``, in
    place: the local part ``Vt[lo:e]`` (the previous and the current block, where the three-term
    recurrence puts nearly all of ``W``; twice when it cancelled more than ``1 − 1/√2``), then
    the older rows ``Vt[:lo]``, whose coefficients are computed by one GEMM (``Vt[:lo]ᵀ W`` is
    zero in exact arithmetic).

    Nothing is subtracted while every coefficient is at most ``semi ×`` the remaining norm. Once
    one exceeds it, ``partial`` (single vectors) subtracts only the rows above ``partial · semi``
    (one AXPY each) when they are few enough that this costs less than a pass over all older rows
    (``_PARTIAL_COST`` row passes per AXPY); otherwise all older rows are subtracted by one GEMM
    (and a second full pass follows after heavy cancellation, DGKS). ``need_older(h_local,
    beta)``, if given, decides first whether the older rows are read at all (an estimate of the
    components). Returns a :class:`_Projection`, or ``None`` when ``lo == 0`` (project everything).
    """
    if lo <= 0:
        return None
    Vl = Vt[lo:e]
    hl = Vl @ W
    subtract(W, Vl.mT, hl)
    beta = torch.linalg.vector_norm(W, dim=0)
    if bool((beta < DGKS * wcol).any()):
        c = Vl @ W
        subtract(W, Vl.mT, c)
        hl += c
        beta = torch.linalg.vector_norm(W, dim=0)
    h = W.new_zeros(e, W.shape[1])
    h[lo:e] = hl
    if need_older is not None and not need_older(hl, beta):
        return _Projection(h, False, norm=beta)
    Vo = Vt[:lo]
    c = Vo @ W
    comp = (c.abs() / beta).amax(1).double().cpu()
    if not bool((comp > semi).any()):
        return _Projection(h, False, comp, norm=beta)
    if partial is not None and W.shape[1] == 1:
        rows = (comp > partial * semi).nonzero().flatten().tolist()
        # few rows, and small components (no cancellation that would call for a second pass)
        if _PARTIAL_COST * len(rows) < lo and float(comp[rows].sum()) < 1 - DGKS:
            ch = c[:, 0].tolist()  # exact: the coefficients in W's dtype
            for i in rows:
                W[:, 0].add_(Vo[i], alpha=-ch[i])
                h[i, 0] = c[i, 0]
            return _Projection(h, False, comp, rows)
    subtract(W, Vo.mT, c)
    h[:lo] = c
    after = torch.linalg.vector_norm(W, dim=0)
    if bool((after < DGKS * beta).any()):
        h += project_out(Vt[:e], W, max_passes=2)
    return _Projection(h, True)


class _Omega:
    """Simon's ω-recurrence (partial reorthogonalisation, 1984) for single-vector Lanczos, in
    its bounding form: ``ω[i, j] ≥ |v_iᵀ v_j|`` estimated from the recurrence coefficients alone,
    so that a step reads the older basis only when the estimate for the new vector exceeds the
    semi-orthogonality threshold.

    With ``Tc`` the coefficients as computed (column ``k``: ``H v_k = Σ_i Tc[i, k] v_i + g_k``,
    ``g_k`` the rounding, ``|g_k| ≤ eps·‖H‖``) and ``β v_e = H v_s − Σ_i tcol_i v_i``:
    ``β |v_kᵀ v_e| ≤ Σ_i |Tc[i, k]| ω[i, s] + Σ_i ω[k, i] |tcol_i| + |g_k|`` (the unit diagonal
    terms cancel), where the two terms in ``ω[k, s]`` enter as one, ``|Tc[k, k] − tcol_s| ω[k, s]``
    (they multiply the same inner product). After a thick restart a kept Ritz vector ``y = V z``
    satisfies
    ``H y = θ y + S q + V (Tc − T) z`` (``T`` the symmetrised matrix its ``z`` came from), so its
    ``|g|`` grows by ``‖(Tc − T) z‖`` (the coefficients of explicit reorthogonalisations and the
    asymmetry of the computed recurrence: about ``eps^(3/4)·‖H‖``, not ``eps·‖H‖``); the kept
    vectors' mutual ``|y_iᵀ y_j| = |z_iᵀ (VᵀV − I) z_j|`` are bounded by ``(|Z|ᵀ Ω |Z|)_ij`` and
    by ``‖Ω‖_F`` (``‖z‖ = 1``), their components along the next vector by ``|z|ᵀ ω`` and by
    ``‖ω‖`` of its column, each plus the compression's rounding ``eps·√e``. Rows the step
    orthogonalised against are reset to ``eps``; rows it measured get their measured size; after
    a partial reorthogonalisation the rows it left get their measured size plus what the
    subtracted rows add through their own ``ω``, over a lower bound on the new norm
    (:meth:`after_partial`).
    """

    def __init__(self, C: int, eps: float):
        self.W = torch.zeros(C, C, dtype=torch.float64)  # ω, zero diagonal
        self.Tc = torch.zeros(C, C, dtype=torch.float64)
        self.g = torch.zeros(C, dtype=torch.float64)  # rounding of H v_k beyond eps·‖H‖
        self.eps = eps
        self.est: Tensor | None = None

    def estimate(self, s: int, e: int, lo: int, tcol: Tensor, beta: float, noise: float) -> Tensor:
        """The bound on ``|v_kᵀ v_e|`` for ``k < e``, given the new column ``tcol`` (local
        entries only) and the norm ``beta`` of the new vector before normalisation."""
        Tm = self.Tc[:e, :e].abs()
        Tm[:, s] = tcol.abs()
        Om = self.W[:e, :e]
        # the two terms in ω[k, s] combine: (Tc[k, k] − tcol[s]) ω[k, s], not their sum
        d = Tm.diagonal() + tcol[s].abs() - (self.Tc[:e, :e].diagonal() - tcol[s]).abs()
        x = (Tm.T @ Om[:, s] + Om @ tcol.abs() - d * Om[:, s] + self.g[:e] + noise) / beta
        x[lo:e] = self.eps
        self.est = x
        return x

    def record(self, s: int, e: int, h: Tensor, beta: float, col: Tensor) -> None:
        """Step ``s`` computed ``H v_s = Σ_i h_i v_i + beta v_e``; ``col`` bounds ``|V[:e]ᵀ v_e|``."""
        self.Tc[:e, s] = h
        self.Tc[e, s] = beta
        self.W[:e, e] = col
        self.W[e, :e] = col

    def after_partial(self, e: int, lo: int, measured: Tensor, rows: list[int]) -> Tensor:
        """The bound on ``|v_kᵀ v_e|`` (``k < e``) after a partial step: the new vector's
        components ``measured`` along the older rows ``[:lo]`` (relative to the norm ``beta``
        before the step) were read, and only ``rows`` were subtracted.

        With ``m_i`` the measured components, ``W' = W − Σ_{i ∈ rows} c_i v_i`` (``|c_i| = m_i
        beta``) and each AXPY's rounding at most ``eps · beta``: for a row ``j`` not subtracted,
        ``|v_jᵀ W'| ≤ beta (m_j + Σ_i m_i ω[j, i] + |rows| eps)`` (``m_j``: the local rows'
        estimate ``eps`` for ``j ≥ lo``), and ``‖W'‖ ≥ beta (1 − (1 + eps^(1/2)) Σ_i m_i −
        |rows| eps)`` (the triangle inequality, ``‖v_i‖ ≤ 1 + eps^(1/2)``). Their ratio bounds the
        component of ``v_e = W' / ‖W'‖``; the subtracted rows are reset to ``eps``, as after a full
        reorthogonalisation."""
        assert self.est is not None
        col = self.est[:e].clone()
        col[:lo] = measured.clamp_min(self.eps)
        idx = torch.tensor(rows, dtype=torch.long)
        m = measured[idx]
        n = len(rows)
        shrink = 1.0 - (1.0 + math.sqrt(self.eps)) * float(m.sum()) - n * self.eps
        col = (col + self.W[:e, idx] @ m + n * self.eps) / shrink  # _project: shrink > 0.7
        col[idx] = self.eps
        return col

    def restart(self, T: Tensor, e: int, Zk: Tensor, theta: Tensor, S: Tensor) -> None:
        """Rows ``[:e]`` are compressed to ``p`` Ritz vectors ``V Zk``, followed by the next
        vector (row ``e`` before, row ``p`` after), with ``H y_k = θ_k y_k + S_k q``."""
        p = Zk.shape[1]
        D = self.Tc[:e, :e] - T[:e, :e]
        inherited = (Zk.abs().T @ self.g[:e]).clamp_max(float(self.g[:e].norm()))
        g = torch.linalg.vector_norm(D @ Zk, dim=0) + inherited
        Om = self.W
        A = Zk.abs()
        old = Om[:e, : e + 1].clone()
        rounding = self.eps * math.sqrt(e)  # of the compression y = Σ z_i v_i
        Om.zero_()
        # |y_iᵀ y_j| = |z_iᵀ (VᵀV − I) z_j| ≤ (|Z|ᵀ Ω |Z|)_ij and ≤ ‖Ω‖_F (‖z‖ = 1); the next
        # vector's |y_kᵀ q| ≤ |z_k|ᵀ ω_q and ≤ ‖ω_q‖
        mutual = (A.T @ old[:, :e] @ A).clamp_max(float(torch.linalg.matrix_norm(old[:, :e])))
        Om[:p, :p] = mutual + rounding
        Om[:p, p] = (A.T @ old[:, e]).clamp_max(float(old[:, e].norm())) + rounding
        Om[p, :p] = Om[:p, p]
        Om.diagonal().zero_()
        self.g.zero_()
        self.g[:p] = g
        self.Tc.zero_()
        self.Tc[:p, :p] = torch.diag(theta)
        self.Tc[p, :p] = S[0] if S.shape[0] else 0.0


def eigenvalue_bounds(theta: Tensor, res: Tensor, passes: int = 1) -> Tensor:
    """Bounds on ``|λ − θ_i|`` for Ritz values ``theta`` with residual norms ``res`` (float64,
    any order): ``min(res_i, min_C ‖R_C‖² / gap_C)`` over the runs ``C`` of consecutive Ritz
    values (in ascending order) that contain ``i``.

    The quadratic residual bound (Kato–Temple for one pair; Mathias / Li–Li for a cluster of
    pairs): if the Ritz values of ``C`` are separated by ``gap_C`` from the rest of the spectrum,
    the eigenvalues they approximate are within ``‖R_C‖² / gap_C`` of them (``‖R_C‖²`` taken as
    ``Σ res_j²`` over ``C``, the Frobenius norm: at least the 2-norm, equal to it at block size
    1, where the residual matrix has rank one). The rest of the spectrum is estimated, as in
    Parlett §11, from the other Ritz values widened by their own residual bounds (an eigenvalue
    lies within ``res_j`` of ``θ_j``): ``gap_C = min_{j ∉ C} (dist(θ_j, [min θ_C, max θ_C]) −
    res_j)``. Runs rather than single pairs make clustered and repeated eigenvalues cheap: their
    pairwise gaps are tiny, the gap of the whole cluster to the rest is not. A run whose gap is
    not above ``‖R_C‖`` (where the quadratic bound is no better) gives nothing, nor does the run
    of all Ritz values, so the bound never exceeds the plain residual bound ``res_i``. Each of
    ``passes`` further passes widens the other Ritz values by their bounds of the pass before
    instead of their residuals (valid by induction, and tighter).

    Like every Krylov stopping test (ARPACK's residual test included) it assumes that no
    eigenvalue near the wanted ones is still missing from the Ritz values: a start vector
    orthogonal to an eigenvector, or one copy of a repeated eigenvalue at block size 1, is
    invisible to it.

    >>> b = eigenvalue_bounds(torch.tensor([0.0, 1.0, 5.0], dtype=torch.float64),
    ...                       torch.tensor([0.5, 1e-3, 1e-4], dtype=torch.float64))
    >>> [float(f"{x:.3g}") for x in b]  # 0.5²/(1 − 1e-3), then 1e-3²/(1 − 0.0625), 1e-4²/4
    [0.0625, 1.07e-06, 2.5e-09]
    """
    n = theta.numel()
    order = torch.argsort(theta, stable=True)
    th, r = theta[order], res[order]
    inf = torch.tensor([math.inf], dtype=torch.float64)
    ss = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(r * r, 0)])
    S = ss[None, 1:] - ss[:-1, None]  # run [a, b] (row a, column b >= a): Σ res²
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool))
    width = r
    for _ in range(1 + passes):
        # highest upper end below each position, lowest lower end above it
        below = torch.cat([-inf, torch.cummax(th + width, 0).values[:-1]])
        above = torch.flip(torch.cummin(torch.flip(th - width, (0,)), 0).values, (0,))
        above = torch.cat([above[1:], inf])
        gap = torch.minimum((th - below)[:, None], (above - th)[None, :])
        valid = upper & (gap > S.clamp_min(0).sqrt())
        valid[0, n - 1] = False  # all Ritz values: nothing outside them to measure a gap to
        quad = torch.where(valid, S / torch.where(valid, gap, 1.0), math.inf)
        # best run containing i: min over a <= i <= b
        suffix = torch.flip(torch.cummin(torch.flip(quad, (1,)), 1).values, (1,))
        width = torch.minimum(r, torch.where(upper, suffix, math.inf).amin(0))
    out = torch.empty_like(theta)
    out[order] = width
    return out


#: multiple of ``eps(operator dtype) · ‖H‖`` below which a true residual is product rounding noise
_NOISE = 1e3


def _orthonormal(Y: Tensor, level: float) -> Tensor:
    """``Y`` (``[P, k]``, the caller's own) with orthonormal columns: unchanged when
    ``|YᵀY − I| ≤ level`` entrywise, else after one Cholesky-QR pass in place (Ritz vectors of a
    basis whose reads followed ``tol``, :data:`_TRIGGER_TOL`, are orthonormal only to that
    level)."""
    G = (Y.mT @ Y).double().cpu()
    if G.numel() and float((G - torch.eye(G.shape[0], dtype=G.dtype)).abs().max()) > level:
        cholesky_qr(Y.mT, G)
    return Y


def _rayleigh_ritz(Y: Tensor, HY: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rayleigh-Ritz on ``span(Y)`` in float64 from one product ``HY``: refined eigenvalues
    (float64, CPU, ascending), the rotated vectors (``Y``'s dtype) and true residual norms.
    Row chunk by row chunk: float64 accumulation without float64 copies of ``Y`` and ``HY``."""
    P, k = Y.shape
    rows = max(1, CHUNK_BYTES // max(1, 16 * k))
    G = torch.zeros(k, k, dtype=torch.float64, device=Y.device)
    M = torch.zeros_like(G)
    for r0 in range(0, P, rows):
        Yc, HYc = Y[r0 : r0 + rows].double(), HY[r0 : r0 + rows].double()
        G += Yc.T @ Yc
        M += Yc.T @ HYc
    M = (M + M.T) / 2
    L = torch.linalg.cholesky(G)
    Linv = torch.linalg.solve_triangular(
        L, torch.eye(L.shape[0], dtype=L.dtype, device=L.device), upper=False
    )
    w, U = torch.linalg.eigh(Linv @ M @ Linv.T)
    C = Linv.T @ U
    Yr = torch.empty_like(Y)
    sq = torch.zeros(k, dtype=torch.float64, device=Y.device)
    for r0 in range(0, P, rows):
        Yc = Y[r0 : r0 + rows].double() @ C
        Yr[r0 : r0 + rows] = Yc
        sq += ((HY[r0 : r0 + rows].double() @ C - Yc * w) ** 2).sum(0)
    return w.cpu(), Yr, sq.sqrt().cpu()


def _measure_block(
    products: Products, X: Tensor, max_calls: int = 4
) -> tuple[int, dict, Tensor, Tensor]:
    """The cost of a one-column and a ``B``-column product: ``X[:, :1]`` and ``X`` are multiplied
    in turn until the last two calls of each width agree within 25% (at most ``max_calls``
    each: a width's first calls on a hessfast operator capture and trace it), and the faster of
    those two is its cost. Returns ``(b, choice info, H X[:, :1], H X)``."""
    B = X.shape[1]
    seen: dict[int, list[float]] = {1: [], B: []}
    Y: dict[int, Tensor] = {}

    def settled(w: int) -> bool:
        t = seen[w]
        return len(t) >= max_calls or (len(t) >= 2 and max(t[-2:]) <= 1.25 * min(t[-2:]))

    while not (settled(1) and settled(B)):
        for w, cols in ((1, X[:, :1]), (B, X)):
            if not settled(w):
                Y[w] = products.apply(cols)
                seen[w].append(products.timings[-1][1])
    t = {w: min(v[-2:]) for w, v in seen.items()}
    expected = {b: inflation(b) * t[b] / b for b in (1, B)}
    b = min(expected, key=lambda c: (expected[c], c))
    extra = len(seen[1]) + B * len(seen[B]) - b
    choice = {
        "how": "measured",
        "curve": t,
        "expected": expected,
        "products": extra,
        "calls": {w: v for w, v in seen.items()},
    }
    return b, choice, Y[1], Y[B]


# ----------------------------------------------------------------------------------------------
# eigsh


def eigsh(
    op,
    k: int = 10,
    which: str = "LA",
    block_size: int | None = None,
    tol: float = 1e-6,
    max_iter: int | None = None,
    seed: int = 0,
    *,
    criterion: str = "residual",
    ncv: int | None = None,
    v0: Tensor | None = None,
    basis_device: str | torch.device | None = None,
    basis_dtype: torch.dtype | None = None,
    verify: bool | None = None,
    check_symmetric: bool | None = None,
    return_info: bool = False,
    warn: bool = True,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, EigshInfo]:
    """``k`` eigenpairs at an end of the spectrum of a symmetric operator, by block Lanczos.

    Args:
        op: any symmetric operator with ``shape`` ``(P, P)``, ``dtype``, ``device`` and
            ``matmat(V [P, K]) -> [P, K]`` (a :class:`hessfast.HessianOperator`,
            :class:`hessfast.GGNOperator`, :class:`hessfast.DenseOperator`, ...).
        k: number of eigenpairs, ``1 ≤ k ≤ P``.
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest
            magnitude, ``"BE"`` both ends (``k // 2`` from the bottom, the rest from the top).
        block_size: vectors per Lanczos step, i.e. columns per ``matmat`` call. ``None``
            (default): chosen from the measured cost of a ``min(k, 8)``-column product against a
            one-column one on operators with ``P ≥ 4096`` (module docstring; the choice is in
            ``info.block_choice``), ``min(k, 8)`` on smaller ones. Use at least the multiplicity
            of the eigenvalues you need.
        tol: relative accuracy: a pair has converged when its measure (``criterion``) is at
            most ``tol · max(|θ|, eps^(2/3)·‖H‖)``.
        criterion: what ``tol`` bounds. ``"residual"`` (default): the residual norm
            ``‖H y − θ y‖`` (ARPACK's test). It controls the eigenvectors too (their angle to the
            eigenspace is at most residual / gap) and makes the eigenvalues far more accurate
            than asked (their error is about residual² / gap: 1e-12 when 1e-6 was asked).
            ``"eigenvalue"``: a bound on the eigenvalue error ``|λ − θ|``,
            ``min(‖r‖, ‖R_C‖² / gap_C)`` (:func:`eigenvalue_bounds`; the gap estimated from the
            other Ritz values widened by their residuals). Eigenvalues converge quadratically
            in the residual, so this stops earlier (top 10 of three small CNN/MLP Hessians at
            tol 1e-6: 10–15% fewer products, 75 / 178 / 66 against 83 / 200 / 77; 10–25% on
            synthetic spectra) with eigenvalues accurate to ``tol`` (measured: 1e-8 to 5e-8),
            while the vectors are only accurate to about ``sqrt(tol · |θ| / gap)``: use it when
            the eigenvalues are what you need. At block size 1 it is as blind as the residual
            test at ``tol' ≈ sqrt(tol)`` to a cluster that Lanczos has not resolved yet (a Ritz
            value between two eigenvalues closer than the residual): use a ``block_size`` of at
            least the cluster's size there. Either way the bounds are in
            ``info.eigenvalue_bounds`` and the residuals in ``info.residuals``.
        max_iter: at most this many Lanczos steps (``matmat`` calls), so at most
            ``max_iter · block_size`` products (plus ``k`` for ``verify``, 2 or 4 for
            ``check_symmetric``); default ``max(1000, ceil(k / block_size))``. When it runs out,
            the current Ritz pairs come back with a ``RuntimeWarning`` (``warn=False`` silences
            it) and ``info.converged`` false.
        seed: seeds the random start block (a CPU ``torch.Generator``): the same seed gives the
            same numbers.
        ncv: largest basis size before a thick restart (default ``2k + 20`` at block size 1 while
            it fits a quarter of the free memory, never below ARPACK's ``max(2k + 1, 20)``;
            ``2k + max(20, 4b)`` for blocks; at least ``k + b + 1``, capped at P); the
            basis holds ``ncv + b`` vectors. Raise it for ends inside a dense part of the
            spectrum, lower it when memory is short.
        v0: optional start vectors ``[P]`` or ``[P, j]`` (``j ≤ b``; random vectors complete
            the block).
        basis_device: where the Lanczos vectors live (default: the operator's device); ``"cpu"``
            keeps them in host memory and moves one block per product.
        basis_dtype: dtype of the basis (default: the operator's, or float32 for 16-bit ones).
        verify: spend ``k`` more products on a final Rayleigh-Ritz step in float64 over the Ritz
            vectors: the eigenvalues become float64 Rayleigh quotients and the residuals (and
            ``info.converged``) true residual norms ``‖H y − θ y‖``. Default (``None``): on
            whenever the basis is not float64 — the projected matrix of a float32 basis is built
            from float32 dot products over P entries, which leaves eigenvalue errors far above
            ``tol`` (measured: 2e-5 on a 0.7 M-parameter CNN,
            ``benchmarks/results/cpu-eigsh-cnn-basis-2026-11-28.md``) while the cheap residual
            estimate still reports convergence. A true residual counts as converged at
            ``max(tol·|θ|, 1e3·eps(op dtype)·‖H‖)``: below that it is the products' own rounding
            noise (the eigenvalue error is then about residual² / gap).
        check_symmetric: probe ``⟨u, Hv⟩ = ⟨Hu, v⟩`` first and raise ``ValueError`` naming the
            likely causes if it fails: ``None`` (default) one probe pair, a single two-column
            product, on hessfast's Hessian and GGN operators; ``True`` two pairs on any
            operator; ``False`` never (:func:`run_symmetry_check`).
        return_info: also return an :class:`EigshInfo`.
        warn: warn when ``max_iter`` runs out before convergence.

    Returns:
        ``(eigenvalues, eigenvectors)``: float64 ``[k]`` on the CPU, sorted ascending, and
        ``[P, k]`` orthonormal columns in the operator's dtype and on its device; with
        ``return_info=True`` also the :class:`EigshInfo`.

    Raises:
        ValueError: a non-square operator, ``k`` outside ``[1, P]``, a bad ``which``, or an
            asymmetric operator under ``check_symmetric``.
        hessfast.NonFiniteError: a product contained NaN or Inf (a ``FloatingPointError``).
        MemoryError: the basis does not fit the free memory of ``basis_device``; the message
            says how many bytes it needs.

    >>> import torch, hessfast
    >>> from hessfast.algorithms import eigsh
    >>> H = hessfast.DenseOperator(torch.diag(torch.arange(1.0, 31.0, dtype=torch.float64)))
    >>> evals, evecs = eigsh(H, k=3, which="LA")
    >>> [round(x, 6) for x in evals.tolist()], tuple(evecs.shape)
    ([28.0, 29.0, 30.0], (30, 3))
    >>> evals, evecs, info = eigsh(H, k=2, which="BE", return_info=True)
    >>> [round(x, 6) for x in evals.tolist()], info.converged
    ([1.0, 30.0], True)
    """
    t_start = time.perf_counter()
    P = check_operator(op)
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    try:
        k = operator.index(k)
    except TypeError:
        raise ValueError(f"k must be an integer in [1, P] = [1, {P}], got {k!r}") from None
    if k < 1 or k > P:
        raise ValueError(f"k must be an integer in [1, P] = [1, {P}], got {k!r}")
    if block_size is not None and (isinstance(block_size, bool) or int(block_size) < 1):
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    B = min(k, 8, P) if block_size is None else min(int(block_size), P)
    measure = block_size is None and B > 1 and P >= MEASURE_MIN_P
    if not tol >= 0:
        raise ValueError(f"tol must be non-negative, got {tol!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    by_value = criterion == "eigenvalue"
    if max_iter is not None and max_iter < -(-k // B):
        raise ValueError(
            f"max_iter={max_iter} steps of block size {B} cannot build {k} Ritz vectors: "
            f"use max_iter >= {-(-k // B)} or a larger block_size"
        )

    op_dtype = op.dtype
    bdtype = basis_dtype or (
        op_dtype if op_dtype in (torch.float32, torch.float64) else torch.float32
    )
    bdevice = torch.device(basis_device) if basis_device is not None else torch.device(op.device)
    free = free_bytes(bdevice)
    el = torch.empty(0, dtype=bdtype).element_size()

    def basis_size(b: int) -> int:
        if ncv is not None:
            return int(ncv)
        if b > 1:
            return 2 * k + max(20, 4 * b)
        fits = (free // 4) // (P * el) if free is not None else 2 * k + 20
        return max(2 * k + 1, 20, min(2 * k + 20, fits))

    m = basis_size(B)
    if ncv is not None and m < k + B + 1 and m < P:
        raise ValueError(f"ncv must be at least k + block_size + 1 = {k + B + 1}, got {ncv}")
    _check_memory(P, min(max(m, basis_size(1)) + B, P), B, bdtype, bdevice)
    products = Products(op, dtype=bdtype, device=bdevice)
    run_symmetry_check(op, products, seed, check_symmetric)

    eps = torch.finfo(bdtype).eps
    drop_rel = 200 * eps
    floor_rel = eps ** (2 / 3)
    gen = torch.Generator().manual_seed(int(seed))

    # start block: v0, completed by random vectors
    start = torch.zeros(P, 0, dtype=bdtype, device=bdevice)
    if v0 is not None:
        v0 = v0.reshape(P, -1) if v0.dim() == 1 else v0
        if v0.dim() != 2 or v0.shape[0] != P or v0.shape[1] > B:
            raise ValueError(
                f"v0 must be [P] or [P, j] with j <= block_size={B}, got {list(v0.shape)}"
            )
        X = v0.to(bdevice, bdtype).clone()
        if not bool(torch.isfinite(X).all()):
            raise ValueError("v0 contains NaN or Inf")
        scale = float(X.double().norm(dim=0).max()) if X.numel() else 0.0
        start, _, _ = orthonormalize(X, None, drop_tol=1e-8 * scale, max_rank=B)
    if start.shape[1] < B:
        extra = random_block(gen, P, B - start.shape[1], bdtype, bdevice, None, start)
        start = torch.cat([start, extra], dim=1)

    # block size: given, default, or measured on the first products (which are step one)
    W = None
    if measure:
        b, choice, Y1, YB = _measure_block(products, start)
        start, W = (start[:, :1], Y1) if b == 1 else (start, YB)
    else:
        b = B
        choice = {"how": "given" if block_size is not None else "default"}
    m = basis_size(b)
    if max_iter is None:
        max_iter = max(1000, -(-k // b))
    if m < k + b + 1 and m < P:
        m = k + b + 1
    C = min(m + b, P)  # basis capacity: ncv vectors plus the next block
    keep_target = k + int((m - b - k) * (_KEEP_SINGLE if b == 1 else _KEEP_BLOCK))

    # the basis, one vector per row (every row is written before it is read)
    Vt = torch.empty(C, P, dtype=bdtype, device=bdevice)
    T = torch.zeros(C, C, dtype=torch.float64)
    Vt[: start.shape[1]] = start.T
    s, e, lo = 0, start.shape[1], 0  # current block [s, e); local part of the next projection

    anorm = 0.0
    semi = eps**_SEMI
    trigger = semi
    omega = _Omega(C + 1, eps) if b == 1 else None
    restarts = deflations = reorths = partials = skipped = 0
    confirm = None  # wanted Ritz values awaiting confirmation after a breakdown
    converged = False
    theta = Z = res = R = None
    steps = 0
    while steps < max_iter:
        calls = products.calls
        if W is None:
            W = products.apply(Vt[s:e].T)
        steps += 1
        if products.calls == calls + 1 and products.col_norms is not None:
            wcol = products.col_norms.to(W.device, W.dtype)
        else:
            wcol = torch.linalg.vector_norm(W, dim=0)
        wn = float(wcol.max())
        anorm = max(anorm, wn)
        need_older = None
        if omega is not None and lo > 0:

            def need_older(hl, beta, s=s, e=e, lo=lo):
                tcol = torch.zeros(e, dtype=torch.float64)
                tcol[lo:e] = hl[:, 0].double().cpu()
                x = omega.estimate(s, e, lo, tcol, float(beta[0]), 2 * eps * anorm)
                return bool(x[:lo].abs().max() > trigger)

        pr = _project(Vt, W, s, e, lo, wcol, semi, need_older, _PARTIAL if b == 1 else None)
        if pr is None:
            pr = _Projection(project_out(Vt[:e], W), True)
        else:
            reorths += int(pr.full or pr.rows is not None)
            partials += int(pr.rows is not None)
            skipped += int(need_older is not None and not pr.full and pr.components is None)
        h = pr.h.double().cpu()
        T[:e, s:e] = h
        T[s:e, :e] = h.T
        T[s:e, s:e] = (h[s:e] + h[s:e].T) / 2

        room = C - e
        want_cols = min(b, room)
        Q, R, sigma = orthonormalize(
            W,
            Vt[:e],
            drop_rel * anorm,
            want_cols,
            wnorm=wn,
            out=Vt[e : e + want_cols],
            norm=pr.norm if b == 1 else None,
        )
        W = None
        broke = Q.shape[1] < want_cols
        if broke:
            deflations += min(int((sigma <= drop_rel * anorm).sum()), want_cols - Q.shape[1])
            fresh = random_block(gen, P, want_cols - Q.shape[1], bdtype, bdevice, Vt[:e], Q)
            Q = torch.cat([Q, fresh], dim=1)
            R = torch.cat([R, torch.zeros(fresh.shape[1], R.shape[1], dtype=torch.float64)])
            Vt[e : e + Q.shape[1]] = Q.T
        bq = Q.shape[1]
        if omega is not None and bq:
            if pr.full or broke:
                col = torch.full((e,), eps, dtype=torch.float64)
            elif pr.rows is not None:
                col = omega.after_partial(e, lo, pr.components, pr.rows)
            else:
                col = omega.est.clone()
                if pr.components is not None:
                    col[:lo] = pr.components.clamp_min(eps)
            omega.record(s, e, h[:, 0], float(R[0, 0]), col)

        theta, Z = torch.linalg.eigh(T[:e, :e])
        anorm = max(anorm, float(theta.abs().max()))
        res = (R @ Z[s:e, :]).norm(dim=0) if bq else torch.zeros(e, dtype=torch.float64)
        if e >= k:
            wanted = order_by_which(theta, which)[:k]
            thresh = tol * torch.clamp(theta[wanted].abs(), min=floor_rel * anorm)
            if omega is not None and anorm > 0:
                r = max(float(theta[wanted].abs().min()) / anorm, floor_rel)
                trigger = min(math.sqrt(eps), max(semi, _TRIGGER_TOL * tol * r))
            err = eigenvalue_bounds(theta, res)[wanted] if by_value else res[wanted]
            if bool((err <= thresh).all()):
                # after a breakdown the basis spans an invariant subspace: its Ritz pairs are exact
                # but need not be the extreme ones, and the fresh random directions have not been
                # multiplied yet. Accept only when the next step leaves the wanted values unchanged.
                vals = theta[wanted]
                if not broke or (
                    confirm is not None
                    and confirm.shape == vals.shape
                    and bool(((vals - confirm).abs() <= thresh + drop_rel * anorm).all())
                ):
                    converged = True
                    break
                confirm = vals.clone()
            else:
                confirm = None
        if bq == 0:  # the basis spans the whole space: the Ritz pairs are exact
            converged = True
            break
        if C < P and e + bq + b > C:  # full: thick restart
            p = min(keep_target, C - 2 * b)
            keep = order_by_which(theta, which)[:p]
            _compress(Vt, e, Z[:, keep])
            Vt[p : p + bq] = Q.T  # rows e.. hold Q; p + bq <= e: no overlap
            S = R @ Z[s:e, keep]  # [bq, p]: coupling of the Ritz vectors to the next block
            # couplings of converged pairs shrink geometrically from restart to restart; flush
            # them before they turn subnormal (subnormals make every later GEMM crawl on CPUs)
            S[S.abs() < _TINY * anorm] = 0.0
            if omega is not None:
                omega.restart(T, e, Z[:, keep], theta[keep], S)
            T.zero_()
            T[:p, :p] = torch.diag(theta[keep])
            T[p : p + bq, :p] = S
            T[:p, p : p + bq] = S.T
            s, e, lo = p, p + bq, 0
            restarts += 1
            # the basis now starts with the kept Ritz vectors: their pairs in basis coordinates
            theta, Z, res = theta[keep], torch.eye(p, dtype=torch.float64), res[keep]
        else:
            s, e, lo = e, e + bq, s

    wanted = order_by_which(theta, which)[:k]
    wanted = wanted[torch.argsort(theta[wanted], stable=True)]
    evals = theta[wanted].clone()
    n = Z.shape[0]
    Y = Vt[:n].T @ Z[:, wanted].to(bdevice, bdtype)
    residuals = res[wanted].clone()
    bounds = eigenvalue_bounds(theta, res)[wanted]
    thresh = tol * torch.clamp(evals.abs(), min=floor_rel * anorm)
    mask = (bounds if by_value else residuals) <= thresh
    # rounding: the projected matrix is exact to about (n + √P)·eps·‖H‖ (n its size, √P the
    # products' and dot products' own rounding), float64 Rayleigh quotients of products in the
    # operator's dtype to about k·eps(op dtype)·‖H‖
    rounding = (n + math.sqrt(P)) * eps * anorm
    if verify is None:
        verify = bdtype != torch.float64
    if verify:
        evals, Y, residuals = _rayleigh_ritz(Y, products.apply(Y))
        theta, res = theta.clone(), res.clone()
        theta[wanted], res[wanted] = evals, residuals
        bounds = eigenvalue_bounds(theta, res)[wanted]
        # a true residual cannot fall below the rounding noise of the products themselves
        # (float32: ~1e-4·‖H‖ over a million entries); the eigenvalues, accurate to about
        # residual² / gap, are then still far more accurate than tol
        noise = _NOISE * torch.finfo(op_dtype).eps * anorm
        thresh = tol * torch.clamp(evals.abs(), min=floor_rel * anorm)
        mask = bounds <= thresh if by_value else residuals <= torch.clamp(thresh, min=noise)
        rounding = k * max(eps, torch.finfo(op_dtype).eps) * anorm
    else:
        Y = _orthonormal(Y, 100 * eps)
    bounds = bounds + rounding
    converged = bool(mask.all())
    if not converged and warn:
        what = "eigenvalue error bound" if by_value else "residual"
        worst = bounds if by_value else residuals
        warnings.warn(
            f"eigsh: {int((~mask).sum())} of {k} eigenpairs did not reach tol={tol:g} in "
            f"max_iter={max_iter} steps ({products.products} products); largest {what} "
            f"{float(worst.max()):.3g}. {_stall_hint(op, products)}",
            RuntimeWarning,
            stacklevel=2,
        )
    evecs = Y.to(op.device, op_dtype)
    if not return_info:
        return evals, evecs
    info = EigshInfo(
        products=products.products,
        iterations=steps,
        restarts=restarts,
        residuals=residuals,
        eigenvalue_bounds=bounds,
        criterion=criterion,
        converged_mask=mask,
        converged=converged,
        verified=verify,
        seconds_in_products=products.seconds,
        seconds_total=time.perf_counter() - t_start,
        block_size=b,
        ncv=min(m, P),
        basis_bytes=basis_bytes(P, C, b, bdtype),
        deflations=deflations,
        block_choice=choice,
        symmetry_probe=products.symmetry,
        calls=products.calls,
        reorthogonalizations=reorths,
        partial_reorthogonalizations=partials,
        skipped_reads=skipped,
    )
    return evals, evecs, info


def _stall_hint(op, products: Products) -> str:
    """What the warning of a run that did not converge says about the operator's checks."""
    probe = {
        "passed": "The symmetry probe passed, so H is symmetric on random vectors",
        None: "No symmetry probe ran (check_symmetric=False, or not a hessfast model operator)",
    }[products.symmetry]
    det = getattr(op, "deterministic", None)
    if det == "passed":
        det_s = "the determinism check passed (two passes gave the same product)"
    elif det == "skipped":
        det_s = (
            "the determinism check was skipped (check_deterministic=False): a shuffled "
            "DataLoader or train-mode BatchNorm over changing batches makes H a different matrix "
            "on every pass, and Lanczos then never converges"
        )
    else:
        det_s = "no determinism check ran"
    return f"{probe}; {det_s}. Raise max_iter or ncv, or loosen tol."


# ----------------------------------------------------------------------------------------------
# condition number


@dataclass
class ConditionNumber:
    """Result of :func:`condition_number`.

    Attributes:
        value: ``lambda_max / lambda_min``; ``inf`` when ``lambda_min ≤ 0`` (then ``note`` says the
            matrix is not positive definite, or singular for ``which="magnitude"``).
        lambda_max, lambda_min: the eigenvalues used (``which="magnitude"``: ``|λ|_max`` and
            ``|λ|_min``).
        eigenvalues: float64 ``[2]``, ``[lambda_min, lambda_max]`` as eigsh returned them (of
            ``H²`` for ``which="magnitude"``).
        eigenvectors: ``[P, 2]``, the eigenvectors of ``lambda_min`` and ``lambda_max``.
        which: ``"algebraic"`` or ``"magnitude"``.
        note: empty, or why ``value`` is ``inf``.
        info: the :class:`EigshInfo` of the eigsh run (``products`` counts products of ``H``).
    """

    value: float
    lambda_max: float
    lambda_min: float
    eigenvalues: Tensor
    eigenvectors: Tensor = field(repr=False)
    which: str = "algebraic"
    note: str = ""
    info: EigshInfo | None = field(default=None, repr=False)


class _Squared:
    """``H²`` as an operator (each column costs two products of ``H``)."""

    def __init__(self, op):
        self.op = op
        self.shape, self.dtype, self.device = tuple(op.shape), op.dtype, op.device

    def matmat(self, V: Tensor) -> Tensor:
        return self.op.matmat(self.op.matmat(V))


def condition_number(
    op,
    tol: float = 1e-6,
    seed: int = 0,
    which: str = "algebraic",
    **eigsh_kwargs,
) -> ConditionNumber:
    """The spectral condition number ``λ_max / λ_min`` of a symmetric operator, with the
    eigenpairs it used.

    ``which="algebraic"`` (default) runs :func:`eigsh` with ``which="BE", k=2`` and reports
    ``λ_max / λ_min``; when ``λ_min ≤ 0`` the matrix is not positive definite and ``value`` is
    ``inf`` with a ``note`` saying so. ``which="magnitude"`` reports ``|λ|_max / |λ|_min``
    (the usual condition number of an indefinite matrix): the smallest ``|λ|`` is interior to the
    spectrum, so it runs ``eigsh(which="BE", k=2)`` on ``H²`` (two products of ``H`` per column,
    counted in ``info.products``) and takes square roots; it resolves ``|λ|_min`` down to about
    ``10·sqrt(eps)·|λ|_max`` (``eps`` of the operator's dtype) and below that reports ``inf``
    with a note that ``H`` is singular to working precision.

    Other keyword arguments go to :func:`eigsh` (``block_size``, ``max_iter``, ``ncv``,
    ``basis_device``, ...).

    >>> import torch, hessfast
    >>> from hessfast.algorithms import condition_number
    >>> H = hessfast.DenseOperator(torch.diag(torch.linspace(0.5, 50.0, 40, dtype=torch.float64)))
    >>> c = condition_number(H)
    >>> round(c.value, 6), round(c.lambda_min, 6), round(c.lambda_max, 6)
    (100.0, 0.5, 50.0)
    """
    if which not in ("algebraic", "magnitude"):
        raise ValueError(f"which must be 'algebraic' or 'magnitude', got {which!r}")
    for key in ("k", "which", "return_info"):
        if key in eigsh_kwargs:
            raise ValueError(f"condition_number sets {key!r} itself")
    if op.shape[0] < 2:
        raise ValueError(
            f"condition_number needs an operator of size P >= 2 (it takes the two ends of the "
            f"spectrum), got P = {op.shape[0]}: a 1x1 matrix has condition number 1 when its one "
            "entry (op @ torch.ones(1)) is nonzero"
        )
    target = op if which == "algebraic" else _Squared(op)
    if which == "magnitude":
        check_operator(op)
    evals, evecs, info = eigsh(
        target, k=2, which="BE", tol=tol, seed=seed, return_info=True, **eigsh_kwargs
    )
    lo, hi = float(evals[0]), float(evals[1])
    note = ""
    if which == "magnitude":
        info.products *= 2
        lo, hi = math.sqrt(max(lo, 0.0)), math.sqrt(max(hi, 0.0))
        if lo <= 10 * math.sqrt(torch.finfo(op.dtype).eps) * hi:
            value = math.inf
            note = f"the matrix is singular to working precision (|λ|_min ≈ {lo:.3g})"
        else:
            value = hi / lo
    else:
        if lo <= 0:
            value = math.inf
            note = (
                f"the matrix is not positive definite (λ_min = {lo:.6g} ≤ 0); "
                "use which='magnitude' for |λ|_max / |λ|_min"
            )
        else:
            value = hi / lo
    return ConditionNumber(
        value=value,
        lambda_max=hi,
        lambda_min=lo,
        eigenvalues=evals,
        eigenvectors=evecs,
        which=which,
        note=note,
        info=info,
    )
