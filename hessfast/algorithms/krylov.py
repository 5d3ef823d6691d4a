"""The Krylov layer every spectral algorithm of hessfast stands on.

:func:`~hessfast.algorithms.lanczos.eigsh`, :func:`~hessfast.algorithms.lanczos.condition_number`,
:func:`~hessfast.algorithms.slq.spectral_density`, :func:`~hessfast.algorithms.trace.trace`,
:func:`~hessfast.algorithms.layerwise.layerwise`, :func:`~hessfast.algorithms.newton.newton_step`
and the monitor see an operator only through this module:

- :class:`Products`, the one product wrapper: it counts products (columns) and ``matmat`` calls,
  times them (CUDA-synchronised), moves blocks between the basis dtype/device and the operator's,
  splits wide blocks into column chunks (``max_columns``; halved automatically on CUDA
  out-of-memory), packs column *jobs* on parameter subsets into shared calls, checks every
  result's shape and finiteness, and keeps the measured cost of each block width
  (:meth:`Products.cost_curve`);
- :func:`project_out`, the block orthogonalisation: classical Gram-Schmidt over the whole basis as
  two GEMMs (``h = Vᵀ W``, ``W −= V h``), a second pass only for the columns where the first lost
  more than ``1 − 1/√2`` of their norm (Daniel, Gragg, Kaufman and Stewart's criterion), batched
  over independent recurrences by broadcasting, in the basis dtype (no float64 copy of the basis);
- :func:`orthonormalize`, the rank-revealing orthonormalisation of a new block (the eigenvalues of
  its ``b × b`` Gram matrix in float64, then a Cholesky-QR pass): directions below a drop tolerance
  are *breakdowns* and are replaced by :func:`random_block` vectors orthogonal to the basis;
- :class:`BlockTridiagonal`, the projected matrix of a (block) Lanczos recurrence in float64, its
  Ritz values and residual norms;
- :func:`check_memory` / :func:`allocate`, the memory check of a basis against the free memory of
  its device, and the operator checks (:func:`check_operator`, :func:`as_operator`) and the
  symmetry probe (:func:`run_symmetry_check`).

Bases are stored as rows: ``Vt`` is ``[n, P]`` (each Krylov vector contiguous) so that any range of
basis vectors is one contiguous slab and every basis GEMM reads it once.

>>> import torch
>>> Vt = torch.linalg.qr(torch.randn(50, 5, dtype=torch.float64))[0].T.contiguous()
>>> W = torch.randn(50, 2, dtype=torch.float64)
>>> h = project_out(Vt, W)
>>> float((Vt @ W).abs().max()) < 1e-14, tuple(h.shape)
(True, (5, 2))
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import NonFiniteError

Tensor = torch.Tensor
Rows = slice | Tensor

#: DGKS: a column is projected again when one pass kept less than this share of its norm
DGKS = 1 / math.sqrt(2)
#: size of the temporaries of chunked in-place basis updates: small enough to stay in cache and to
#: be reused by the allocator (a fresh temporary of tens of MB costs its page faults, ~1 GB/s)
CHUNK_BYTES = 2 * 2**20


class Operator(Protocol):
    """What the algorithms need of a curvature operator: a symmetric ``(P, P)`` ``shape``,
    ``dtype``, ``device`` and ``matmat(V [P, K]) -> [P, K]`` (e.g. :class:`~hessfast.HessianOperator`,
    :class:`~hessfast.DenseOperator`). A dense symmetric tensor is accepted too."""

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def matmat(self, V: Tensor) -> Tensor: ...


# ----------------------------------------------------------------------------------------------
# operator and argument checks


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


def as_operator(H: Operator | Tensor) -> Operator:
    """``H`` itself when it is an operator (``shape``, ``dtype``, ``device``, ``matmat``); a dense
    tensor is wrapped in a :class:`~hessfast.DenseOperator`. Raises ``ValueError`` unless square."""
    from ..operators import DenseOperator

    if isinstance(H, torch.Tensor):
        H = DenseOperator(H)
    shape = getattr(H, "shape", None)
    if shape is None or not callable(getattr(H, "matmat", None)):
        raise TypeError(
            "expected an operator with shape, dtype, device and matmat(V) (e.g. "
            f"hessfast.HessianOperator or hessfast.DenseOperator), got {type(H).__name__}"
        )
    shape = tuple(shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise ValueError(f"the operator must be square (P, P), got shape {shape}")
    if shape[0] < 1:
        raise ValueError("the operator is empty (P = 0)")
    return H


def check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def work_dtype(op_dtype: torch.dtype, basis_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of the Lanczos bases and recurrences: float32 or float64."""
    if basis_dtype is not None:
        if basis_dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"basis_dtype must be torch.float32 or torch.float64, got {basis_dtype}"
            )
        return basis_dtype
    return op_dtype if op_dtype in (torch.float32, torch.float64) else torch.float32


