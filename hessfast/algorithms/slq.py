"""Stochastic Lanczos quadrature (SLQ): the spectral density of a curvature operator.

``spectral_density(H)`` runs ``num_probes`` independent Lanczos recurrences *together*: at every
step one ``H.matmat`` with ``num_probes`` columns (one K-batched product of the model), then each
probe's three-term recurrence with full reorthogonalisation against its own Krylov basis. Probe
``i`` yields a tridiagonal ``T_i`` (float64); its eigenvalues ``θ`` (nodes) and the squared first
components of its eigenvectors ``τ²`` (weights) are the Gauss quadrature rule of the spectral
measure seen from the start vector ``v_i``: ``Σ_j τ_j² f(θ_j) ≈ v_iᵀ f(H) v_i``, exact for
polynomials of degree ``≤ 2·steps − 1``. Averaging over probes and broadening each node by a
Gaussian gives the density.

The probes are vectorised: their three-term recurrences, inner products and the full
reorthogonalisation (classical Gram-Schmidt twice, a third pass after heavy cancellation) run as
batched tensor operations over all probes, with one host synchronisation per step for the
coefficients ``α, β``.

Cost: ``lanczos_steps`` products with ``num_probes`` columns each (a probe whose recurrence breaks
down drops out of later products). Memory: the bases, one ``[num_probes, lanczos_steps, P]`` tensor
(``lanczos_steps × P × num_probes`` numbers) in the basis dtype (the operator's dtype, or float32
for half precisions; ``basis_dtype`` overrides), on the operator's device or, with
``offload=True``, in host memory — the recurrence then runs on the host and only the product's
columns travel to the device. When the bases cannot fit in the free memory of a CUDA device
(``torch.cuda.mem_get_info``), a ``MemoryError`` says how many bytes they need.

The batched recurrence itself (:func:`batched_lanczos`, and the block version over index subsets
behind :func:`hessfast.algorithms.layerwise.layerwise`) lives here too; products, orthogonalisation,
breakdowns and memory checks are those of the Krylov layer (:mod:`hessfast.algorithms.krylov`).
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
    rademacher,
    random_block,
    run_symmetry_check,
)
from .krylov import (
    work_dtype as resolve_work_dtype,
)

Tensor = torch.Tensor
Rows = slice | Tensor

__all__ = [
    "spectral_density",
    "SpectralDensity",
    "Outlier",
    "batched_lanczos",
    "LanczosTridiagonals",
]


# ---------------------------------------------------------------------------------------------
# the batched (block) Lanczos recurrences, on the Krylov layer (hessfast.algorithms.krylov)
# ---------------------------------------------------------------------------------------------


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


def _lanczos_probes(
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
    >>> from hessfast.algorithms.slq import batched_lanczos
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


def _check_steps(steps: Any) -> int:
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
    >>> from hessfast.algorithms.slq import batched_lanczos
    >>> A = torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64))
    >>> out = batched_lanczos(hessfast.DenseOperator(A), torch.ones(6, 2, dtype=torch.float64), 10)
    >>> out.num_steps.tolist()  # six distinct eigenvalues: breakdown after six steps
    [6, 6]
    >>> nodes, weights = out.quadrature()
    >>> nodes[0, :6].round(8).tolist()
    [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    """
    op = as_operator(H)
    steps = _check_steps(lanczos_steps)
    if not isinstance(start, torch.Tensor) or start.dim() != 2 or start.shape[0] != op.shape[0]:
        shape = list(start.shape) if isinstance(start, torch.Tensor) else type(start).__name__
        raise ValueError(f"start must be a [P, m] tensor with P={op.shape[0]}, got {shape}")
    if start.shape[1] < 1:
        raise ValueError("start has no columns (num_probes must be >= 1)")
    work = resolve_work_dtype(op.dtype, basis_dtype)
    m = start.shape[1]
    runs = _lanczos_probes(
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


# ---------------------------------------------------------------------------------------------
# spectral density
# ---------------------------------------------------------------------------------------------


@dataclass
class Outlier:
    """A cluster of Ritz values separated from the bulk (see :class:`SpectralDensity`).

    ``value``: weight-averaged location; ``weight``: its share of the spectrum (averaged over
    probes; ``≈ multiplicity / P``); ``count``: ``weight × P``, an estimate of how many eigenvalues
    it stands for; ``probes``: in how many probes it was found (a converged eigenvalue appears in
    all of them); ``spread``: largest minus smallest Ritz value in the cluster.
    """

    value: float
    weight: float
    count: float
    probes: int
    spread: float

    def to_dict(self) -> dict[str, float | int]:
        return {
            "value": self.value,
            "weight": self.weight,
            "count": self.count,
            "probes": self.probes,
            "spread": self.spread,
        }


def gaussians(x: np.ndarray, nodes: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    out = np.zeros(x.shape)
    norm = 1.0 / (sigma * math.sqrt(2 * math.pi))
    for a in range(0, x.size, 256):
        d = (x[a : a + 256, None] - nodes[None, :]) / sigma
        out[a : a + 256] = np.exp(-0.5 * d * d) @ weights * norm
    return out


@dataclass(eq=False, repr=False)
class SpectralDensity:
    """The result of :func:`spectral_density`. Every array is float64 NumPy.

    - ``grid`` ``[num_points]`` and ``values`` ``[num_points]``: the Gaussian-broadened density
      ``φ(t) = (1/m) Σ_i Σ_j τ_ij² N(t; θ_ij, σ²)`` (``m`` probes). On the default grid it is
      renormalised by the trapezoid rule so that it integrates to exactly 1 there.
    - ``nodes`` / ``weights`` ``[num_probes, lanczos_steps]``: each probe's Gauss quadrature
      (Ritz values ascending; weights of a probe sum to 1). A probe that broke down after
      ``num_steps[i]`` steps is padded with its largest node at weight 0.
    - ``num_steps`` ``[num_probes]``: Lanczos steps each probe ran.
    - ``sigma``: the broadening used. ``size``: ``P``.
    - ``outliers``: clusters of Ritz values separated from the bulk, largest value first. The
      nodes of all probes are pooled and split wherever two neighbouring nodes are more than
      ``outlier_gap`` apart (single linkage); the cluster with the most weight is the bulk and
      every other cluster is an outlier (default gap: see :func:`spectral_density`). A converged
      outlier eigenvalue is found by every probe (``Outlier.probes``).
    - ``lambda_max`` / ``lambda_min``: the largest / smallest Ritz value of any probe (inner
      bounds of the extreme eigenvalues).

    >>> import torch
    >>> from hessfast.algorithms.slq import spectral_density
    >>> d = spectral_density(torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64)),
    ...                      num_probes=2, lanczos_steps=10)
    >>> round(d.moment(1), 10), round(d.lambda_max, 8), d.num_steps.tolist()  # tr(H)/P
    (5.5, 10.0, [10, 10])
    >>> sorted(d.to_dict())[:4]
    ['grid', 'lambda_max', 'lambda_min', 'lanczos_steps']
    """

    grid: np.ndarray
    values: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    num_steps: np.ndarray
    sigma: float
    outlier_gap: float
    outliers: list[Outlier]
    size: int

    @property
    def num_probes(self) -> int:
        return int(self.nodes.shape[0])

    def __repr__(self) -> str:
        return (
            f"SpectralDensity(P={self.size:,}, probes={self.num_probes}, "
            f"steps={self.nodes.shape[1]}, range=[{self.lambda_min:.6g}, {self.lambda_max:.6g}], "
            f"sigma={self.sigma:.3g}, outliers={[round(o.value, 6) for o in self.outliers]})"
        )

    def _valid(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pooled nodes, weights (divided by the number of probes) and probe ids, padding dropped."""
        mask = np.arange(self.nodes.shape[1])[None, :] < self.num_steps[:, None]
        probe = np.broadcast_to(np.arange(self.nodes.shape[0])[:, None], self.nodes.shape)
        return self.nodes[mask], self.weights[mask] / self.num_probes, probe[mask]

    @property
    def lambda_max(self) -> float:
        return float(self._valid()[0].max())

    @property
    def lambda_min(self) -> float:
        return float(self._valid()[0].min())

    def evaluate(self, x: Any, sigma: float | None = None) -> np.ndarray:
        """The broadened density (not renormalised) at the points ``x``."""
        nodes, w, _ = self._valid()
        x = np.asarray(x, dtype=np.float64)
        return gaussians(x.reshape(-1), nodes, w, sigma or self.sigma).reshape(x.shape)

    def moment(self, power: int) -> float:
        """``(1/m) Σ_i Σ_j τ_ij² θ_ij^power``: an unbiased estimate of ``tr(H^power) / P``
        (exact per probe for ``power ≤ 2·steps − 1``)."""
        nodes, w, _ = self._valid()
        return float(np.sum(w * nodes**power))

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready Python lists and floats."""
        return {
            "size": self.size,
            "num_probes": self.num_probes,
            "lanczos_steps": int(self.nodes.shape[1]),
            "num_steps": self.num_steps.tolist(),
            "sigma": self.sigma,
            "outlier_gap": self.outlier_gap,
            "lambda_max": self.lambda_max,
            "lambda_min": self.lambda_min,
            "grid": self.grid.tolist(),
            "values": self.values.tolist(),
            "nodes": self.nodes.tolist(),
            "weights": self.weights.tolist(),
            "outliers": [o.to_dict() for o in self.outliers],
        }

    def plot(self, path: str, log: bool = True, title: str | None = None) -> str:
        """Write a PNG of the density (log scale by default) with the outliers marked; returns
        ``path``. Needs matplotlib (``pip install matplotlib``)."""
        try:
            from matplotlib.figure import Figure
        except ImportError as e:
            raise ImportError(
                "SpectralDensity.plot needs matplotlib: pip install matplotlib"
            ) from e
        fig = Figure(figsize=(7, 4), dpi=120)
        ax = fig.add_subplot(1, 1, 1)
        y = self.values
        if log:
            top = float(y.max()) if y.size and y.max() > 0 else 1.0
            floor = top * 1e-14
            y = np.maximum(y, floor)
            ax.set_yscale("log")
            ax.set_ylim(floor, top * 3)
        ax.plot(self.grid, y, color="C0", lw=1.2, label="density")
        for n, o in enumerate(self.outliers):
            ax.axvline(o.value, color="C3", ls="--", lw=0.8, label="outliers" if n == 0 else None)
        if self.outliers:
            ax.legend(loc="upper center")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.set_title(
            title
            or (
                f"SLQ spectral density: P={self.size:,}, {self.num_probes} probes × "
                f"{self.nodes.shape[1]} steps, σ={self.sigma:.3g}"
            ),
            fontsize=9,
        )
        fig.tight_layout()
        fig.savefig(path)
        return path


def _outliers(
    nodes: np.ndarray, w: np.ndarray, probe: np.ndarray, gap: float, size: int
) -> list[Outlier]:
    order = np.argsort(nodes, kind="stable")
    x, w, probe = nodes[order], w[order], probe[order]
    cuts = np.nonzero(np.diff(x) > gap)[0] + 1
    if cuts.size == 0:
        return []
    edges = np.concatenate([[0], cuts, [x.size]])
    clusters = [(edges[c], edges[c + 1]) for c in range(edges.size - 1)]
    mass = [float(w[a:b].sum()) for a, b in clusters]
    bulk = int(np.argmax(mass))
    out = []
    for c, (a, b) in enumerate(clusters):
        if c == bulk:
            continue
        ws = mass[c]
        value = float((w[a:b] * x[a:b]).sum() / ws) if ws > 0 else float(x[a:b].mean())
        out.append(
            Outlier(
                value=value,
                weight=ws,
                count=ws * size,
                probes=int(np.unique(probe[a:b]).size),
                spread=float(x[b - 1] - x[a]),
            )
        )
    out.sort(key=lambda o: -o.value)
    return out


def spectral_density(
    H: Operator | Tensor,
    num_probes: int = 16,
    lanczos_steps: int = 80,
    seed: int = 0,
    *,
    distribution: str = "rademacher",
    sigma: float | None = None,
    num_points: int = 1000,
    grid: Any = None,
    outlier_gap: float | None = None,
    basis_dtype: torch.dtype | None = None,
    offload: bool = False,
    max_columns: int | None = None,
    tol: float | None = None,
    check_symmetric: bool | None = None,
) -> SpectralDensity:
    """The spectral density of a symmetric operator by stochastic Lanczos quadrature.

    ``num_probes`` unit-norm start vectors (``distribution="rademacher"`` ±1/√P entries, or
    ``"gaussian"``), drawn from ``seed`` on the CPU (so results do not depend on the device), run
    batched Lanczos together: ``lanczos_steps`` products with ``num_probes`` columns each, split
    into chunks of ``max_columns`` columns if given (see module docstring for memory, ``offload``
    and ``basis_dtype``). A probe whose recurrence breaks down (e.g. a low-rank operator, or
    ``lanczos_steps ≥ P``) stops there; its quadrature is then exact.

    Broadening: ``sigma`` defaults to 1% of the width of the spectrum seen (largest minus smallest
    Ritz value over all probes; if that is 0, 1% of ``max(|θ|, 1)``). The default grid has
    ``num_points`` points on ``[min θ − 5σ, max θ + 5σ]`` and the density is renormalised by the
    trapezoid rule to integrate to 1 on it. ``grid`` (any 1-D array) replaces it; the density is
    then evaluated there as is (it integrates to the share of the spectrum inside your grid).

    Outliers: the Ritz values of all probes are pooled and split into clusters wherever two
    neighbours lie more than ``outlier_gap`` apart; every cluster other than the heaviest (the
    bulk) is an outlier, reported in ``.outliers`` with its location and weight. The default gap is
    ``max(3σ, 3 × the median spacing of consecutive Ritz values within a probe)``: an outlier is a
    peak that the broadened density shows apart from the bulk, and the gaps that a short Gauss
    rule leaves between its own nodes inside a bulk do not count.

    ``check_symmetric`` probes ``⟨u, Hv⟩ = ⟨Hu, v⟩`` first, as in
    :func:`~hessfast.algorithms.lanczos.eigsh` (default: one two-column product on hessfast's
    Hessian and GGN operators).

    Raises ``ValueError`` for ``num_probes``/``lanczos_steps`` < 1 or a non-square operator, and
    ``NonFiniteError`` (a ``FloatingPointError``) when a product has NaN or Inf.

    >>> import torch, hessfast
    >>> from hessfast.algorithms.slq import spectral_density
    >>> lam = torch.cat([torch.linspace(0.0, 1.0, 97), torch.tensor([10.0, 20.0, 30.0])])
    >>> H = hessfast.DenseOperator(torch.diag(lam.double()))
    >>> d = spectral_density(H, num_probes=4, lanczos_steps=30, seed=0)
    >>> d.nodes.shape, d.values.shape
    ((4, 30), (1000,))
    >>> round(float(torch.trapezoid(torch.tensor(d.values), torch.tensor(d.grid))), 10)
    1.0
    >>> [round(o.value, 6) for o in d.outliers]
    [30.0, 20.0, 10.0]
    """
    op = as_operator(H)
    m = check_positive_int("num_probes", num_probes)
    steps = _check_steps(lanczos_steps)
    npts = check_positive_int("num_points", num_points)
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    if sigma is not None and not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a positive number, got {sigma!r}")
    if outlier_gap is not None and not (outlier_gap > 0 and math.isfinite(outlier_gap)):
        raise ValueError(f"outlier_gap must be a positive number, got {outlier_gap!r}")
    P = op.shape[0]
    products = Products(op, max_columns)
    run_symmetry_check(op, products, seed, check_symmetric)  # eigsh's check_symmetric
    work = resolve_work_dtype(op.dtype, basis_dtype)
    g = torch.Generator().manual_seed(int(seed))

    def start(_i: int) -> Tensor:  # drawn on the CPU, one probe at a time, in probe order
        if distribution == "rademacher":
            return rademacher(P, g)
        return torch.randn(P, generator=g, dtype=torch.float64)

    runs = _lanczos_probes(
        op,
        m,
        start,
        steps,
        tol=tol,
        work_dtype=work,
        offload=offload,
        products=products,
    )
    nodes = np.zeros((m, steps))
    weights = np.zeros((m, steps))
    num_steps = np.array([r.steps for r in runs], dtype=np.int64)
    for i, run in enumerate(runs):
        theta, U, _ = run.ritz()
        n = run.steps
        nodes[i, :n], weights[i, :n] = theta, U[0] ** 2
        nodes[i, n:] = theta[-1]
    mask = np.arange(steps)[None, :] < num_steps[:, None]
    pooled = nodes[mask]
    pw = weights[mask] / m
    probe_ids = np.broadcast_to(np.arange(m)[:, None], nodes.shape)[mask]
    lo, hi = float(pooled.min()), float(pooled.max())
    width = hi - lo if hi > lo else max(abs(lo), abs(hi), 1.0)
    if sigma is None:
        sigma = 0.01 * width
    if outlier_gap is None:
        spacing = [np.diff(nodes[i, : num_steps[i]]) for i in range(m)]
        spacing = np.concatenate(spacing) if spacing else np.zeros(0)
        typical = float(np.median(spacing)) if spacing.size else 0.0
        gap = max(3 * sigma, 3 * typical)
    else:
        gap = float(outlier_gap)
    if grid is None:
        x = np.linspace(lo - 5 * sigma, hi + 5 * sigma, npts)
        values = gaussians(x, pooled, pw, sigma)
        total = float(np.trapezoid(values, x)) if npts > 1 else 0.0
        if total > 0:
            values = values / total
    else:
        x = np.asarray(grid, dtype=np.float64).reshape(-1)
        if x.size < 1 or not np.isfinite(x).all():
            raise ValueError("grid must be a non-empty 1-D array of finite numbers")
        values = gaussians(x, pooled, pw, sigma)
    return SpectralDensity(
        grid=x,
        values=values,
        nodes=nodes,
        weights=weights,
        num_steps=num_steps,
        sigma=float(sigma),
        outlier_gap=gap,
        outliers=_outliers(pooled, pw, probe_ids, gap, P),
        size=P,
    )
