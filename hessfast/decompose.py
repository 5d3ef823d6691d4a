"""The Gauss-Newton decomposition of a model's Hessian: ``H = G + R``.

``G = Jᵀ H_L J`` (the GGN) is positive semidefinite for a convex loss and dominates near minima;
``R = Σ_c (∂L/∂z_c) ∇²z_c`` carries the second derivatives of the model's outputs and all of the
Hessian's negative curvature. :func:`decompose` reads the three side by side:

- the top ``k`` eigenvalues of ``H``, ``G`` and ``R`` (block Lanczos, :func:`hessfast.eigsh`);
- ``λ_min`` of ``H`` and of ``R`` (``G`` has none below zero);
- the traces of ``H``, ``G`` and ``R`` from one set of Hutch++ probes shared by the three
  (:func:`hessfast.algorithms.trace.trace_probes`: the sketch basis is built from ``H``), so that
  ``tr H = tr G + tr R`` holds on the estimates themselves, up to the rounding of the products;
- the overlap of the top-``k`` eigenspaces of ``H`` and ``G``, ``‖U_Hᵀ U_G‖_F² / k`` (1: the same
  space; ``k/P`` for random spaces);
- how many of each operator's top eigenvalues are outliers (separate from the bulk of its
  spectrum, :func:`hessfast.analyze.count_outliers`);
- optionally the three spectral densities (SLQ with the same start probes), drawn on one axis by
  :meth:`Decomposition.plot`.

``R`` is ``H - G`` in operator arithmetic (:mod:`hessfast.operator_algebra`): one engine pass per
product when this hessfast has :class:`hessfast.operators.ResidualOperator` and the two operators
share their settings, else the lazy difference (two passes). ``Decomposition.residual_operator``
names which one ran.

>>> import torch, hessfast
>>> H = hessfast.DenseOperator(torch.diag(torch.tensor([4.0, 2.0, -1.0], dtype=torch.float64)))
>>> G = hessfast.DenseOperator(torch.diag(torch.tensor([3.0, 2.0, 0.0], dtype=torch.float64)))
>>> d = decompose_operators(H, G, k=2, density=False)
>>> [round(v, 6) for v in d.eigenvalues["residual"]], round(d.lambda_min["residual"]["value"], 6)
([1.0, 0.0], -1.0)
>>> d.trace["hessian"].estimate, d.trace["ggn"].estimate + d.trace["residual"].estimate
(5.0, 5.0)
"""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .algorithms import eigsh, spectral_density
from .algorithms.krylov import Products, check_operator
from .algorithms.slq import SpectralDensity
from .algorithms.trace import TraceEstimate, trace_probes, trace_with_probes

Tensor = torch.Tensor

__all__ = ["decompose", "decompose_operators", "Decomposition", "plot_decomposition"]

PARTS = ("hessian", "ggn", "residual")
_LABELS = {"hessian": "H (Hessian)", "ggn": "G (Gauss-Newton)", "residual": "R = H - G"}