def default_tol(work: torch.dtype, op_dtype: torch.dtype) -> float:
    """Relative breakdown/deflation threshold of the fixed-step recurrences: ``√eps`` of the
    coarser of the two dtypes (1.5e-8 in float64, 3.5e-4 in float32). Dropping a coupling ``β``
    changes Gauss quadrature moments and well separated Ritz values by ``O(β²)`` only."""
    eps = torch.finfo(work).eps
    if op_dtype.is_floating_point:
        eps = max(eps, torch.finfo(op_dtype).eps)
    return float(eps) ** 0.5


def rademacher(n: int, generator: torch.Generator) -> Tensor:
    """A float64 CPU vector of ±1 entries."""
    return torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8).double() * 2 - 1


def unwrap(op):
    """The operator inside any :class:`Products` wrappers (a wrapped hessfast operator is still
    probed and measured as one)."""
    while isinstance(op, Products):
        op = op.op
    return op


def run_symmetry_check(op, products: Products, seed: int = 0, check: bool | None = True) -> None:
    """``op.check_symmetric()`` where the operator's class defines its own; otherwise the probe of
    :meth:`hessfast.operators.CurvatureOperator.check_symmetric` through ``products``.

    ``check=None`` is the algorithms' default: one probe pair (a single two-column product) for
    hessfast's model operators (Hessian, GGN, and sums and products of them), whose symmetry a
    model can break (a constant hessfast cannot see, a loss that is not twice differentiable),
    and for operators not known to be symmetric (``op.symmetric is False``: a product ``A @ B``);
    nothing for other operators. ``True``: two probe pairs on any operator; ``False``: nothing."""
    from ..operators import CurvatureOperator, is_model_operator

    op = unwrap(op)
    probe_by_default = (
        is_model_operator(op)
        or bool(getattr(op, "model_operators", None))  # a sum or product of model operators
        or getattr(op, "symmetric", True) is False
    )
    if check is False or (check is None and not probe_by_default):
        return
    probes = 1 if check is None else 2
    own = getattr(type(op), "check_symmetric", None)
    try:
        if own is not None and own is not CurvatureOperator.check_symmetric:
            op.check_symmetric(num_probes=probes)
        else:
            CurvatureOperator.check_symmetric(products, num_probes=probes, seed=seed)
    except ValueError:
        products.symmetry = "failed"
        raise
    products.symmetry = "passed"


# ----------------------------------------------------------------------------------------------
# memory


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


def fmt_bytes(n: int) -> str:
    return f"{n:,} bytes ({n / 2**30:.2f} GiB)"


def check_memory(nbytes: int, device, what: str, hint: str) -> int:
    """Raise ``MemoryError`` when ``nbytes`` cannot fit in the free memory of ``device``; the
    message says how many bytes ``what`` needs and ``hint`` what to change. Returns ``nbytes``."""
    free = free_bytes(device)
    if free is not None and nbytes > free:
        raise MemoryError(
            f"{what} needs {fmt_bytes(nbytes)} on {device}, but only {fmt_bytes(free)} are free; "
            f"{hint}"
        )
    return nbytes


