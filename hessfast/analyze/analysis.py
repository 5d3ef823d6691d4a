"""The analysis of a curvature operator: top eigenvalues, ``λ_min`` and the condition number,
trace, spectral density, per-layer curvature, outliers, the loss landscape along the top
eigenvectors; a JSON-ready dict."""

from __future__ import annotations

import datetime
import os
import time
from typing import Any

import numpy as np
import torch

from .report import json_safe, write_report


class _Phases:
    """One tqdm bar over the phases of an analysis (its postfix counts the products), and the
    wall time of each phase."""

    def __init__(self, names: list[str], progress: bool, desc: str):
        self.bar = None
        if progress:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=len(names), desc=desc, unit="phase", leave=False)
            except ImportError:  # pragma: no cover - tqdm is a dependency
                self.bar = None
        self.seconds: dict[str, float] = {}
        self._name = None
        self._t = 0.0

    def start(self, name: str) -> None:
        self._name, self._t = name, time.perf_counter()
        if self.bar is not None:
            self.bar.set_description(name)

    def done(self) -> None:
        self.seconds[self._name] = time.perf_counter() - self._t
        if self.bar is not None:
            self.bar.update(1)

    def products(self, n: int) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{n} products", refresh=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _bulk_edge(density: dict) -> tuple[float, float]:
    """Upper end of the bulk of an SLQ density (its heaviest cluster of pooled Ritz values, split
    where neighbours lie more than ``outlier_gap`` apart, as :func:`hessfast.spectral_density`
    does) and that gap."""
    nodes = np.asarray(density["nodes"], dtype=np.float64)
    weights = np.asarray(density["weights"], dtype=np.float64)
    steps = np.asarray(density["num_steps"])
    mask = np.arange(nodes.shape[1])[None, :] < steps[:, None]
    x, w = nodes[mask], weights[mask]
    order = np.argsort(x, kind="stable")
    x, w = x[order], w[order]
    gap = float(density["outlier_gap"])
    cuts = np.nonzero(np.diff(x) > gap)[0] + 1
    edges = np.concatenate([[0], cuts, [x.size]])
    mass = [float(w[a:b].sum()) for a, b in zip(edges[:-1], edges[1:])]
    c = int(np.argmax(mass))
    return float(x[edges[c + 1] - 1]), gap


def count_outliers(
    top: list[float], density: dict | None = None, min_ratio: float = 1.5
) -> dict[str, Any]:
    """How many of the ``top`` eigenvalues (descending) separate from the bulk of the spectrum.

    With a spectral density (``SpectralDensity.to_dict()``): the eigenvalues above the upper edge
    of its bulk by more than its ``outlier_gap`` — the rule by which the density itself splits
    outliers from the bulk (``method="density"``). Without one: the largest ratio
    ``λ_i / λ_{i+1}`` between consecutive positive top eigenvalues, if it is at least
    ``min_ratio`` (``method="gap"``; 0 outliers when no gap is that large).

    ``at_least`` is true when every computed eigenvalue is above the bulk: there may be more
    outliers than ``top`` holds.

    >>> count_outliers([9.0, 8.0, 7.5, 1.0, 0.9, 0.8])["count"]
    3
    """
    vals = [float(v) for v in top]
    out: dict[str, Any] = {"count": 0, "values": [], "at_least": False}
    if density is not None:
        edge, gap = _bulk_edge(density)
        n = sum(1 for v in vals if v > edge + gap)
        out.update(method="density", bulk_edge=edge, gap=gap)
    else:
        n, best = 0, 0.0
        for i in range(len(vals) - 1):
            if vals[i + 1] > 0 and vals[i] / vals[i + 1] > best:
                best, n = vals[i] / vals[i + 1], i + 1
        if best < min_ratio:
            n = 0
        out.update(method="gap", ratio=best if n else None)
        out["bulk_edge"] = vals[n] if n < len(vals) else None
    out["count"] = n
    out["values"] = vals[:n]
    out["at_least"] = bool(vals) and n == len(vals)
    if 0 < n < len(vals) and vals[n] > 0:
        out["separation"] = vals[n - 1] / vals[n]  # the last outlier over the largest bulk value
    return out


