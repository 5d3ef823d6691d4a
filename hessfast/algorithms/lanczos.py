"""Block Lanczos for the ends of the spectrum of a symmetric curvature operator.

:func:`eigsh` is a thick-restart block Lanczos method (the block form of Wu and Simon's
thick-restart Lanczos):

- **one product per step**: each step multiplies the operator by one block of ``b`` basis vectors
  (one K-batched pass of the model with ``K = b``); nothing else touches the operator;
- **full reorthogonalisation**: every new block is orthogonalised against the whole basis by
  classical Gram-Schmidt run twice ("twice is enough"), so no spurious copies of converged
  eigenvalues appear and the Lanczos residual estimates stay trustworthy;
- **the projected problem in float64**: the coefficients of the Gram-Schmidt passes *are* the
  entries of ``T = Vᵀ H V`` (block tridiagonal after a plain start, an arrow head plus a block
  tridiagonal tail after a restart); ``T`` lives on the host in float64 and
  ``torch.linalg.eigh`` gives the Ritz pairs after every step;
- **convergence by residual norm**: a Ritz pair ``(θ, y = V z)`` has ``H y − θ y = Q R z_last``
  (``Q R`` the next block and its coupling, ``z_last`` the rows of ``z`` on the last block), so
  ``‖R z_last‖`` is its residual norm at no cost. A wanted pair has converged when
  ``‖R z_last‖ ≤ tol · max(|θ|, eps^(2/3) · ‖H‖)`` (the ``eps^(2/3)·‖H‖`` floor, ``eps`` of the
  basis dtype and ``‖H‖`` the largest ``|θ|`` or product-column norm seen, as in ARPACK, keeps
  eigenvalues at zero from asking for an impossible relative accuracy). ``verify=True`` spends
  ``k`` more products on the true residuals ``‖H y − θ y‖``;
- **thick restart**: the basis holds at most ``ncv`` vectors plus the next block. When it is full,
  it is compressed in place (row chunk by row chunk, no second copy) to the ``p`` most wanted Ritz
  vectors, ``p = k + ⌊(ncv − b − k) / 4⌋``, followed by the next block; the relation
  ``H V = V T + Q R Eᵀ`` survives the restart exactly, so no product is ever repeated and
  ``max_iter`` bounds the total work;
- **breakdown**: the new block is made orthonormal by a rank-revealing step (the eigenvalues of its
  float64 Gram matrix, then a Householder QR and one more orthogonalisation against the basis).
  Directions whose norm is below ``200·eps·‖H‖`` lie in the span of the basis already (an
  invariant subspace: an operator of rank below ``k``, a start block in an invariant subspace);
  they are dropped from the Krylov relation and replaced by fresh random vectors orthogonal to the
  basis, which keeps the block size, never divides by a tiny norm, and never produces NaN. The
  Ritz pairs of an invariant subspace are exact yet need not be the extreme ones, so after a
  breakdown convergence is accepted only once a further step (which multiplies the random
  vectors) leaves the wanted Ritz values unchanged. When the basis spans the whole space (``P``
  small), the Ritz pairs are exact and Lanczos stops.

Default block size: ``min(k, 8)`` — wide enough that eigenvalues of multiplicity up to the block
size are found with their whole eigenspace, narrow enough that the basis stays small. A block
spends more products than single-vector Lanczos but far fewer ``matmat`` calls, and a K-batched
product shares its primal forward and backward across the K columns (docs/architecture.md §3); measured on
the top 10 of a 5,000 × 5,000 bulk-plus-outliers spectrum, tol 1e-6: b = 1: 19 products in 19
calls, b = 2: 24 in 12, b = 4: 32 in 8, b = 8: 56 in 7. Pass ``block_size=1`` where products
are paid one by one. Default basis size ``ncv``: ``2k + max(20, 4b)`` vectors (capped at ``P``),
so a restart cycle always spans several block steps. Well-separated ends (the top of a Hessian)
converge within a restart or two; ends inside a dense bulk need many restarts and converge in
far fewer products with a larger ``ncv`` (measured: bottom 5 of 1,990 Gaussian eigenvalues,
b = 4, tol 1e-6: 544 products at the default ncv = 30, 308 at 40, 216 at 60, 192 at 80).

Cost per step besides the product: ``8 · P · n · b`` flops of Gram-Schmidt (two passes, ``n``
the basis size) and an ``n × n`` float64 ``eigh`` on the host; a restart adds ``2 · P · n · p``.
"""

