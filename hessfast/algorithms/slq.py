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

The batched recurrence itself (:func:`~hessfast.algorithms.recurrences.batched_lanczos`, and the
block version over index subsets behind :func:`hessfast.algorithms.layerwise.layerwise`) is in
:mod:`hessfast.algorithms.recurrences`; products, orthogonalisation, breakdowns and memory checks
are those of the Krylov layer (:mod:`hessfast.algorithms.krylov`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .krylov import (
    Operator,
    Products,
    as_operator,
    check_positive_int,
    rademacher,
    run_symmetry_check,
)
from .krylov import (
    work_dtype as resolve_work_dtype,
)
from .recurrences import check_steps, lanczos_probes

Tensor = torch.Tensor
Rows = slice | Tensor

__all__ = [
    "spectral_density",
    "SpectralDensity",
    "Outlier",
]


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
    steps = check_steps(lanczos_steps)
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

    runs = lanczos_probes(
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
