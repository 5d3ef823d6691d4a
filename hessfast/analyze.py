"""Curvature analysis of a model's loss, with a report: ``hessfast analyze`` and the engine of
``hessfast demo``.

:func:`analyze` takes any curvature operator (a :class:`~hessfast.HessianOperator`,
:class:`~hessfast.GGNOperator`, :class:`~hessfast.DenseOperator`, ...) and computes, each phase
optional:

- the ``top_k`` largest eigenvalues (block Lanczos, :func:`hessfast.eigsh`, ``which="LA"``), with
  their residual norms;
- ``λ_min`` (``eigsh(which="SA", k=1)``, capped at ``min_max_iter`` steps: the bottom of a Hessian
  lies inside a dense bulk; the Ritz value is an upper bound of ``λ_min`` and the report says
  whether it converged) and the condition number over the computed ends, ``λ_max / λ_min``
  (``None`` with a note when ``λ_min ≤ 0``, together with ``|λ_max / λ_min|``);
- the trace (Hutch++, :func:`hessfast.trace`);
- the spectral density (stochastic Lanczos quadrature, :func:`hessfast.spectral_density`);
- per-layer ``λ_max`` and trace (:func:`hessfast.layerwise`, one group per module);
- the outliers: how many of the top eigenvalues separate from the bulk of the spectrum (see
  :func:`count_outliers`), against the number of classes when it is known.

It returns a JSON-ready dict (non-finite numbers become ``None``) and, given ``out``, writes
``report.json`` and ``spectrum.png`` there (:func:`write_report`). :func:`format_summary` turns the
dict into the printed summary.

``hessfast analyze`` (:func:`main`) loads a model and data from ``module:function`` entry points
and runs the same analysis from the command line; exit codes: 0 success, 2 bad input (entry point,
checkpoint, device, shapes), 1 the analysis failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "analyze",
    "count_outliers",
    "write_report",
    "plot_spectrum",
    "format_summary",
    "UsageError",
    "main",
]

LOSSES: dict[str, Callable] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
    "nll": F.nll_loss,
    "bce_with_logits": F.binary_cross_entropy_with_logits,
}
CLASSIFICATION = ("cross_entropy", "nll")
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


class UsageError(ValueError):
    """Bad input to ``hessfast analyze`` (entry point, checkpoint, device, shapes): exit code 2."""


# ---------------------------------------------------------------------------------------------
# small helpers


def _finite(x: Any) -> Any:
    """JSON-safe copy: NumPy scalars and arrays become Python numbers and lists, non-finite floats
    become ``None``."""
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, np.ndarray):
        x = x.tolist()
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


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


class _Counted:
    """The operator, counting the columns it multiplies (and showing them on the phase bar)."""

    def __init__(self, op, phases: _Phases):
        self.op = op
        self.shape = tuple(op.shape)
        self.dtype = op.dtype
        self.device = op.device
        self.products = 0
        self._phases = phases

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        Y = self.op.matmat(V)
        self.products += int(V.shape[1])
        self._phases.products(self.products)
        return Y

    def groups(self, by="module"):
        return self.op.groups(by)


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


# ---------------------------------------------------------------------------------------------
# the analysis


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
    seed: int = 0,
    max_iter: int | None = None,
    min_max_iter: int = 200,
    trace_matvecs: int = 60,
    density_probes: int = 8,
    density_steps: int = 60,
    layer_steps: int = 20,
    layer_trace_probes: int = 16,
    progress: bool = False,
    out: str | os.PathLike | None = None,
    extra: dict | None = None,
) -> dict[str, Any]:
    """Analyse a curvature operator; returns the report as a JSON-ready dict.

    ``op``: anything with ``shape``, ``dtype``, ``device`` and ``matmat`` (per-layer results need
    ``op.groups()``, i.e. a Hessian or GGN operator; with other operators that phase is skipped).
    ``top_k``: how many of the largest eigenvalues (to see the outliers, take more than the
    number of classes). ``classes``: the number of classes, when known, reported next to the
    number of outliers. ``tol``: Lanczos residual tolerance of the top eigenvalues (and of
    ``λ_min``, whose run stops after ``min_max_iter`` steps anyway). ``trace_matvecs``,
    ``density_probes`` × ``density_steps``, ``layer_steps`` and ``layer_trace_probes`` set the
    work of the other phases. ``progress``: a progress bar over the phases. ``extra``: entries
    merged into the report (e.g. how the model was trained). ``out``: a folder to write
    ``report.json`` and ``spectrum.png`` into (see :func:`write_report`).

    >>> import torch, hessfast
    >>> from hessfast.analyze import analyze
    >>> lam = torch.cat([torch.tensor([50.0, 40.0, 30.0]), torch.linspace(-1.0, 1.0, 197)])
    >>> r = analyze(hessfast.DenseOperator(torch.diag(lam).double()), top_k=5, layerwise=False)
    >>> [round(v, 6) for v in r["eigenvalues"]["values"]], r["outliers"]["count"]
    ([50.0, 40.0, 30.0, 1.0, 0.989796], 3)
    >>> round(r["lambda_min"]["value"], 6), r["condition_number"]["value"]
    (-1.0, None)
    """
    from .algorithms import eigsh, spectral_density
    from .algorithms import layerwise as layerwise_fn
    from .algorithms import trace as trace_fn
    from .algorithms.lanczos import check_operator

    P = check_operator(op)
    k = max(1, min(int(top_k), P))
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
    phases = _Phases(names, progress, desc="analysis")
    counted = _Counted(op, phases)
    report: dict[str, Any] = {
        "hessfast_version": _version(),
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
        evals, _, info = eigsh(
            counted,
            k=k,
            which="LA",
            tol=tol,
            seed=seed,
            max_iter=max_iter,
            return_info=True,
            warn=False,
        )
        order = torch.argsort(evals, descending=True)
        report["eigenvalues"] = {
            "which": "largest algebraic",
            "k": k,
            "values": evals[order].tolist(),
            "residuals": info.residuals[order].tolist(),
            "converged": info.converged,
            "tol": tol,
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
    finally:
        phases.close()
    report["products"] = products
    report["seconds"] = dict(phases.seconds)
    report = _finite(report)
    if out is not None:
        write_report(report, out)
    return report


def _version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------------------------------------
# files


REPORT_FILES = ("report.json", "spectrum.png")


def check_out_folder(out: str | os.PathLike, flag: str = "--out") -> None:
    """``UsageError`` unless :func:`write_report` can write into the folder ``out``: it is a
    folder or can be created as one, and the first existing folder on its path takes a new file
    (tried with a temporary file, which works as root and on read-only file systems alike). Run
    before the analysis, so that a bad ``--out`` fails in a second rather than after it."""
    import tempfile

    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise UsageError(
            f"{flag} {out}: is an existing file; the report goes into a folder "
            f"({', '.join(REPORT_FILES)}): give a folder name"
        )
    for name in REPORT_FILES:
        if (folder / name).is_dir():
            raise UsageError(f"{flag} {out}: {folder / name} is a folder; cannot write the report")
    base = folder
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise UsageError(f"{flag} {out}: {base} is a file, so the folder cannot be created")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {out}: cannot write into {base} ({e.strerror or e})") from None


def write_report(report: dict, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``report.json`` and ``spectrum.png`` into the folder ``out`` (created if needed);
    record their paths in ``report["files"]`` and return them. Each file is written under a
    temporary name and renamed at the end, so an interrupted run leaves no partial report."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    js, png = folder / "report.json", folder / "spectrum.png"
    report["files"] = {"report": str(js), "spectrum": str(png)}
    tmp_js, tmp_png = folder / ".report.json.partial", folder / ".spectrum.partial.png"
    try:
        plot_spectrum(report, tmp_png)
        tmp_js.write_text(json.dumps(_finite(report), indent=1, allow_nan=False) + "\n")
        os.replace(tmp_png, png)
        os.replace(tmp_js, js)
    finally:
        for t in (tmp_js, tmp_png):
            t.unlink(missing_ok=True)
    return js, png


def plot_spectrum(report: dict, path: str | os.PathLike) -> Path:
    """``spectrum.png``: the spectral density on a log scale with the outliers marked (red) and the
    other computed top eigenvalues as ticks; without a density, the top eigenvalues by rank."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is a dependency
        raise ImportError("the spectrum plot needs matplotlib: pip install matplotlib") from e
    top = report.get("eigenvalues", {}).get("values", [])
    outl = report.get("outliers", {}) or {}
    n_out = int(outl.get("count") or 0)
    kind = report.get("operator", {}).get("kind", "Hessian")
    P = report.get("operator", {}).get("size")
    fig = Figure(figsize=(7.5, 4.2), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    dens = report.get("density")
    if dens:
        x = np.asarray(dens["grid"], dtype=np.float64)
        y = np.asarray(dens["values"], dtype=np.float64)
        top_y = float(y.max()) if y.size and y.max() > 0 else 1.0
        floor = top_y * 1e-12
        ax.set_yscale("log")
        ax.set_ylim(floor, top_y * 3)
        ax.plot(x, np.maximum(y, floor), color="C0", lw=1.2, label="spectral density (SLQ)")
        for i, v in enumerate(top):
            is_out = i < n_out
            ax.axvline(
                v,
                color="C3" if is_out else "0.6",
                ls="--" if is_out else ":",
                lw=0.9 if is_out else 0.6,
                label=(f"{n_out} outliers" if is_out and i == 0 else None)
                if is_out
                else ("other top eigenvalues" if i == n_out else None),
            )
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density (log scale)")
    else:
        idx = np.arange(1, len(top) + 1)
        if n_out:
            ax.scatter(idx[:n_out], top[:n_out], color="C3", s=18, label=f"{n_out} outliers")
        if n_out < len(top):
            ax.scatter(idx[n_out:], top[n_out:], color="C0", s=18, label="top eigenvalues")
        ax.set_xlabel("rank")
        ax.set_ylabel("eigenvalue")
        if top and min(top) > 0:
            ax.set_yscale("log")
    title = f"{kind} spectrum" + (f", P = {P:,}" if P else "")
    if top:
        title += f": {n_out} outlier{'s' if n_out != 1 else ''}"
        if report.get("classes"):
            title += f" ({report['classes']} classes)"
    ax.set_title(title, fontsize=10)
    if top:
        ax.legend(loc="best", fontsize=8, framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


# ---------------------------------------------------------------------------------------------
# the printed summary


def _g(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def _wrap(text: str, indent: str, width: int = 100) -> list[str]:
    import textwrap

    return textwrap.wrap(
        text, width=width, subsequent_indent=indent, break_on_hyphens=False, drop_whitespace=True
    )


def format_summary(report: dict) -> str:
    """The analysis part of the printed summary (indented lines)."""
    lines = []
    op = report.get("operator", {})
    P = op.get("size", 0)
    kind = op.get("kind", "Hessian")
    lines.append(f"{kind} of the loss ({P:,} x {P:,}), {op.get('dtype')} on {op.get('device')}:")
    ev = report.get("eigenvalues")
    outl = report.get("outliers") or {}
    n = int(outl.get("count") or 0)
    if ev:
        vals = ev["values"]
        shown = [_g(v) for v in vals]
        if 0 < n < len(shown):
            shown.insert(n, "|")
        status = "converged" if ev["converged"] else f"NOT converged to tol {ev['tol']:g}"
        lines += _wrap(f"  top {len(vals)} eigenvalues: {' '.join(shown)}", "    ")
        lines.append(f"    ({ev['products']} Hessian-vector products, {status})")
        classes = outl.get("classes")
        what = f"{n} eigenvalue{'s' if n != 1 else ''}"
        if outl.get("at_least"):
            what = f"at least {n} eigenvalues (all computed; raise top-k)"
        line = (
            f"  {what} separate{'s' if n == 1 and not outl.get('at_least') else ''} from the bulk"
        )
        if classes:
            line += f" ({classes} classes)"
        if n and outl.get("bulk_edge") is not None:
            line += (
                f": smallest outlier {_g(outl['values'][-1])}, bulk edge {_g(outl['bulk_edge'])}"
            )
        lines += _wrap(line, "    ")
    lmax = report.get("lambda_max")
    lmin = report.get("lambda_min")
    if lmax:
        s = f"  lambda_max = {_g(lmax['value'], 6)}"
        if lmin:
            bound = "" if lmin["converged"] else " (not converged: an upper bound)"
            s += f", lambda_min = {_g(lmin['value'], 6)}{bound}"
        lines.append(s)
    cond = report.get("condition_number")
    if cond:
        if cond.get("value") is not None:
            lines.append(f"  condition number lambda_max / lambda_min = {_g(cond['value'], 6)}")
        else:
            r = cond.get("ratio_of_ends")
            lines += _wrap(
                "  condition number: inf (indefinite: lambda_min <= 0)"
                + (f"; |lambda_max / lambda_min| = {_g(r)}" if r is not None else ""),
                "    ",
            )
    tr = report.get("trace")
    if tr:
        err = f" +- {_g(tr['stderr'], 2)}" if tr.get("stderr") else ""
        lines.append(
            f"  trace = {_g(tr['estimate'], 6)}{err} ({tr['method']}, {tr['num_matvecs']} products;"
            f" {_g(tr['per_parameter'], 3)} per parameter)"
        )
    d = report.get("density")
    if d:
        so = ", ".join(_g(o["value"]) for o in d["outliers"][:12]) or "none"
        lines += _wrap(
            f"  spectral density: {d['num_probes']} probes x {d['lanczos_steps']} Lanczos steps, "
            f"range [{_g(d['lambda_min'])}, {_g(d['lambda_max'])}]; peaks apart from the bulk at {so}",
            "    ",
        )
    lw = report.get("layerwise")
    if lw:
        w = max(8, *(len(k) for k in lw))
        lines.append(
            f"  per layer:  {'module':<{w}} {'params':>10} {'lambda_max':>11} {'trace':>11}"
        )
        for lab, r in lw.items():
            lines.append(
                f"              {lab:<{w}} {r['size']:>10,} {_g(r['lambda_max']):>11} "
                f"{_g(r['trace']):>11}"
            )
    secs = report.get("seconds") or {}
    if secs:
        lines += _wrap("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()), "    ")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# hessfast analyze: entry points, checks, the command


def _distributed_hooks() -> tuple[Callable[[Any], Any], bool, bool]:
    """``torchrun`` support: ``(shard, is_main, distributed)``.

    Initialises the default process group from torchrun's environment variables
    (:func:`hessfast.distributed.init_from_env`; nothing happens in a plain run). In a distributed
    job each rank keeps its shard of the data (:func:`hessfast.distributed.shard`), the operators
    sum the ranks' products (one all-reduce per product), every rank computes the same report, and
    only the main process writes and prints it. Outside one: the identity, ``True``, ``False``.
    """
    from . import distributed as hd

    hd.init_from_env()
    if hd.is_initialized():
        return hd.shard, hd.is_main_process(), True
    return (lambda data: data), True, False


def load_entry_point(spec: str, flag: str) -> Callable:
    """``module:function`` or ``path/to/file.py:function`` to the function; ``UsageError`` with the
    reason otherwise. The current directory is importable, as with ``python -m``."""
    from .bench_models import load_function

    mod, sep, fn = spec.rpartition(":")
    if not sep or not mod or not fn:
        raise UsageError(f"{flag} {spec!r}: give module:function or path/to/file.py:function")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return load_function(spec)
    except ModuleNotFoundError as e:
        raise UsageError(f"{flag} {spec!r}: cannot import {mod} ({e})") from e
    except ValueError as e:
        raise UsageError(f"{flag} {e}") from e
    except Exception as e:  # an error while importing the user's module
        raise UsageError(f"{flag} {spec!r}: importing {mod} failed: {type(e).__name__}: {e}") from e


def _call(fn: Callable, spec: str, flag: str) -> Any:
    try:
        return fn()
    except Exception as e:
        raise UsageError(f"{flag} {spec!r}: {fn.__name__}() raised {type(e).__name__}: {e}") from e


def resolve_device(name: str) -> torch.device:
    """The torch device ``name``, or ``UsageError`` when it does not exist on this machine."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"--device {name}: not a torch device ({e})") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: torch sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UsageError(f"--device {name}: torch sees no MPS device")
    elif dev.type != "cpu":
        try:
            torch.empty(1, device=dev)
        except Exception as e:
            raise UsageError(f"--device {name}: not usable here ({e})") from e
    return dev


def resolve_loss(spec: str) -> Callable:
    if spec in LOSSES:
        return LOSSES[spec]
    if ":" in spec:
        return load_entry_point(spec, "--loss")
    raise UsageError(
        f"--loss {spec!r}: one of {', '.join(LOSSES)}, or module:function (output, targets) -> loss"
    )


def _cast(x: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, dtype) if x.is_floating_point() else x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_cast(t, device, dtype) for t in x)
    return x


class CastBatches:
    """A re-iterable view of ``(inputs, targets)`` batches moved to ``device`` (floating tensors
    also cast to ``dtype``) as they are read; one-shot iterators are read once into a list."""

    def __init__(self, data: Iterable, device: torch.device, dtype: torch.dtype):
        if iter(data) is data:  # a generator or iterator: it could be read only once
            data = list(data)
        self.data = data
        self.device, self.dtype = device, dtype

    def __iter__(self):
        for batch in self.data:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise UsageError(
                    "--data: each batch must be an (inputs, targets) pair, got "
                    + (
                        f"{len(batch)} items"
                        if isinstance(batch, (tuple, list))
                        else type(batch).__name__
                    )
                )
            yield _cast(tuple(batch), self.device, self.dtype)

    def __len__(self) -> int:
        return len(self.data)


def _shape(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return str(list(x.shape))
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(_shape(t) for t in x) + ")"
    return type(x).__name__


def check_model_data(
    model: nn.Module,
    loss_fn: Callable,
    data: Iterable,
    loss_name: str,
    allow_empty: bool = False,
):
    """One forward pass and one loss on the first batch (no gradients); ``UsageError`` naming the
    shapes when the model does not take the inputs or the loss does not take its output and the
    targets. Returns ``(output_shape or None, number of batches or None)``."""
    try:
        first = next(iter(data))
    except StopIteration:
        if allow_empty:
            return None, 0
        raise UsageError("--data: the data is empty (no batch)") from None
    inputs, targets = first
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    with torch.no_grad():
        try:
            out = model(*args)
        except Exception as e:
            raise UsageError(
                f"shape mismatch: the model does not accept the data's inputs of shape "
                f"{_shape(inputs)}: {type(e).__name__}: {e}"
            ) from e
        if not isinstance(out, torch.Tensor):
            raise UsageError(
                f"the model returns {type(out).__name__}, not one tensor: wrap it so that forward "
                "returns the logits"
            )
        try:
            loss = loss_fn(out, targets)
        except Exception as e:
            raise UsageError(
                f"shape mismatch: the loss {loss_name} does not take the model's output of shape "
                f"{list(out.shape)} with targets of shape {_shape(targets)}: "
                f"{type(e).__name__}: {e}"
            ) from e
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
        raise UsageError(
            f"the loss {loss_name} returned {_shape(loss)}, not a scalar: use reduction='mean'"
        )
    try:
        nb = len(data)  # type: ignore[arg-type]
    except TypeError:
        nb = None
    return tuple(out.shape), nb


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a state dict (or a dict holding one under ``state_dict`` / ``model_state_dict`` /
    ``model``) into ``model``; ``UsageError`` for a missing file or keys that do not match."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--checkpoint {path}: no such file")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--checkpoint {path}: cannot load it: {type(e).__name__}: {e}") from e
    if isinstance(state, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"--checkpoint {path}: not a state dict of tensors")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {list(state[k].shape)} vs {list(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:

        def few(xs):
            return ", ".join(xs[:5]) + (f", ... ({len(xs)} in all)" if len(xs) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches (checkpoint vs model): {few(shapes)}")
        raise UsageError(f"--checkpoint {path} does not match the model: " + "; ".join(parts))
    model.load_state_dict(state)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "analyze",
        help="Hessian / GGN analysis of your model on your data, with report.json and spectrum.png",
        description="Top eigenvalues, lambda_min, condition number, trace, spectral density and "
        "per-layer curvature of a model's loss over a dataset. Exit code 0 on success, 2 for bad "
        "input (entry point, checkpoint, device, shapes), 1 when the analysis fails.",
    )
    p.add_argument("--model", required=True, help="module:function (or file.py:function) -> model")
    p.add_argument(
        "--data",
        required=True,
        help="module:function (or file.py:function) -> iterable of (inputs, targets) batches",
    )
    p.add_argument(
        "--loss",
        default="cross_entropy",
        help=f"{', '.join(LOSSES)} or module:function (default: cross_entropy)",
    )
    p.add_argument("--checkpoint", default=None, help="a state dict to load into the model")
    p.add_argument(
        "--params", default=None, help="glob pattern(s), comma-separated, of the parameters"
    )
    p.add_argument("--curvature", choices=["hessian", "ggn"], default="hessian")
    p.add_argument("--top-k", type=int, default=20, help="top eigenvalues (default: 20)")
    p.add_argument("--density", action="store_true", help="the spectral density (SLQ)")
    p.add_argument("--trace", action="store_true", help="the trace (Hutch++)")
    p.add_argument("--layerwise", action="store_true", help="per-module lambda_max and trace")
    p.add_argument("--no-lambda-min", action="store_true", help="skip lambda_min")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--max-batch-size", type=int, default=None, help="micro-batch size")
    p.add_argument(
        "--train-mode",
        action="store_true",
        help="keep the model in training mode (BatchNorm batch statistics; default: eval mode)",
    )
    p.add_argument("--tol", type=float, default=1e-5, help="Lanczos tolerance (default: 1e-5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="hessfast-analysis", help="output folder")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bars (none when not a terminal)"
    )
    return p


def _prepare(args) -> tuple[Any, dict]:
    """Everything up to the operator, every bad input turned into a ``UsageError``."""
    from .operators import GGNOperator, HessianOperator

    dev = resolve_device(args.device)
    dtype = DTYPES[args.dtype]
    if args.top_k < 1:
        raise UsageError(f"--top-k must be at least 1, got {args.top_k}")
    if args.max_batch_size is not None and args.max_batch_size < 1:
        raise UsageError(f"--max-batch-size must be at least 1, got {args.max_batch_size}")
    build = load_entry_point(args.model, "--model")
    get_data = load_entry_point(args.data, "--data")
    loss_fn = resolve_loss(args.loss)
    model = _call(build, args.model, "--model")
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"--model {args.model!r}: returned {type(model).__name__}, not a torch.nn.Module"
        )
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint)
    model = model.to(dev, dtype)
    if not args.train_mode:
        model.eval()
    raw = _call(get_data, args.data, "--data")
    if not (_is_pair(raw) or isinstance(raw, Iterable)):
        raise UsageError(
            f"--data {args.data!r}: returned {type(raw).__name__}, not an iterable of "
            "(inputs, targets) batches"
        )
    shard, is_main, distributed = _distributed_hooks()
    raw = shard(raw)
    if _is_pair(raw):
        raw = [raw]
    data = CastBatches(raw, dev, dtype)
    # a rank may hold no batch in a distributed job (the operator allows it)
    out_shape, n_batches = check_model_data(
        model, loss_fn, data, args.loss, allow_empty=distributed
    )
    params = [s.strip() for s in args.params.split(",") if s.strip()] if args.params else None
    cls = GGNOperator if args.curvature == "ggn" else HessianOperator
    try:
        op = cls(
            model,
            loss_fn,
            data,
            params=params,
            max_batch_size=args.max_batch_size,
            progress=_progress(args) and (n_batches or 2) > 1,
        )
    except ValueError as e:
        raise UsageError(str(e)) from e
    classes = (
        out_shape[-1]
        if out_shape is not None and args.loss in CLASSIFICATION and len(out_shape) >= 2
        else None
    )
    meta = {
        "command": "analyze",
        "argv": list(getattr(args, "argv", []) or []),
        "model": {
            "entry_point": args.model,
            "class": type(model).__name__,
            "checkpoint": args.checkpoint,
            "parameters": sum(p.numel() for p in model.parameters()),
            "analysed_parameters": op.shape[0],
            "params": params,
            "mode": "train" if args.train_mode else "eval",
            "output_shape": list(out_shape) if out_shape is not None else None,
        },
        "data": {"entry_point": args.data, "batches": n_batches},
        "loss": args.loss,
        "curvature": args.curvature,
        "world_size": torch.distributed.get_world_size() if distributed else 1,
        "_classes": classes,
        "_is_main": is_main,
    }
    return op, meta


def _progress(args) -> bool:
    """Progress bars unless ``--no-progress`` or stderr is not a terminal (a log file)."""
    return not args.no_progress and sys.stderr.isatty()


def _is_pair(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], torch.Tensor)


def main(args) -> int:
    """``hessfast analyze`` with parsed ``args``; returns the exit code."""
    t0 = time.perf_counter()
    try:
        check_out_folder(args.out)
        op, meta = _prepare(args)
    except UsageError as e:
        print(f"hessfast analyze: error: {e}", file=sys.stderr)
        return 2
    classes = meta.pop("_classes")
    is_main = meta.pop("_is_main")
    try:
        report = analyze(
            op,
            top_k=args.top_k,
            lambda_min=not args.no_lambda_min,
            trace=args.trace,
            density=args.density,
            layerwise=args.layerwise,
            classes=classes,
            tol=args.tol,
            seed=args.seed,
            progress=_progress(args),
            extra=meta,
        )
    except UsageError as e:
        print(f"hessfast analyze: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        print(f"hessfast analyze: the analysis failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if not is_main:
        return 0
    try:
        js, png = write_report(report, args.out)
    except OSError as e:
        print(f"hessfast analyze: cannot write the report to {args.out}: {e}", file=sys.stderr)
        return 1
    m = meta["model"]
    print(f"hessfast {_version()} analyze: {m['entry_point']} on {args.data} ({args.loss})")
    print(
        f"  model: {m['class']}, {m['parameters']:,} parameters ({m['analysed_parameters']:,} "
        f"analysed), {m['mode']} mode; {op.device}, {args.dtype}"
    )
    print(format_summary(report))
    print(f"  wrote {js} and {png} ({time.perf_counter() - t0:.1f} s in all)")
    return 0