from __future__ import annotations

import math
import operator
import time
import warnings
from dataclasses import dataclass, field

import torch

from ..errors import NonFiniteError

Tensor = torch.Tensor

WHICH = ("LA", "SA", "LM", "BE")
_CHUNK_BYTES = 64 * 2**20  # row chunk of the in-place restart
_KEEP = 0.25  # restart keeps k + _KEEP·(ncv − b − k) Ritz vectors (measured: 0.25 beat 0.1, 0.5)
_TINY = 1e-30  # relative size below which restart couplings and Ritz coefficients are flushed


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
        converged_mask: bool ``[k]``, which pairs met the tolerance.
        converged: all pairs met it.
        verified: ``residuals`` are true residual norms (``verify=True``).
        seconds_in_products: wall time inside the operator's ``matmat`` (synchronised on CUDA).
        seconds_total: wall time of the whole call.
        block_size: ``b``.
        ncv: the largest basis (projected problem) size.
        basis_bytes: memory of the Lanczos basis.
        deflations: directions dropped at breakdowns (and replaced by random vectors).
    """

    products: int
    iterations: int
    restarts: int
    residuals: Tensor
    converged_mask: Tensor
    converged: bool
    verified: bool
    seconds_in_products: float
    seconds_total: float
    block_size: int
    ncv: int
    basis_bytes: int
    deflations: int

    @property
    def seconds_elsewhere(self) -> float:
        """Wall time outside the products (orthogonalisation, the small eigenproblems, ...)."""
        return self.seconds_total - self.seconds_in_products


# ----------------------------------------------------------------------------------------------
# helpers shared by the Lanczos-type algorithms


def check_operator(op) -> int:
    """Check the operator protocol (square ``shape``, ``dtype``, ``device``, ``matmat``); return P.

    >>> import torch, hessfast
    >>> check_operator(hessfast.DenseOperator(torch.eye(3)))
    3
    """
    shape = getattr(op, "shape", None)
    if shape is None or len(tuple(shape)) != 2:
        raise ValueError(
            f"the operator needs a 2-D shape (P, P); {type(op).__name__} has shape {shape!r}"
        )
    if shape[0] != shape[1]:
        raise ValueError(f"the operator is not square: shape {tuple(shape)}")
    if not callable(getattr(op, "matmat", None)):
        raise ValueError(f"{type(op).__name__} has no matmat(V) method")
    for attr in ("dtype", "device"):
        if not hasattr(op, attr):
            raise ValueError(f"{type(op).__name__} has no {attr} attribute")
    return int(shape[0])


class ProductCounter:
    """Wraps an operator: counts products and ``matmat`` calls, times them, checks the results.

    ``matmat`` takes and returns tensors in the operator's dtype and device (it is itself an
    operator); ``apply`` takes a basis block and returns ``H @ block`` in the basis dtype and on the
    basis device.
    """

    def __init__(self, op, basis_dtype: torch.dtype | None = None, basis_device=None):
        self.op = op
        self.shape = tuple(op.shape)
        self.dtype = op.dtype
        self.device = torch.device(op.device)
        self.basis_dtype = basis_dtype or op.dtype
        self.basis_device = torch.device(basis_device) if basis_device is not None else self.device
        self.products = 0
        self.calls = 0
        self.seconds = 0.0
        self._sync = self.device.type == "cuda"

    def matmat(self, X: Tensor) -> Tensor:
        if self._sync:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        Y = self.op.matmat(X)
        if self._sync:
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        self.products += X.shape[1]
        if not isinstance(Y, torch.Tensor) or tuple(Y.shape) != tuple(X.shape):
            got = tuple(Y.shape) if isinstance(Y, torch.Tensor) else type(Y).__name__
            raise ValueError(
                f"operator.matmat returned {got} for an input of shape {tuple(X.shape)}"
            )
        if not bool(torch.isfinite(Y).all()):
            raise NonFiniteError(
                f"an operator product contains NaN or Inf (product call {self.calls}): the "
                "operator is not finite on these vectors; check the model, the data, the loss "
                "scale and the dtype"
            )
        return Y

    def apply(self, B: Tensor) -> Tensor:
        Y = self.matmat(B.to(self.device, self.dtype))
        return Y.to(self.basis_device, self.basis_dtype)


def run_symmetry_check(
    op, counter: ProductCounter, seed: int = 0, check: bool | None = True
) -> None:
    """``op.check_symmetric()`` where the operator's class defines its own; otherwise the probe of
    :meth:`hessfast.operators.CurvatureOperator.check_symmetric` through ``counter``.

    ``check=None`` is the algorithms' default: one probe pair (a single two-column product) for
    hessfast's model operators (Hessian, GGN), whose symmetry a model can break (a constant
    hessfast cannot see, a loss that is not twice differentiable); nothing for other operators.
    ``True``: two probe pairs on any operator; ``False``: nothing."""
    from ..operators import CurvatureOperator, is_model_operator

    if check is False or (check is None and not is_model_operator(op)):
        return
    probes = 1 if check is None else 2
    own = getattr(type(op), "check_symmetric", None)
    if own is not None and own is not CurvatureOperator.check_symmetric:
        op.check_symmetric(num_probes=probes)
    else:
        CurvatureOperator.check_symmetric(counter, num_probes=probes, seed=seed)


def free_bytes(device) -> int | None:
    """Bytes free on ``device`` (``torch.cuda.mem_get_info`` on CUDA, ``MemAvailable`` of
    ``/proc/meminfo`` on the CPU), or ``None`` when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


