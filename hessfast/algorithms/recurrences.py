"""The batched Lanczos recurrences behind the spectral densities and the per-layer spectra.

:func:`lanczos_runs` runs ``len(starts)`` independent (block) Lanczos recurrences *together*, each
restricted to its own set of rows (all of them for :func:`hessfast.algorithms.slq.spectral_density`,
one layer's for :func:`hessfast.algorithms.layerwise.layerwise`): at every step one ``matmat``
whose columns are every live recurrence's current block, then each recurrence's three-term
update with full reorthogonalisation against its own basis, as batched tensor operations, with one
host synchronisation per step. :func:`lanczos_probes` is the single-vector case over all rows
(SLQ's probes), :func:`batched_lanczos` its public form returning the tridiagonal coefficients
(:class:`LanczosTridiagonals`). Products, orthogonalisation, breakdowns and memory checks are those
of the Krylov layer (:mod:`hessfast.algorithms.krylov`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import NonFiniteError
from .krylov import (
    BlockTridiagonal,
    Operator,
    Products,
    allocate,
    as_operator,
    check_memory,
    check_positive_int,
    default_tol,
    eigh,
    nbytes_of,
    project_out,
    random_block,
)
from .krylov import (
    work_dtype as resolve_work_dtype,
)

Tensor = torch.Tensor
Rows = slice | Tensor

Tensor = torch.Tensor
Rows = slice | Tensor

__all__ = [
    "lanczos_runs",
    "lanczos_probes",
    "batched_lanczos",
    "LanczosTridiagonals",
    "check_steps",
]


def lanczos_runs(
    op: Operator,
    rows: Sequence[Rows],
    starts: Sequence[Tensor],
    steps: int,
    *,
    restart: bool,
    tol: float | None,
    work_dtype: torch.dtype,
    offload: bool,
    generator: torch.Generator,
    products: Products,
    extra: Sequence[tuple[Rows, Tensor]] = (),
) -> tuple[list[BlockTridiagonal], list[Tensor]]:
    """Run ``len(starts)`` block Lanczos recurrences, segment ``i`` on the diagonal block
    ``H[rows[i], rows[i]]`` from the ``[n_i, b_i]`` block ``starts[i]``, all of them sharing one
    product per step (plus the ``extra`` column jobs in the first product, whose outputs are
    returned). Full reorthogonalisation (classical Gram-Schmidt, twice) against each segment's own
    basis. On breakdown (a coupling ``≤ tol ×`` the running norm of ``T``) a recurrence stops
    (``restart=False``, single vectors: its quadrature is then exact) or continues from random
    vectors orthogonal to its basis (``restart=True``: the Ritz values stay those of a subspace).
    """
    work_device = torch.device("cpu") if offload else op.device
    if tol is None:
        tol = default_tol(work_dtype, op.dtype)
    m = len(starts)
    sizes = [int(s.shape[0]) for s in starts]
    bs = [int(s.shape[1]) for s in starts]
    caps = [min(steps * b, n) for n, b in zip(sizes, bs)]
    if restart and any(c < steps * b for c, b in zip(caps, bs)):
        raise ValueError("internal: a restarted recurrence needs more rows than steps × block")
    elsize = torch.empty(0, dtype=work_dtype).element_size()
    total = sum(c * n for c, n in zip(caps, sizes)) * elsize
    what = (
        f"the Lanczos bases ({m} recurrence{'s' if m != 1 else ''}, up to {steps} steps, "
        f"{work_dtype})"
    )
    hint = (
        "pass offload=True to keep them in host memory, basis_dtype=torch.float32, or fewer "
        "lanczos_steps / probes"
    )
    check_memory(total, work_device, what, hint)
    bases = [allocate((c, n), work_dtype, work_device, what, hint) for c, n in zip(caps, sizes)]

    runs = [BlockTridiagonal(b) for b in bs]
    Q: list[Tensor | None] = []
    for i, s in enumerate(starts):
        s = s.to(work_device, work_dtype)
        if s.shape[1] == 1:
            nrm = s.norm()
            ok = float(nrm) > 0 and math.isfinite(float(nrm))
            q = s / nrm
        else:
            q, r = torch.linalg.qr(s)
            d = r.diagonal().abs()
            ok = bool(torch.isfinite(r).all()) and float(d.min()) > tol * float(d.max())
        if not ok:
            raise ValueError(f"start block {i} is zero, not finite or linearly dependent")
        bases[i][: bs[i]] = q.T
        Q.append(q)
    Qprev: list[Tensor | None] = [None] * m
    Bprev: list[Tensor | None] = [None] * m
    scale = [0.0] * m
    active = [True] * m
    extra_out: list[Tensor] = []

    for j in range(steps):
        act = [i for i in range(m) if active[i]]
        if not act and j > 0:
            break
        jobs = [(rows[i], Q[i]) for i in act]
        if j == 0:
            jobs += list(extra)
        outs = products(jobs, work_dtype, work_device)
        if j == 0:
            extra_out = outs[len(act) :]
        for i, W in zip(act, outs[: len(act)]):
            b, q = bs[i], Q[i]
            r = (j + 1) * b  # basis vectors stored so far (q included)
            if Qprev[i] is not None:
                W = W - Qprev[i] @ Bprev[i].T
            A = q.T @ W
            A = (A + A.T) / 2
            W = W - q @ A
            Qs = bases[i][:r]
            project_out(Qs, W)
            A64 = A.double().cpu().numpy()
            if b == 1:
                beta = float(W.norm())
                B64 = np.array([[beta]])
                S = np.array([beta])
                qn = W / beta if beta > 0 else torch.zeros_like(W)
            else:
                qn, R = torch.linalg.qr(W)
                U, S, Vh = np.linalg.svd(R.double().cpu().numpy())
                B64 = S[:, None] * Vh
                qn = qn @ torch.as_tensor(U, dtype=work_dtype, device=work_device)
            runs[i].alphas.append(A64)
            runs[i].betas.append(B64)
            if not (np.isfinite(A64).all() and np.isfinite(B64).all()):
                raise NonFiniteError(f"the Lanczos recurrence became non-finite at step {j + 1}")
            scale[i] = max(scale[i], float(np.abs(eigh(A64)[0]).max()), float(S.max()))
            if j == steps - 1:
                active[i] = False
                continue
            deflated = S <= tol * scale[i]
            if not restart:
                if deflated.any() or r + b > caps[i]:
                    runs[i].broke_down = True
                    active[i] = False
                    continue
            else:
                for c in np.nonzero(deflated)[0]:
                    others = [cc for cc in range(b) if cc != c]
                    around = torch.cat([Qs, qn[:, others].T])
                    v = random_block(generator, sizes[i], 1, work_dtype, work_device, around)
                    qn[:, c : c + 1] = v
                    B64[c, :] = 0.0
            bases[i][r : r + b] = qn.T
            Qprev[i], Q[i] = q, qn
            Bprev[i] = torch.as_tensor(B64, dtype=work_dtype, device=work_device)
    return runs, extra_out


def lanczos_probes(
    op: Operator,
    m: int,
    start: Callable[[int], Tensor],
    steps: int,
    *,
    tol: float | None,
    work_dtype: torch.dtype,
    offload: bool,
    products: Products,
) -> list[BlockTridiagonal]:
    """Single-vector Lanczos from ``m`` start vectors ``start(i)`` (``[P]``, any dtype and device;
    written straight into the basis) on the whole operator, vectorised over the probes: per step one product with the probes still running, batched
    three-term recurrences and a batched full reorthogonalisation (``bmm`` against the bases, kept
    as one ``[m, steps, P]`` tensor), and one host sync for all ``α, β``. A probe stops at
    breakdown (``β ≤ tol ×`` its largest ``|α|, β`` so far) or when its basis spans all ``P``
    dimensions; its quadrature is then exact."""
    work_device = torch.device("cpu") if offload else op.device
    if tol is None:
        tol = default_tol(work_dtype, op.dtype)
    P = op.shape[0]
    cap = min(steps, P)
    total = nbytes_of((m, cap, P), work_dtype)
    what = f"the Lanczos bases ({m} probes × {cap} steps × P={P:,}, {work_dtype})"
    hint = (
        "pass offload=True to keep them in host memory, basis_dtype=torch.float32, or fewer "
        "lanczos_steps / num_probes"
    )
    check_memory(total, work_device, what, hint)
    basis = allocate((m, cap, P), work_dtype, work_device, what, hint)
    for i in range(m):
        basis[i, 0] = start(i).to(work_device, work_dtype)
    nrm = basis[:, 0].norm(dim=1)
    bad = ~torch.isfinite(nrm) | (nrm == 0)
    if bool(bad.any()):
        raise ValueError(f"start vector {int(bad.nonzero()[0])} is zero or not finite")
    Q = basis[:, 0] / nrm[:, None]
    basis[:, 0] = Q
    Qprev = torch.zeros_like(Q)
    beta_prev = torch.zeros(m, dtype=work_dtype, device=work_device)
    alive = np.ones(m, dtype=bool)
    scale = np.zeros(m)
    runs = [BlockTridiagonal(1) for _ in range(m)]
    for j in range(steps):
        act = np.nonzero(alive)[0]
        if act.size == 0:
            break
        if act.size == m:
            HX = products([(slice(None), Q.T)], work_dtype, work_device)[0]
            W = HX.T.contiguous()
        else:
            idx = torch.as_tensor(act, device=work_device)
            HX = products([(slice(None), Q[idx].T)], work_dtype, work_device)[0]
            W = torch.zeros_like(Q)
            W[idx] = HX.T
        W = W - beta_prev[:, None] * Qprev
        alpha = (Q * W).sum(1)
        W = W - alpha[:, None] * Q
        project_out(basis[:, : j + 1], W[:, :, None])
        beta = W.norm(dim=1)
        ab = torch.stack([alpha, beta]).double().cpu().numpy()
        if not np.isfinite(ab[:, act]).all():
            raise NonFiniteError(f"the Lanczos recurrence became non-finite at step {j + 1}")
        for i in act:
            a, b = float(ab[0, i]), float(ab[1, i])
            runs[i].alphas.append(np.array([[a]]))
            runs[i].betas.append(np.array([[b]]))
            scale[i] = max(scale[i], abs(a), b)
            if j == steps - 1 or b <= tol * scale[i] or j + 2 > cap:
                runs[i].broke_down = j < steps - 1
                alive[i] = False
        if not alive.any():
            break
        keep = torch.as_tensor(alive, device=work_device)
        beta = torch.where(keep, beta, torch.ones_like(beta))
        Qn = torch.where(keep[:, None], W / beta[:, None], torch.zeros_like(W))
        basis[:, j + 1] = Qn
        Qprev, Q = Q, Qn
        beta_prev = torch.where(keep, beta, torch.zeros_like(beta))
    return runs


@dataclass(eq=False)
class LanczosTridiagonals:
    """The output of :func:`batched_lanczos`: per probe ``i`` the tridiagonal ``T_i`` with diagonal
    ``alpha[i, :num_steps[i]]`` and off-diagonal ``beta[i, :num_steps[i] - 1]``; ``beta[i,
    num_steps[i] - 1]`` is the residual coupling (≈ 0 after a breakdown). Entries past
    ``num_steps[i]`` are zero. All float64 NumPy.

    >>> import torch
    >>> from hessfast.algorithms.recurrences import batched_lanczos
    >>> out = batched_lanczos(torch.diag(torch.tensor([1.0, 3.0], dtype=torch.float64)),
    ...                       torch.ones(2, 1, dtype=torch.float64), 5)
    >>> out.tridiagonal(0).round(12).tolist()  # α = vᵀHv = 2 for v = (1, 1)/√2
    [[2.0, 1.0], [1.0, 2.0]]
    """

    alpha: np.ndarray
    beta: np.ndarray
    num_steps: np.ndarray

    def tridiagonal(self, i: int) -> np.ndarray:
        """``T_i`` as a dense float64 matrix."""
        n = int(self.num_steps[i])
        a, b = self.alpha[i, :n], self.beta[i, : n - 1]
        return np.diag(a) + np.diag(b, 1) + np.diag(b, -1)

    def quadrature(self) -> tuple[np.ndarray, np.ndarray]:
        """Gauss quadrature nodes and weights, each ``[probes, steps]``: per probe the eigenvalues
        of ``T_i`` (ascending) and the squared first components of its eigenvectors (they sum to
        1). A probe that broke down after ``n`` steps is padded with its largest node, weight 0."""
        m, steps = self.alpha.shape
        nodes = np.zeros((m, steps))
        weights = np.zeros((m, steps))
        for i in range(m):
            n = int(self.num_steps[i])
            theta, U = eigh(self.tridiagonal(i))
            nodes[i, :n], weights[i, :n] = theta, U[0] ** 2
            nodes[i, n:] = theta[-1]
        return nodes, weights


def check_steps(steps: Any) -> int:
    return check_positive_int("lanczos_steps", steps)


def batched_lanczos(
    H: Operator | Tensor,
    start: Tensor,
    lanczos_steps: int,
    *,
    basis_dtype: torch.dtype | None = None,
    offload: bool = False,
    max_columns: int | None = None,
    tol: float | None = None,
) -> LanczosTridiagonals:
    """Independent Lanczos recurrences from the columns of ``start`` (``[P, m]``), run together:
    one ``H.matmat`` with (up to) ``m`` columns per step, full reorthogonalisation of each probe
    against its own basis.

    A probe stops at breakdown (its coupling ``β ≤ tol ×`` the largest ``|α|, β`` so far, or its
    basis spans all ``P`` dimensions); its ``T`` then holds the exact spectral measure of its start
    vector. ``tol`` defaults to ``√eps`` of the coarser of the operator and basis dtypes.
    Start columns are normalised. See :func:`spectral_density` for the other options.

    >>> import torch, hessfast
    >>> from hessfast.algorithms.recurrences import batched_lanczos
    >>> A = torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64))
    >>> out = batched_lanczos(hessfast.DenseOperator(A), torch.ones(6, 2, dtype=torch.float64), 10)
    >>> out.num_steps.tolist()  # six distinct eigenvalues: breakdown after six steps
    [6, 6]
    >>> nodes, weights = out.quadrature()
    >>> nodes[0, :6].round(8).tolist()
    [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    """
    op = as_operator(H)
    steps = check_steps(lanczos_steps)
    if not isinstance(start, torch.Tensor) or start.dim() != 2 or start.shape[0] != op.shape[0]:
        shape = list(start.shape) if isinstance(start, torch.Tensor) else type(start).__name__
        raise ValueError(f"start must be a [P, m] tensor with P={op.shape[0]}, got {shape}")
    if start.shape[1] < 1:
        raise ValueError("start has no columns (num_probes must be >= 1)")
    work = resolve_work_dtype(op.dtype, basis_dtype)
    m = start.shape[1]
    runs = lanczos_probes(
        op,
        m,
        lambda i: start[:, i],
        steps,
        tol=tol,
        work_dtype=work,
        offload=offload,
        products=Products(op, max_columns),
    )
    alpha = np.zeros((m, steps))
    beta = np.zeros((m, steps))
    for i, run in enumerate(runs):
        n = run.steps
        alpha[i, :n] = [a[0, 0] for a in run.alphas]
        beta[i, :n] = [b[0, 0] for b in run.betas]
    return LanczosTridiagonals(alpha, beta, np.array([r.steps for r in runs], dtype=np.int64))