def analyze(
    op,
    *,
    top_k: int = 20,
    lambda_min: bool = True,
    trace: bool = True,
    density: bool = True,
    layerwise: bool = True,
    classes: int | None = None,
    tol: float = 1e-5,
    criterion: str = "residual",
    seed: int = 0,
    max_iter: int | None = None,
    min_max_iter: int = 200,
    trace_matvecs: int = 60,
    density_probes: int = 8,
    density_steps: int = 60,
    layer_steps: int = 20,
    layer_trace_probes: int = 16,
    landscape: int | None = None,
    landscape_span: float | str = "auto",
    landscape_steps: int | None = None,
    progress: bool = False,
    out: str | os.PathLike | None = None,
    extra: dict | None = None,
    decompose: bool = False,
) -> dict[str, Any]:
    """Analyse a curvature operator; returns the report as a JSON-ready dict.

    ``op``: anything with ``shape``, ``dtype``, ``device`` and ``matmat`` (per-layer results need
    ``op.groups()``, i.e. a Hessian or GGN operator; with other operators that phase is skipped).
    ``top_k``: how many of the largest eigenvalues (to see the outliers, take more than the
    number of classes). ``classes``: the number of classes, when known, reported next to the
    number of outliers. ``tol``: Lanczos residual tolerance of the top eigenvalues (and of
    ``λ_min``, whose run stops after ``min_max_iter`` steps anyway). ``criterion``: what ``tol``
    bounds in those two :func:`hessfast.eigsh` runs, ``"residual"`` (default: the residual norm,
    which controls the eigenvectors the landscape uses as well as the eigenvalues) or
    ``"eigenvalue"`` (a bound on the eigenvalue error: 10–15% fewer products when only the
    eigenvalues matter; the eigenvectors are then accurate to about ``sqrt(tol)``); recorded in
    ``report["eigenvalues"]`` and ``report["lambda_min"]``, and a bad value is eigsh's
    ``ValueError`` before any product. The decompose section's own eigsh runs
    (:func:`hessfast.decompose.decompose_operators`) use it too. ``trace_matvecs``,
    ``density_probes`` × ``density_steps``, ``layer_steps`` and ``layer_trace_probes`` set the
    work of the other phases. ``landscape``: 1 or 2 adds the loss over the data along the top
    one or two eigenvectors of ``op`` beside its quadratic model (:func:`landscape_step`;
    ``op`` must be a :class:`~hessfast.HessianOperator` or :class:`~hessfast.GGNOperator` in
    one process, and ``top_k`` at least ``landscape``), over ``landscape_span`` (a half-width,
    or ``"auto"``: :func:`hessfast.landscape.auto_span`) with ``landscape_steps`` points per
    axis (default 21 in 1-D, 15 in 2-D). ``progress``: a progress bar over the phases.
    ``extra``: entries merged into the report (e.g. how the model was trained). ``out``: a
    folder to write ``report.json``, ``spectrum.png`` and, with a landscape,
    ``landscape_1d.png`` or ``landscape_2d.png`` into (see :func:`write_report`).
    ``decompose``: the Gauss-Newton decomposition ``H = G + R`` of a Hessian or GGN operator's
    model (:func:`decompose_section`; ``report["decompose"]``, and ``decomposition.png`` with
    ``out``).

    >>> import torch, hessfast
    >>> from hessfast.analyze import analyze
    >>> lam = torch.cat([torch.tensor([50.0, 40.0, 30.0]), torch.linspace(-1.0, 1.0, 197)])
    >>> r = analyze(hessfast.DenseOperator(torch.diag(lam).double()), top_k=5, layerwise=False)
    >>> [round(v, 6) for v in r["eigenvalues"]["values"]], r["outliers"]["count"]
    ([50.0, 40.0, 30.0, 1.0, 0.989796], 3)
    >>> round(r["lambda_min"]["value"], 6), r["condition_number"]["value"]
    (-1.0, None)
    """
    from ..algorithms import eigsh, spectral_density
    from ..algorithms import layerwise as layerwise_fn
    from ..algorithms import trace as trace_fn
    from ..algorithms.krylov import Products, check_operator

    P = check_operator(op)
    k = max(1, min(int(top_k), P))
    if landscape is not None:
        landscape_steps = check_landscape(op, landscape, landscape_span, landscape_steps, k)
    names = ["top eigenvalues"]
    if lambda_min:
        names.append("lambda_min")
    if trace:
        names.append("trace")
    if density:
        names.append("spectral density")
    can_layer = callable(getattr(op, "groups", None))
    if layerwise and can_layer:
        names.append("per-layer")
    if landscape is not None:
        names.append("landscape")
    if decompose:
        names.append("decompose")
    phases = _Phases(names, progress, desc="analysis")
    counted = Products(op, on_call=phases.products)
    report: dict[str, Any] = {
        "hessfast_version": version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "operator": {
            "kind": getattr(op, "kind", type(op).__name__),
            "class": type(op).__name__,
            "size": P,
            "dtype": str(op.dtype).replace("torch.", ""),
            "device": str(op.device),
        },
    }
    if extra:
        report.update(extra)
    if classes is not None:
        report["classes"] = int(classes)
    products: dict[str, int] = {}

    def step_done(name: str, before: int) -> None:
        products[name] = counted.products - before
        phases.done()

    try:
        phases.start("top eigenvalues")
        before = counted.products
        evals, evecs, info = eigsh(
            counted,
            k=k,
            which="LA",
            tol=tol,
            criterion=criterion,
            seed=seed,
            max_iter=max_iter,
            return_info=True,
            warn=False,
        )
        order = torch.argsort(evals, descending=True)
        # the landscape's directions: only the columns it needs are kept (P × k can be large)
        kept = order[: landscape or 0]
        evecs = evecs[:, kept].clone() if landscape else None
        report["eigenvalues"] = {
            "which": "largest algebraic",
            "k": k,
            "values": evals[order].tolist(),
            "residuals": info.residuals[order].tolist(),
            "converged": info.converged,
            "tol": tol,
            "criterion": info.criterion,
            "products": info.products,
            "block_size": info.block_size,
        }
        lam_max = float(evals.max())
        report["lambda_max"] = {
            "value": lam_max,
            "residual": float(info.residuals[order[0]]),
            "converged": bool(info.converged_mask[order[0]]),
        }
        step_done("top eigenvalues", before)

        if lambda_min:
            phases.start("lambda_min")
            before = counted.products
            ev, _, inf2 = eigsh(
                counted,
                k=1,
                which="SA",
                tol=tol,
                criterion=criterion,
                seed=seed + 1,
                max_iter=min_max_iter,
                ncv=min(P, 40),
                return_info=True,
                warn=False,
            )
            lo = float(ev[0])
            report["lambda_min"] = {
                "value": lo,
                "residual": float(inf2.residuals[0]),
                "converged": bool(inf2.converged),
                "criterion": inf2.criterion,
                "products": inf2.products,
                "note": ""
                if inf2.converged
                else (
                    f"not converged in {inf2.iterations} Lanczos steps: a Ritz value, an upper "
                    "bound of lambda_min"
                ),
            }
            cond: dict[str, Any] = {"lambda_max": lam_max, "lambda_min": lo}
            if lo > 0:
                cond.update(value=lam_max / lo, note="")
            else:
                cond.update(
                    value=None,
                    note=f"not positive definite (lambda_min = {lo:.6g} <= 0): the condition "
                    "number is infinite",
                )
            cond["ratio_of_ends"] = abs(lam_max / lo) if lo != 0 else None
            report["condition_number"] = cond
            step_done("lambda_min", before)

        if trace:
            phases.start("trace")
            before = counted.products
            est = trace_fn(counted, num_matvecs=min(trace_matvecs, P), method="hutch++", seed=seed)
            report["trace"] = est.to_dict()
            report["trace"]["per_parameter"] = est.estimate / P
            step_done("trace", before)

        dens = None
        if density:
            phases.start("spectral density")
            before = counted.products
            d = spectral_density(
                counted, num_probes=density_probes, lanczos_steps=min(density_steps, P), seed=seed
            )
            dens = d.to_dict()
            report["density"] = dens
            step_done("spectral density", before)

        out_info = count_outliers(report["eigenvalues"]["values"], dens)
        if classes is not None:
            out_info["classes"] = int(classes)
        report["outliers"] = out_info

        if layerwise and can_layer:
            phases.start("per-layer")
            before = counted.products
            res = layerwise_fn(
                counted,
                groups="module",
                which=("lambda_max", "trace"),
                lanczos_steps=layer_steps,
                num_trace_probes=layer_trace_probes,
                seed=seed,
            )
            report["layerwise"] = {
                lab: {
                    "size": r.size,
                    "lambda_max": r.lambda_max,
                    "residual_max": r.residual_max,
                    "trace": r.trace,
                    "trace_stderr": r.trace_stderr,
                    "method": r.method,
                }
                for lab, r in res.items()
            }
            step_done("per-layer", before)
        elif layerwise:
            report["layerwise"] = None
            report["layerwise_note"] = f"{type(op).__name__} has no parameter groups"

        if landscape is not None:
            phases.start("landscape")
            before = counted.products
            report["landscape"] = landscape_step(
                op,
                evals[kept],
                evecs,
                ndim=landscape,
                span=landscape_span,
                steps=landscape_steps,
                seed=seed,
            )
            step_done("landscape", before)
        if decompose:
            phases.start("decompose")
            report["decompose"] = decompose_section(
                op,
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
            products["decompose"] = sum(report["decompose"]["products"].values())
            phases.done()
    finally:
        phases.close()
    report["products"] = products
    report["seconds"] = dict(phases.seconds)
    report = json_safe(report)
    if out is not None:
        write_report(report, out)
    return report


def check_landscape(op, ndim: Any, span: Any, steps: Any, top_k: int) -> int:
    """``ValueError`` naming the fix unless :func:`analyze` can draw the landscape of ``op``
    with these options (checked before any product); returns the points per axis (default 21
    in 1-D, 15 in 2-D).

    >>> import torch, hessfast
    >>> from hessfast.analyze.analysis import check_landscape
    >>> H = hessfast.HessianOperator(torch.nn.Linear(3, 2), torch.nn.functional.mse_loss,
    ...                              (torch.randn(4, 3), torch.randn(4, 2)))
    >>> check_landscape(H, 2, "auto", None, top_k=5)
    15
    >>> check_landscape(H, 2, "auto", None, top_k=1)
    Traceback (most recent call last):
    ValueError: a 2-D landscape needs the top 2 eigenvectors: top_k >= 2
    """
    from ..landscape import check_span, check_steps
    from ..operators import is_model_operator

    if isinstance(ndim, bool) or ndim not in (1, 2):
        raise ValueError(f"landscape must be 1 or 2 (dimensions of the slice), got {ndim!r}")
    if not is_model_operator(op):
        raise ValueError(
            "the landscape needs the model, loss and data of a HessianOperator or GGNOperator; "
            f"{type(op).__name__} has none"
        )
    if op.process_group is not None:
        raise ValueError(
            "the landscape is evaluated in one process, on the data it is given: run it without "
            "torchrun (or on an operator with process_group=False)"
        )
    if top_k < ndim:
        raise ValueError(f"a {ndim}-D landscape needs the top {ndim} eigenvectors: top_k >= {ndim}")
    check_span(span)
    steps = (21 if ndim == 1 else 15) if steps is None else steps
    check_steps(steps, ndim)
    return steps


def landscape_step(
    op, evals: torch.Tensor, evecs: torch.Tensor, *, ndim: int, span: Any, steps: Any, seed: int
) -> dict[str, Any]:
    """The loss over the data along the top ``ndim`` eigenvectors of ``op`` (computed before:
    ``evals``, ``evecs [P, k]`` as :func:`hessfast.eigsh` returns them; no eigensolver runs
    again) beside the quadratic model ``L₀ + gᵀa + ½ Σ λᵢaᵢ²`` of those eigenvalues (for a GGN:
    the Gauss-Newton model), by :func:`hessfast.landscape.landscape` on ``op``'s model, loss,
    data, parameters and micro-batches: :meth:`hessfast.Landscape.to_dict`.

    >>> import torch, torch.nn.functional as F, hessfast
    >>> from hessfast.analyze.analysis import landscape_step
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> data = (torch.randn(8, 3), torch.arange(8) % 2)
    >>> H = hessfast.HessianOperator(model, F.cross_entropy, data)
    >>> evals, evecs = hessfast.eigsh(H, k=2)
    >>> d = landscape_step(H, evals, evecs, ndim=1, span=0.5, steps=5, seed=0)
    >>> d["coords"], d["eigenvalues"] == [float(evals.max())], d["products"]
    ([[-0.5, -0.25, 0.0, 0.25, 0.5]], True, 0)
    """
    from ..landscape import landscape

    order = torch.argsort(evals, descending=True)[:ndim]
    ls = landscape(
        op.model,
        op.loss_fn,
        op.data,
        "top",
        span,
        steps,
        ndim=ndim,
        eigenpairs=(evals[order], evecs[:, order]),
        curvature="ggn" if op.kind == "GGN" else "hessian",
        seed=seed,
        params=op.params,
        max_batch_size=op.max_batch_size,
        reduction=op.reduction,
        output=op.output,
    )
    return ls.to_dict()


def decompose_section(op, **kwargs: Any) -> dict[str, Any]:
    """``report["decompose"]``: :func:`hessfast.decompose` of the model, loss, data, parameters
    and settings of the Hessian or GGN operator ``op`` (``op`` itself stands for its own part);
    ``kwargs`` go to :func:`hessfast.decompose.decompose_operators`. Raises ``ValueError`` for an
    operator of no model."""
    from ..decompose import decompose_operators
    from ..operator_algebra import operator_options
    from ..operators import GGNOperator, HessianOperator

    if type(op) not in (HessianOperator, GGNOperator):
        raise ValueError(
            f"the decomposition needs a HessianOperator or GGNOperator, not {type(op).__name__}"
        )
    settings = dict(
        max_batch_size=op.max_batch_size,
        progress=op.progress,
        process_group=op.process_group if op.process_group is not None else False,
        backend=op.backend,
        reduction=op.reduction,
        compile=op.compile,
        output=op.output,
        check_deterministic=op.check_deterministic,
        **operator_options(op),
    )
    H, G = (
        op if type(op) is cls else cls(op.model, op.loss_fn, op.data, op.names, **settings)
        for cls in (HessianOperator, GGNOperator)
    )
    return decompose_operators(H, G, **kwargs).to_dict()


def version() -> str:
    """hessfast's version, as the reports record it."""
    from .. import __version__

    return __version__