def project_out(V: Tensor, W: Tensor, passes: int = 2) -> Tensor:
    """``W -= V (Vᵀ W)``, ``passes`` times (classical Gram-Schmidt, twice is enough), in place.

    Returns the summed coefficients ``Vᵀ W`` (``[n, b]``, in W's dtype).
    """
    if V.shape[1] == 0:
        return W.new_zeros(0, W.shape[1])
    h = V.T @ W
    W -= V @ h
    for _ in range(passes - 1):
        c = V.T @ W
        W -= V @ c
        h += c
    return h


def orthonormalize(
    W: Tensor, V: Tensor, drop_tol: float, max_rank: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-revealing orthonormalisation of a block ``W`` that is already orthogonal to ``V``.

    Returns ``(Q, R, sigma)``: ``Q`` ``[P, r]`` orthonormal and orthogonal to ``V``, ``R``
    ``[r, b]`` float64 on the host with ``‖W − Q R‖ ≤ drop_tol`` (the directions of singular value
    at most ``drop_tol`` are dropped, and at most ``max_rank`` are kept), and the singular values
    ``sigma`` of ``W`` (float64, descending).
    """
    b = W.shape[1]
    G = W.double().T @ W.double()
    s, U = torch.linalg.eigh(G.cpu())
    s, U = s.flip(0), U.flip(1)
    sigma = s.clamp_min(0).sqrt()
    r = min(int((sigma > drop_tol).sum()), max_rank)
    if r == 0:
        return W[:, :0], torch.zeros(0, b, dtype=torch.float64), sigma
    Ur = U[:, :r]
    X = W @ Ur.to(W.device, W.dtype)  # columns nearly orthogonal, norms sigma[:r]
    Q, R1 = torch.linalg.qr(X)
    # dividing by small singular values amplified what was left of V in W: orthogonalise again
    project_out(V, Q)
    Q, R2 = torch.linalg.qr(Q)  # R2 ≈ I
    R = (R2.double().cpu() @ R1.double().cpu()) @ Ur.T
    return Q, R, sigma


def random_block(
    gen: torch.Generator, P: int, d: int, dtype: torch.dtype, device, V: Tensor, Qs: list[Tensor]
) -> Tensor:
    """``d`` (or fewer, when the space is nearly exhausted) random orthonormal vectors orthogonal
    to ``V`` and to the blocks in ``Qs``, drawn column by column on the CPU from ``gen``."""
    room = P - V.shape[1] - sum(q.shape[1] for q in Qs)
    d = min(d, room)
    if d <= 0:
        return V.new_zeros(P, 0)
    gdtype = torch.float64 if dtype == torch.float64 else torch.float32
    Z = torch.empty(P, d, dtype=dtype, device=device)
    for j in range(d):
        Z[:, j] = torch.randn(P, generator=gen, dtype=gdtype).to(device, dtype)
    basis = torch.cat([V, *Qs], dim=1) if Qs else V
    project_out(basis, Z)
    eps = torch.finfo(dtype).eps
    Q, _, _ = orthonormalize(Z, basis, drop_tol=math.sqrt(eps) * math.sqrt(P), max_rank=d)
    return Q


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
    need = basis_bytes(P, C, b, dtype)
    free = free_bytes(device)
    if free is not None and need > free:
        gib = 2**30
        hint = (
            "pass basis_device='cpu' to keep the basis in host memory, "
            if torch.device(device).type != "cpu"
            else ""
        )
        raise MemoryError(
            f"eigsh needs {need:,} bytes ({need / gib:.2f} GiB) for its Lanczos basis of {C} "
            f"vectors of length {P:,} in {dtype} on {device} (plus working blocks), but only "
            f"{free:,} bytes ({free / gib:.2f} GiB) are free. Use a smaller ncv or block_size "
            f"(the basis holds ncv + block_size vectors; max_iter does not change it), {hint}"
            "or basis_dtype=torch.float32."
        )
    return need


def _compress(V: Tensor, e: int, Zk: Tensor) -> None:
    """``V[:, :p] = V[:, :e] @ Zk`` in place, row chunk by row chunk (no second basis)."""
    P, p = V.shape[0], Zk.shape[1]
    Zk = torch.where(Zk.abs() < _TINY, 0.0, Zk).to(V.device, V.dtype)
    rows = max(1, _CHUNK_BYTES // max(1, (e + p) * V.element_size()))
    for r0 in range(0, P, rows):
        V[r0 : r0 + rows, :p] = V[r0 : r0 + rows, :e] @ Zk


# ----------------------------------------------------------------------------------------------
# eigsh


#: multiple of ``eps(operator dtype) · ‖H‖`` below which a true residual is product rounding noise
_NOISE = 1e3


def _rayleigh_ritz(Y: Tensor, HY: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Rayleigh-Ritz on ``span(Y)`` in float64 from one product ``HY``: refined eigenvalues
    (float64, CPU, ascending), the rotated vectors (``Y``'s dtype) and true residual norms."""
    Yd, HYd = Y.double(), HY.double()
    G = Yd.T @ Yd
    M = Yd.T @ HYd
    M = (M + M.T) / 2
    L = torch.linalg.cholesky(G)
    Linv = torch.linalg.solve_triangular(
        L, torch.eye(L.shape[0], dtype=L.dtype, device=L.device), upper=False
    )
    w, U = torch.linalg.eigh(Linv @ M @ Linv.T)
    C = Linv.T @ U
    Yr, HYr = Yd @ C, HYd @ C
    residuals = (HYr - Yr * w).norm(dim=0).cpu()
    return w.cpu(), Yr.to(Y.dtype), residuals


def eigsh(
    op,
    k: int = 10,
    which: str = "LA",
    block_size: int | None = None,
    tol: float = 1e-6,
    max_iter: int | None = None,
    seed: int = 0,
    *,
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
        block_size: vectors per Lanczos step, i.e. columns per ``matmat`` call; default
            ``min(k, 8)``. Use at least the multiplicity of the eigenvalues you need.
        tol: a pair has converged when ``‖H y − θ y‖ ≤ tol · max(|θ|, eps^(2/3)·‖H‖)``.
        max_iter: at most this many Lanczos steps (``matmat`` calls), so at most
            ``max_iter · block_size`` products (plus ``k`` for ``verify``, 2 or 4 for
            ``check_symmetric``); default ``max(1000, ceil(k / block_size))``. When it runs out,
            the current Ritz pairs come back with a ``RuntimeWarning`` (``warn=False`` silences
            it) and ``info.converged`` false.
        seed: seeds the random start block (a CPU ``torch.Generator``): the same seed gives the
            same numbers.
        ncv: largest basis size before a thick restart (default ``2k + max(20, 4b)``, at least
            ``k + b + 1``, capped at P); the basis holds ``ncv + b`` vectors. Raise it for ends
            inside a dense part of the spectrum, lower it when memory is short.
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
    b = min(k, 8) if block_size is None else int(block_size)
    if b < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    b = min(b, P)
    if not tol >= 0:
        raise ValueError(f"tol must be non-negative, got {tol!r}")
    if max_iter is None:
        max_iter = max(1000, -(-k // b))
    if max_iter < -(-k // b):
        raise ValueError(
            f"max_iter={max_iter} steps of block size {b} cannot build {k} Ritz vectors: "
            f"use max_iter >= {-(-k // b)} or a larger block_size"
        )
    m = 2 * k + max(20, 4 * b) if ncv is None else int(ncv)
    if m < k + b + 1 and m < P:
        raise ValueError(f"ncv must be at least k + block_size + 1 = {k + b + 1}, got {ncv}")
    C = min(m + b, P)  # basis capacity: ncv vectors plus the next block

    op_dtype = op.dtype
    bdtype = basis_dtype or (
        op_dtype if op_dtype in (torch.float32, torch.float64) else torch.float32
    )
    bdevice = torch.device(basis_device) if basis_device is not None else torch.device(op.device)
    nbytes = _check_memory(P, C, b, bdtype, bdevice)
    counter = ProductCounter(op, bdtype, bdevice)
    run_symmetry_check(op, counter, seed, check_symmetric)

    eps = torch.finfo(bdtype).eps
    drop_rel = 200 * eps
    floor_rel = eps ** (2 / 3)
    gen = torch.Generator().manual_seed(int(seed))
    V = torch.zeros(P, C, dtype=bdtype, device=bdevice)
    T = torch.zeros(C, C, dtype=torch.float64)

    # start block
    start = V.new_zeros(P, 0)
    if v0 is not None:
        v0 = v0.reshape(P, -1) if v0.dim() == 1 else v0
        if v0.dim() != 2 or v0.shape[0] != P or v0.shape[1] > b:
            raise ValueError(
                f"v0 must be [P] or [P, j] with j <= block_size={b}, got {list(v0.shape)}"
            )
        X = v0.to(bdevice, bdtype).clone()
        if not bool(torch.isfinite(X).all()):
            raise ValueError("v0 contains NaN or Inf")
        scale = float(X.double().norm(dim=0).max()) if X.numel() else 0.0
        start, _, _ = orthonormalize(X, V[:, :0], drop_tol=1e-8 * scale, max_rank=b)
    if start.shape[1] < b:
        extra = random_block(gen, P, b - start.shape[1], bdtype, bdevice, V[:, :0], [start])
        start = torch.cat([start, extra], dim=1)
    V[:, : start.shape[1]] = start
    s, e = 0, start.shape[1]

    anorm = 0.0
    restarts = deflations = 0
    confirm = None  # wanted Ritz values awaiting confirmation after a breakdown
    converged = False
    theta = Z = res = R = None
    steps = 0
    while steps < max_iter:
        W = counter.apply(V[:, s:e])
        steps += 1
        anorm = max(anorm, float(W.double().norm(dim=0).max()))
        h = project_out(V[:, :e], W).double().cpu()
        T[:e, s:e] = h
        T[s:e, :e] = h.T
        T[s:e, s:e] = (h[s:e] + h[s:e].T) / 2

        room = C - e
        Q, R, sigma = orthonormalize(W, V[:, :e], drop_tol=drop_rel * anorm, max_rank=min(b, room))
        want_cols = min(b, room)
        broke = Q.shape[1] < want_cols
        if broke:
            deflations += min(int((sigma <= drop_rel * anorm).sum()), want_cols - Q.shape[1])
            fresh = random_block(gen, P, want_cols - Q.shape[1], bdtype, bdevice, V[:, :e], [Q])
            Q = torch.cat([Q, fresh], dim=1)
            R = torch.cat([R, torch.zeros(fresh.shape[1], R.shape[1], dtype=torch.float64)])
        bq = Q.shape[1]
        V[:, e : e + bq] = Q

        theta, Z = torch.linalg.eigh(T[:e, :e])
        anorm = max(anorm, float(theta.abs().max()))
        res = (R @ Z[s:e, :]).norm(dim=0) if bq else torch.zeros(e, dtype=torch.float64)
        if e >= k:
            wanted = order_by_which(theta, which)[:k]
            thresh = tol * torch.clamp(theta[wanted].abs(), min=floor_rel * anorm)
            if bool((res[wanted] <= thresh).all()):
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
            p = min(k + int((m - b - k) * _KEEP), C - 2 * b)
            keep = order_by_which(theta, which)[:p]
            _compress(V, e, Z[:, keep])
            V[:, p : p + bq] = Q  # Q is its own tensor: no overlap with the old columns
            S = R @ Z[s:e, keep]  # [bq, p]: coupling of the Ritz vectors to the next block
            # couplings of converged pairs shrink geometrically from restart to restart; flush
            # them before they turn subnormal (subnormals make every later GEMM crawl on CPUs)
            S[S.abs() < _TINY * anorm] = 0.0
            T.zero_()
            T[:p, :p] = torch.diag(theta[keep])
            T[p : p + bq, :p] = S
            T[:p, p : p + bq] = S.T
            s, e = p, p + bq
            restarts += 1
            # the basis now starts with the kept Ritz vectors: their pairs in basis coordinates
            theta, Z, res = theta[keep], torch.eye(p, dtype=torch.float64), res[keep]
        else:
            s, e = e, e + bq

    wanted = order_by_which(theta, which)[:k]
    wanted = wanted[torch.argsort(theta[wanted], stable=True)]
    evals = theta[wanted].clone()
    n = Z.shape[0]
    Y = V[:, :n] @ Z[:, wanted].to(bdevice, bdtype)
    residuals = res[wanted].clone()
    thresh = tol * torch.clamp(evals.abs(), min=floor_rel * anorm)
    mask = residuals <= thresh
    if verify is None:
        verify = bdtype != torch.float64
    if verify:
        evals, Y, residuals = _rayleigh_ritz(Y, counter.apply(Y))
        # a true residual cannot fall below the rounding noise of the products themselves
        # (float32: ~1e-4·‖H‖ over a million entries); the eigenvalues, accurate to about
        # residual² / gap, are then still far more accurate than tol
        noise = _NOISE * torch.finfo(op_dtype).eps * anorm
        thresh = torch.clamp(tol * torch.clamp(evals.abs(), min=floor_rel * anorm), min=noise)
        mask = residuals <= thresh
    converged = bool(mask.all())
    if not converged and warn:
        warnings.warn(
            f"eigsh: {int((~mask).sum())} of {k} eigenpairs did not reach tol={tol:g} in "
            f"max_iter={max_iter} steps ({counter.products} products); largest residual "
            f"{float(residuals.max()):.3g}. Raise max_iter or ncv, or loosen tol.",
            RuntimeWarning,
            stacklevel=2,
        )
    evecs = Y.to(op.device, op_dtype)
    if not return_info:
        return evals, evecs
    info = EigshInfo(
        products=counter.products,
        iterations=steps,
        restarts=restarts,
        residuals=residuals,
        converged_mask=mask,
        converged=converged,
        verified=verify,
        seconds_in_products=counter.seconds,
        seconds_total=time.perf_counter() - t_start,
        block_size=b,
        ncv=min(m, P),
        basis_bytes=nbytes,
        deflations=deflations,
    )
    return evals, evecs, info


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