@dataclass
class Decomposition:
    """The result of :func:`decompose`; the dicts are keyed ``"hessian"``, ``"ggn"`` and
    ``"residual"``.

    Attributes:
        k: top eigenvalues per operator; ``size``: ``P``.
        eigenvalues: the top ``k`` eigenvalues of each, descending; ``residual_norms`` their
            Lanczos residuals ``‖A y − θ y‖``; ``converged`` whether each run met ``tol``.
        lambda_min: ``{"value", "residual", "converged"}`` for ``"hessian"`` and ``"residual"``
            (a Ritz value, an upper bound of ``λ_min``, when not converged).
        trace: a :class:`~hessfast.algorithms.trace.TraceEstimate` of each, on shared probes.
        overlap: ``‖U_Hᵀ U_G‖_F² / k`` of the top-``k`` eigenvectors of ``H`` and ``G``.
        outliers: :func:`hessfast.analyze.count_outliers` of each operator's top eigenvalues.
        density: a :class:`~hessfast.algorithms.slq.SpectralDensity` of each, or ``None``.
        products: products spent on each operator (symmetry probes included).
        residual_operator: the class that computed ``R`` (``"ResidualOperator"``: one pass per
            product; ``"SumOperator"``: ``H`` and ``G`` products).
        eigenvectors: the top-``k`` eigenvectors of ``"hessian"`` and ``"ggn"`` (``[P, k]``, in
            the operators' dtype; not in :meth:`to_dict`).
    """

    k: int
    size: int
    eigenvalues: dict[str, list[float]]
    residual_norms: dict[str, list[float]]
    converged: dict[str, bool]
    lambda_min: dict[str, dict[str, Any]]
    trace: dict[str, TraceEstimate]
    overlap: float
    outliers: dict[str, dict[str, Any]]
    density: dict[str, SpectralDensity] | None
    products: dict[str, int]
    residual_operator: str
    eigenvectors: dict[str, Tensor] = field(repr=False, default_factory=dict)

    @property
    def trace_gap(self) -> float:
        """``tr H − (tr G + tr R)`` on the shared probes: rounding only."""
        t = self.trace
        return t["hessian"].estimate - (t["ggn"].estimate + t["residual"].estimate)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the eigenvectors, as JSON-ready lists, floats and dicts (a non-finite
        number, such as the ``inf`` stderr of a single Hutchinson sample, becomes ``None``)."""
        from .analyze.report import json_safe

        return json_safe(
            {
                "k": self.k,
                "size": self.size,
                "eigenvalues": {p: list(v) for p, v in self.eigenvalues.items()},
                "residual_norms": {p: list(v) for p, v in self.residual_norms.items()},
                "converged": dict(self.converged),
                "lambda_min": {p: dict(v) for p, v in self.lambda_min.items()},
                "trace": {p: t.to_dict() for p, t in self.trace.items()},
                "trace_gap": self.trace_gap,
                "overlap": self.overlap,
                "outliers": {p: dict(v) for p, v in self.outliers.items()},
                "density": None
                if self.density is None
                else {p: d.to_dict() for p, d in self.density.items()},
                "products": dict(self.products),
                "residual_operator": self.residual_operator,
            }
        )

    def plot(self, path: str | os.PathLike) -> str:
        """Write a PNG of the three spectral densities on one axis (log scale; without densities,
        the top eigenvalues by rank); returns ``path``. Needs matplotlib."""
        return plot_decomposition(self.to_dict(), path)


def plot_decomposition(report: dict[str, Any], path: str | os.PathLike) -> str:
    """:meth:`Decomposition.plot` from its :meth:`~Decomposition.to_dict` (as ``report.json``
    of ``hessfast analyze --decompose`` holds it); returns ``path``."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is a dependency
        raise ImportError("the decomposition plot needs matplotlib: pip install matplotlib") from e
    fig = Figure(figsize=(7.5, 4.2), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    dens = report.get("density")
    if dens:
        top = max(float(np.max(dens[p]["values"])) for p in PARTS)
        floor = (top if top > 0 else 1.0) * 1e-12
        for i, part in enumerate(PARTS):
            y = np.maximum(np.asarray(dens[part]["values"], dtype=np.float64), floor)
            ax.plot(dens[part]["grid"], y, color=f"C{i}", lw=1.2, label=_LABELS[part])
        ax.set_yscale("log")
        ax.set_ylim(floor, top * 3)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density (log scale)")
    else:
        for i, part in enumerate(PARTS):
            vals = report["eigenvalues"][part]
            ax.plot(range(1, len(vals) + 1), vals, "o-", color=f"C{i}", ms=4, label=_LABELS[part])
        ax.set_xlabel("rank")
        ax.set_ylabel("eigenvalue")
    ax.set_title(
        f"Gauss-Newton decomposition H = G + R, P = {report['size']:,}: overlap of the top-"
        f"{report['k']} eigenspaces of H and G {report['overlap']:.3f}",
        fontsize=9,
    )
    ax.legend(loc="best", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path)
    return str(path)


def decompose(
    model: torch.nn.Module,
    loss_fn: Any,
    data: Any,
    k: int = 10,
    *,
    params: Any = None,
    tol: float = 1e-6,
    criterion: str = "residual",
    seed: int = 0,
    trace_matvecs: int = 60,
    density: bool = True,
    density_probes: int = 8,
    density_steps: int = 60,
    min_max_iter: int = 200,
    **operator_kwargs: Any,
) -> Decomposition:
    """The Gauss-Newton decomposition ``H = G + R`` of a model's loss over ``data`` (module
    docstring).

    ``model``, ``loss_fn``, ``data``, ``params`` and ``operator_kwargs`` (``max_batch_size``,
    ``backend``, ``compile``, ``output``, ``reduction``, ``process_group``,
    ``check_deterministic``, ``progress``) build a :class:`~hessfast.HessianOperator` and a
    :class:`~hessfast.GGNOperator` as those classes do; the rest goes to
    :func:`decompose_operators`.

    >>> import torch, torch.nn.functional as F, hessfast
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,)))]
    >>> d = hessfast.decompose(model.double(), F.cross_entropy,
    ...                        [(x.double(), y) for x, y in data], k=3, density=False)
    >>> sorted(d.eigenvalues), abs(d.trace_gap) < 1e-12, 0 <= d.overlap <= 1
    (['ggn', 'hessian', 'residual'], True, True)
    """
    from .operators import GGNOperator, HessianOperator

    H = HessianOperator(model, loss_fn, data, params, **operator_kwargs)
    G = GGNOperator(model, loss_fn, data, params, **operator_kwargs)
    return decompose_operators(
        H,
        G,
        k=k,
        tol=tol,
        criterion=criterion,
        seed=seed,
        trace_matvecs=trace_matvecs,
        density=density,
        density_probes=density_probes,
        density_steps=density_steps,
        min_max_iter=min_max_iter,
    )


def decompose_operators(
    H: Any,
    G: Any,
    k: int = 10,
    *,
    tol: float = 1e-6,
    criterion: str = "residual",
    seed: int = 0,
    trace_matvecs: int = 60,
    density: bool = True,
    density_probes: int = 8,
    density_steps: int = 60,
    min_max_iter: int = 200,
) -> Decomposition:
    """:func:`decompose` on a Hessian operator ``H`` and its GGN operator ``G`` (any two
    symmetric operators of one shape: ``R = H - G``).

    ``k``: top eigenvalues per operator (capped at ``P``), by :func:`hessfast.eigsh` to ``tol``
    under its stopping ``criterion`` (``"residual"``, what the eigenvectors the overlap is read
    from need, or ``"eigenvalue"``; ``seed`` seeds every random start). ``λ_min`` runs stop
    after ``min_max_iter`` Lanczos steps (the bottom of a Hessian lies in a dense bulk; the
    result says whether it converged).
    ``trace_matvecs``: Hutch++ products per operator (the sketch spends a third of them on ``H``
    once; ``≥ P``: exact traces). ``density``: also the SLQ densities, ``density_probes`` ×
    ``density_steps`` products per operator. Every operator's symmetry is probed once (the
    default of :func:`hessfast.eigsh`), the first time it is used.

    Raises ``ValueError`` for ``k < 1`` or operators that cannot be subtracted (different
    shapes, dtypes, devices, models or parameters).
    """
    from .analyze.analysis import count_outliers

    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    R = H - G
    P = check_operator(H)
    k = min(int(k), P)
    ops = {"hessian": Products(H), "ggn": Products(G), "residual": Products(R)}
    probed: set[str] = set()

    def check(part: str) -> bool | None:
        first = part not in probed
        probed.add(part)
        return None if first else False

    top: dict[str, list[float]] = {}
    resid: dict[str, list[float]] = {}
    conv: dict[str, bool] = {}
    vecs: dict[str, Tensor] = {}
    for part, op in ops.items():
        evals, evecs, info = eigsh(
            op,
            k=k,
            which="LA",
            tol=tol,
            criterion=criterion,
            seed=seed,
            return_info=True,
            warn=False,
            check_symmetric=check(part),
        )
        order = torch.argsort(evals, descending=True)
        top[part] = evals[order].tolist()
        resid[part] = info.residuals[order].tolist()
        conv[part] = bool(info.converged)
        vecs[part] = evecs[:, order]

    lam_min: dict[str, dict[str, Any]] = {}
    for part in ("hessian", "residual"):
        ev, _, info = eigsh(
            ops[part],
            k=1,
            which="SA",
            tol=tol,
            criterion=criterion,
            seed=seed + 1,
            max_iter=min_max_iter,
            ncv=min(P, 40),
            return_info=True,
            warn=False,
            check_symmetric=check(part),
        )
        lam_min[part] = {
            "value": float(ev[0]),
            "residual": float(info.residuals[0]),
            "converged": bool(info.converged),
        }

    probes = trace_probes(ops["hessian"], num_matvecs=min(trace_matvecs, P), seed=seed)
    traces = {part: trace_with_probes(op, probes) for part, op in ops.items()}

    U_H, U_G = vecs["hessian"].double().cpu(), vecs["ggn"].double().cpu()
    overlap = float((U_H.T @ U_G).square().sum()) / k

    dens = None
    if density:
        dens = {
            part: spectral_density(
                op,
                num_probes=density_probes,
                lanczos_steps=min(density_steps, P),
                seed=seed,
                check_symmetric=check(part),
            )
            for part, op in ops.items()
        }
    outliers = {
        part: count_outliers(top[part], None if dens is None else dens[part].to_dict())
        for part in PARTS
    }
    return Decomposition(
        k=k,
        size=P,
        eigenvalues=top,
        residual_norms=resid,
        converged=conv,
        lambda_min=lam_min,
        trace=traces,
        overlap=overlap,
        outliers=outliers,
        density=dens,
        products={part: op.products for part, op in ops.items()},
        residual_operator=type(R).__name__,
        eigenvectors={"hessian": vecs["hessian"], "ggn": vecs["ggn"]},
    )


class _CallableModule(types.ModuleType):
    """``hessfast.decompose`` is this module and, called, :func:`decompose` (as
    ``hessfast.landscape``): the name stays callable however the module is imported."""

    def __call__(self, *args: Any, **kwargs: Any) -> Decomposition:
        return decompose(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