def nbytes_of(shape: Sequence[int], dtype: torch.dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()


def allocate(shape: tuple[int, ...], dtype: torch.dtype, device, what: str, hint: str) -> Tensor:
    """``torch.zeros(shape)`` after :func:`check_memory`; an allocator failure is a
    ``MemoryError`` with the same message."""
    n = check_memory(nbytes_of(shape, dtype), device, what, hint)
    try:
        return torch.zeros(shape, dtype=dtype, device=device)
    except RuntimeError as e:  # torch.OutOfMemoryError and the CPU allocator's error
        raise MemoryError(
            f"{what} needs {fmt_bytes(n)} on {device}, which failed ({e}); {hint}"
        ) from e


# ----------------------------------------------------------------------------------------------
# products


def _is_all(rows: Rows) -> bool:
    return isinstance(rows, slice) and rows == slice(None)


class Products:
    """The operator as the algorithms see it: counted, timed, checked, column-batched.

    ``Products(op, max_columns=None, dtype=None, device=None)``: ``dtype``/``device`` are those of
    the algorithm's basis (default: the operator's). It is itself an operator (``shape``,
    ``dtype``, ``device``, ``matmat`` in the operator's dtype and device).

    - ``apply(B)``: ``H @ B`` for a basis block, returned in the basis dtype and device;
    - ``matmat(X)``: ``H @ X`` in the operator's dtype and device;
    - ``products(jobs, dtype, device)`` (``__call__``): column *jobs* ``(rows, block)``, each an
      ``[n, c]`` block placed on ``rows`` (a slice or index tensor) and zero elsewhere; the result
      of a job is ``(H X)[rows]``, the diagonal block ``H[rows, rows] @ block``. All jobs of one
      call share ``matmat`` calls of at most ``max_columns`` columns (``None``: all at once,
      halved automatically on CUDA out-of-memory).

    Counters: ``products`` (columns), ``calls``, ``seconds`` (inside ``matmat``), ``timings``
    (``(K, seconds)`` per call) and ``symmetry`` (``None``, ``"passed"``, ``"failed"``);
    ``on_call(products)``, if given, runs after every call (a progress bar's product count).
    Wrapping an operator in ``Products`` to count what an algorithm spends changes nothing else:
    the algorithms probe and measure the operator inside.

    >>> import torch, hessfast
    >>> pr = Products(hessfast.DenseOperator(torch.eye(4)), max_columns=3)
    >>> pr.apply(torch.ones(4, 5)).shape, pr.products, pr.calls
    (torch.Size([4, 5]), 5, 2)
    """

    def __init__(
        self,
        op: Operator,
        max_columns: int | None = None,
        dtype: torch.dtype | None = None,
        device: Any = None,
        on_call: Any = None,
    ):
        self.P = check_operator(op)
        self.on_call = on_call
        self.op = op
        self.shape = (self.P, self.P)
        self.dtype = op.dtype
        self.device = torch.device(op.device)
        self.basis_dtype = dtype or op.dtype
        self.basis_device = torch.device(device) if device is not None else self.device
        self.limit = None if max_columns is None else check_positive_int("max_columns", max_columns)
        self.auto = max_columns is None
        self.products = 0
        self.calls = 0
        self.seconds = 0.0
        self.timings: list[tuple[int, float]] = []
        self.symmetry: str | None = None
        self.col_norms: Tensor | None = None  # of the last call's result
        self._sync = self.device.type == "cuda"
        cls = type(op)
        self._with_norms = (
            getattr(cls, "_matmat_is_norms", None) is not None
            and cls.matmat is cls._matmat_is_norms
            and "matmat" not in getattr(op, "__dict__", {})
        )

    def __getattr__(self, name: str):
        # anything else (``groups`` for layerwise, ``kind``, ...) is the wrapped operator's
        if name == "op":
            raise AttributeError(name)
        return getattr(self.op, name)

    # one call of the operator
    def _matmat(self, X: Tensor) -> Tensor:
        if self._sync:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        if self._with_norms:  # a hessfast model operator: the norms are its own check
            Y, norms = self.op.matmat_norms(X)
        else:
            Y, norms = self.op.matmat(X), None
        if self._sync:
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        K = int(X.shape[1])
        self.seconds += dt
        self.timings.append((K, dt))
        self.calls += 1
        self.products += K
        if self.on_call is not None:
            self.on_call(self)
        if not isinstance(Y, torch.Tensor) or tuple(Y.shape) != tuple(X.shape):
            got = tuple(Y.shape) if isinstance(Y, torch.Tensor) else type(Y).__name__
            raise ValueError(
                f"the operator's matmat returned {got} for an input of shape {tuple(X.shape)}"
            )
        if norms is not None:  # checked by the operator itself
            self.col_norms = norms
            return Y
        # the column norms are what the algorithms need anyway; finite norms mean finite entries
        # (an infinite norm of finite entries, an overflow, is told apart by the full check)
        self.col_norms = torch.linalg.vector_norm(Y, dim=0)
        if not bool(torch.isfinite(self.col_norms).all()) and not bool(torch.isfinite(Y).all()):
            raise NonFiniteError(
                f"an operator product (matmat call {self.calls}, {K} columns) contains NaN or "
                "Inf: the operator is not finite on these vectors; check the model, the data, "
                "the loss scale and the dtype"
            )
        return Y

    def __call__(
        self, jobs: Sequence[tuple[Rows, Tensor]], dtype: torch.dtype, device: Any
    ) -> list[Tensor]:
        P = self.P
        device = torch.device(device)
        widths = [int(blk.shape[1]) for _, blk in jobs]
        starts = np.cumsum([0] + widths)
        K = int(starts[-1])
        one = len(jobs) == 1 and _is_all(jobs[0][0])
        outs: list[Tensor | None] = [None] * len(jobs)
        a = 0
        while a < K:
            width = K - a if self.limit is None else min(self.limit, K - a)
            b = a + width
            if one and width == K:  # one full-length job in one call: no copies
                X = jobs[0][1].to(self.device, self.dtype)
                pieces = [(0, jobs[0][0], 0, K, 0, K)]
            else:
                pieces = []
                for i, (rows, _blk) in enumerate(jobs):
                    lo, hi = max(a, int(starts[i])), min(b, int(starts[i + 1]))
                    if lo < hi:
                        pieces.append(
                            (i, rows, lo - int(starts[i]), hi - int(starts[i]), lo - a, hi - a)
                        )
                X = torch.zeros(P, width, dtype=self.dtype, device=self.device)
                for i, rows, jl, jh, xl, xh in pieces:
                    X[rows, xl:xh] = jobs[i][1][:, jl:jh].to(self.device, self.dtype)
            try:
                Y = self._matmat(X)
            except torch.OutOfMemoryError:
                if not self.auto or width == 1:
                    raise
                del X
                torch.cuda.empty_cache()
                self.limit = max(1, width // 2)
                continue
            if one and width == K:
                return [Y.to(device, dtype)]
            for i, rows, jl, jh, xl, xh in pieces:
                if outs[i] is None:
                    blk = jobs[i][1]
                    outs[i] = torch.empty(blk.shape[0], blk.shape[1], dtype=dtype, device=device)
                outs[i][:, jl:jh] = Y[rows, xl:xh].to(device, dtype)
            a = b
        return [
            o if o is not None else torch.empty(blk.shape[0], 0, dtype=dtype, device=device)
            for o, (_, blk) in zip(outs, jobs)
        ]

    def matmat(self, X: Tensor) -> Tensor:
        """``H @ X`` in the operator's dtype and device (split into column chunks)."""
        return self([(slice(None), X)], self.dtype, self.device)[0]

    def apply(self, B: Tensor) -> Tensor:
        """``H @ B`` for a basis block, in the basis dtype and device."""
        return self([(slice(None), B)], self.basis_dtype, self.basis_device)[0]

    def cost_curve(self, skip: int = 0) -> dict[int, float]:
        """Seconds per call of each block width seen (the fastest of the calls after the first
        ``skip`` calls of that width)."""
        seen: dict[int, int] = {}
        out: dict[int, float] = {}
        for K, dt in self.timings:
            seen[K] = seen.get(K, 0) + 1
            if seen[K] > skip:
                out[K] = min(out.get(K, math.inf), dt)
        return out


# ----------------------------------------------------------------------------------------------
# orthogonalisation


def project_out(Vt: Tensor, W: Tensor, max_passes: int = 3, eta: float = DGKS) -> Tensor:
    """``W −= V (Vᵀ W)`` in place, with ``V = Vtᵀ`` (``Vt`` ``[..., n, P]`` orthonormal rows,
    ``W`` ``[..., P, b]``; leading dimensions broadcast: independent recurrences at once).

    Classical Gram-Schmidt as two GEMMs over the basis; a further pass (at most ``max_passes``)
    only while some column kept less than ``eta`` of its norm in the last pass (DGKS: after heavy
    cancellation one pass leaves the remainder far from orthogonal; otherwise it is orthogonal to
    working precision). Returns the summed coefficients ``Vᵀ W`` (``[..., n, b]``, W's dtype).
    """
    if Vt.shape[-2] == 0:
        return W.new_zeros(*W.shape[:-2], 0, W.shape[-1])
    before = torch.linalg.vector_norm(W, dim=-2)
    h = Vt @ W
    subtract(W, Vt.mT, h)
    for _ in range(max_passes - 1):
        after = torch.linalg.vector_norm(W, dim=-2)
        if not bool((after < eta * before).any()):
            break
        c = Vt @ W
        subtract(W, Vt.mT, c)
        h += c
        before = after
    return h


def subtract(W: Tensor, A: Tensor, B: Tensor) -> None:
    """``W −= A @ B`` in place by one (batched) GEMM into ``W``'s own layout, no temporary."""
    if W.dim() == 2:
        W.addmm_(A, B, alpha=-1)
    elif W.shape[:-2] == A.shape[:-2] == B.shape[:-2] and W.dim() == 3:
        W.baddbmm_(A, B, alpha=-1)
    else:
        W -= A @ B


def orthonormalize(
    W: Tensor,
    Vt: Tensor | None,
    drop_tol: float,
    max_rank: int | None = None,
    wnorm: float | None = None,
    out: Tensor | None = None,
    norm: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-revealing orthonormalisation of a block ``W`` ``[P, b]`` already orthogonal to the
    rows of ``Vt`` (or ``None``).

    The eigenvalues of the float64 ``b × b`` Gram matrix give the singular values ``sigma`` of
    ``W``; directions with ``sigma ≤ drop_tol`` are dropped (at most ``max_rank`` kept), the rest
    are rotated onto orthogonal columns and normalised (one GEMM), and a Cholesky-QR pass restores
    orthogonality to working precision where the kept singular values are spread (its error is
    ``eps · cond²``). When a kept singular value is below ``√eps · wnorm`` (``wnorm``: the norm of
    the block before it was orthogonalised; default ``sigma[0]``), dividing by it magnifies what
    rounding left of the basis in ``W``, so the result is projected against ``Vt`` once more.

    The result is written as rows (``Qt`` ``[r, P]``, into ``out[:r]`` when given: a basis slab).
    Returns ``(Q, R, sigma)``: ``Q = Qtᵀ`` ``[P, r]`` orthonormal (and orthogonal to ``Vt``),
    ``R`` ``[r, b]`` float64 on the host with ``W ≈ Q R``, and ``sigma`` (float64, descending).
    ``norm``: for a single column, its norm ``‖W‖`` (``[1]``, in ``W``'s dtype) when the caller
    has it already (a pass over ``W`` saved).
    """
    b = W.shape[1]
    if max_rank is None:
        max_rank = b
    eps = torch.finfo(W.dtype).eps
    if b == 1 and norm is not None:
        sigma = norm.reshape(1).double().cpu()
    else:
        G = (W.mT @ W).double().cpu()
        s, U = torch.linalg.eigh((G + G.T) / 2)
        s, U = s.flip(0), U.flip(1)
        sigma = s.clamp_min(0).sqrt()
    r = min(int((sigma > drop_tol).sum()), max_rank)
    if r == 0:
        return W[:, :0], torch.zeros(0, b, dtype=torch.float64), sigma
    scale = float(sigma[0]) if wnorm is None else max(float(wnorm), float(sigma[0]))
    if b == 1:
        U = torch.ones(1, 1, dtype=torch.float64)
    Ur = U[:, :r]
    Mt = (Ur / sigma[:r]).T.contiguous().to(W.device, W.dtype)
    Qt = out[:r] if out is not None else torch.empty(r, W.shape[0], dtype=W.dtype, device=W.device)
    if b == 1:  # a single vector: divide by its norm in its own dtype (exact for P = 1)
        torch.div(W.mT, torch.linalg.vector_norm(W) if norm is None else norm, out=Qt)
    else:
        torch.matmul(Mt, W.mT, out=Qt)  # rows of (W Ur diag(1/σ))ᵀ: near orthonormal
    R = (Ur * sigma[:r]).T  # W ≈ Q R
    again = float(sigma[0]) > 2 * float(sigma[r - 1])
    if Vt is not None and Vt.shape[0] and float(sigma[r - 1]) < math.sqrt(eps) * scale:
        project_out(Vt, Qt.mT, max_passes=2)
        again = True
    if again:
        R = cholesky_qr(Qt) @ R
    return Qt.mT, R, sigma


def cholesky_qr(Qt: Tensor, G: Tensor | None = None) -> Tensor:
    """One Cholesky-QR pass over the rows ``Qt`` ``[r, P]``, in place: ``Qt ← L⁻¹ Qt`` with
    ``L Lᵀ = Qt Qtᵀ`` (``G``: that float64 host Gram, if the caller has it). Returns the float64
    upper factor ``U`` (host) with ``Qt`` before ``= Uᵀ Qt`` after: ``Lᵀ``, or, where the Gram
    is not positive definite (rank lost), ``R`` of the Householder QR that replaces the pass.

    >>> Qt = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=torch.float64)
    >>> U = cholesky_qr(Qt)
    >>> torch.allclose(Qt @ Qt.T, torch.eye(2, dtype=torch.float64)), U.shape
    (True, torch.Size([2, 2]))
    """
    r = Qt.shape[0]
    if G is None:
        G = (Qt @ Qt.mT).double().cpu()
    L, info = torch.linalg.cholesky_ex((G + G.T) / 2)
    if int(info) != 0:
        Q, R2 = torch.linalg.qr(Qt.mT)
        Qt.copy_(Q.mT)
        return R2.double().cpu()
    Linv = torch.linalg.solve_triangular(L, torch.eye(r, dtype=torch.float64), upper=False)
    left_multiply(Qt, Linv.to(Qt.device, Qt.dtype))
    return L.T


def left_multiply(Xt: Tensor, M: Tensor) -> None:
    """``Xt[:m] = M @ Xt`` in place for rows ``Xt`` ``[r, P]`` and ``M`` ``[m, r]`` (``m ≤ r``),
    column chunk by column chunk: no temporary the size of ``Xt``.

    >>> Xt = torch.arange(6.0).reshape(2, 3)
    >>> left_multiply(Xt, torch.tensor([[1.0, 1.0]]))
    >>> Xt.tolist()
    [[3.0, 5.0, 7.0], [3.0, 4.0, 5.0]]
    """
    m, r = M.shape
    cols = max(1, CHUNK_BYTES // max(1, (r + m) * Xt.element_size()))
    for c0 in range(0, Xt.shape[1], cols):
        Xt[:m, c0 : c0 + cols] = M @ Xt[:, c0 : c0 + cols]


def random_block(
    gen: torch.Generator,
    P: int,
    d: int,
    dtype: torch.dtype,
    device: Any,
    Vt: Tensor | None,
    Q: Tensor | None = None,
) -> Tensor:
    """``d`` (or fewer, when the space is nearly exhausted) random orthonormal vectors ``[P, d]``
    orthogonal to the rows of ``Vt`` and the columns of ``Q``, drawn on the CPU from ``gen`` (the
    same numbers on any device)."""
    n = (0 if Vt is None else Vt.shape[0]) + (0 if Q is None else Q.shape[1])
    d = min(d, P - n)
    if d <= 0:
        return torch.zeros(P, 0, dtype=dtype, device=device)
    gdtype = torch.float64 if dtype == torch.float64 else torch.float32
    Z = torch.randn(d, P, generator=gen, dtype=gdtype).to(device, dtype).T.contiguous()
    parts = [x for x in (Vt, None if Q is None else Q.mT) if x is not None and x.shape[0]]
    basis = torch.cat(parts) if len(parts) > 1 else (parts[0] if parts else None)
    if basis is not None:
        project_out(basis, Z, max_passes=2)
    eps = torch.finfo(dtype).eps
    Qz, _, _ = orthonormalize(Z, basis, drop_tol=math.sqrt(eps) * math.sqrt(P), max_rank=d)
    if basis is not None and Qz.shape[1]:
        project_out(basis, Qz, max_passes=2)
        Qz, _, _ = orthonormalize(Qz, basis, drop_tol=0.5, max_rank=d)
    return Qz


# ----------------------------------------------------------------------------------------------
# the projected problem


def eigh(T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.linalg.eigh`` of a small float64 matrix through torch, on torch's CPU threads: NumPy's
    LAPACK uses its own thread pool, which on a shared machine made an 80 × 80 tridiagonal take
    170 ms (measured)."""
    w, U = torch.linalg.eigh(torch.from_numpy(np.ascontiguousarray(T, dtype=np.float64)))
    return w.numpy(), U.numpy()


@dataclass
class BlockTridiagonal:
    """The projection ``T = Vᵀ H V`` of a block Lanczos recurrence of block size ``b``: the
    diagonal blocks ``A_j`` and the couplings ``B_j`` (``W_j = Q_{j+1} B_j``), float64 NumPy;
    the last ``B`` is the residual coupling (not part of ``T``)."""

    b: int
    alphas: list[np.ndarray] = field(default_factory=list)
    betas: list[np.ndarray] = field(default_factory=list)
    broke_down: bool = False

    @property
    def steps(self) -> int:
        return len(self.alphas)

    def matrix(self) -> np.ndarray:
        """The block tridiagonal ``T`` (float64, ``steps·b`` square)."""
        b, s = self.b, self.steps
        T = np.zeros((s * b, s * b))
        for j in range(s):
            T[j * b : (j + 1) * b, j * b : (j + 1) * b] = self.alphas[j]
            if j + 1 < s:
                B = self.betas[j]
                T[(j + 1) * b : (j + 2) * b, j * b : (j + 1) * b] = B
                T[j * b : (j + 1) * b, (j + 1) * b : (j + 2) * b] = B.T
        return T

    def ritz(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ritz values (ascending), eigenvectors of ``T`` and residual norms ``‖H y − θ y‖``."""
        theta, U = eigh(self.matrix())
        res = np.linalg.norm(self.betas[-1] @ U[-self.b :, :], axis=0)
        return theta, U, res


__all__ = [
    "Operator",
    "Products",
    "BlockTridiagonal",
    "project_out",
    "orthonormalize",
    "random_block",
    "left_multiply",
    "check_operator",
    "as_operator",
    "check_memory",
    "allocate",
    "free_bytes",
    "run_symmetry_check",
]
