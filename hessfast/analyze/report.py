"""The report of an analysis: ``report.json``, ``spectrum.png`` and, with a landscape,
``landscape_1d.png`` or ``landscape_2d.png`` in a folder (checked before the analysis runs), and
the printed summary."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .entry import UsageError


def json_safe(x: Any) -> Any:
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
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


REPORT_FILES = ("report.json", "spectrum.png")
LANDSCAPE_FILES = ("landscape_1d.png", "landscape_2d.png")


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
    for name in REPORT_FILES + LANDSCAPE_FILES + ("decomposition.png",):
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
    """Write ``report.json`` and ``spectrum.png`` into the folder ``out`` (created if needed),
    and ``landscape_1d.png`` / ``landscape_2d.png`` when the report has a ``"landscape"``
    section (drawn from it by :meth:`hessfast.Landscape.plot`); record their paths in
    ``report["files"]`` (the landscape's also by name in ``report["landscape"]["files"]``) and
    return the first two. Each file is written under a temporary name and renamed at the end,
    so an interrupted run leaves no partial report."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    js, png = folder / "report.json", folder / "spectrum.png"
    report["files"] = {"report": str(js), "spectrum": str(png)}
    tmp_js, tmp_png = folder / ".report.json.partial", folder / ".spectrum.partial.png"
    moves = [(tmp_png, png)]
    land = report.get("landscape")
    if land:
        name = f"landscape_{land['ndim']}d.png"
        moves.append((folder / ".landscape.partial.png", folder / name))
        report["files"]["landscape"] = str(folder / name)
        land["files"] = {"png": name}
    dec = report.get("decompose")
    if dec:
        moves.append((folder / ".decomposition.partial.png", folder / "decomposition.png"))
        report["files"]["decomposition"] = str(folder / "decomposition.png")
    try:
        plot_spectrum(report, tmp_png)
        if land:
            from ..landscape import Landscape

            Landscape.from_dict(land).plot(moves[1][0])
        if dec:
            from ..decompose import plot_decomposition

            plot_decomposition(dec, moves[-1][0])
        tmp_js.write_text(json.dumps(json_safe(report), indent=1, allow_nan=False) + "\n")
        for tmp, final in moves:
            os.replace(tmp, final)
        os.replace(tmp_js, js)
    finally:
        for t in [tmp_js] + [tmp for tmp, _ in moves]:
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
        if ev.get("criterion") == "eigenvalue":  # the default, "residual", goes unsaid
            status += " on the eigenvalue error bound"
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
    land = report.get("landscape")
    if land:
        lines += _landscape_lines(land)
    if report.get("decompose"):
        lines += format_decompose(report["decompose"])
    secs = report.get("seconds") or {}
    if secs:
        lines += _wrap("  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()), "    ")
    return "\n".join(lines)


def _landscape_lines(land: dict) -> list[str]:
    """The landscape's lines of the summary: where the loss and its quadratic model stand at
    the ends of the slice (1-D) or how far apart they get on the grid (2-D)."""
    op = land.get("operator", "Hessian")
    model = "Gauss-Newton model" if op == "GGN" else "quadratic model"
    lams = ", ".join(_g(v) for v in land.get("eigenvalues") or [])
    c = land["coords"]
    rng = f"[{_g(c[0][0], 3)}, {_g(c[0][-1], 3)}]"
    if land["ndim"] == 1:
        loss, quad = land["loss"], land["quadratic"]
        text = (
            f"  landscape along the top {op} eigenvector, t in {rng} ({len(c[0])} points): loss "
            f"{_g(land['loss0'])} at t = 0, {_g(loss[0])} and {_g(loss[-1])} at the ends, where "
            f"the {model} L0 + g t + 1/2 lambda t^2 (lambda = {lams}) gives {_g(quad[0])} and "
            f"{_g(quad[-1])}"
        )
    else:
        pairs = [
            (a, b)
            for ra, rb in zip(land["loss"], land["quadratic"])
            for a, b in zip(ra, rb)
            if a is not None and b is not None
        ]
        top = max((a for a, _ in pairs), default=None)
        gap = max((abs(a - b) for a, b in pairs), default=None)
        text = (
            f"  landscape on the top 2 {op} eigenvectors, {rng} x [{_g(c[1][0], 3)}, "
            f"{_g(c[1][-1], 3)}] ({len(c[0])} x {len(c[1])} points): loss {_g(land['loss0'])} "
            f"at the centre, up to {_g(top)}; the {model} (lambda = {lams}) is off by up to "
            f"{_g(gap)}"
        )
    return _wrap(text, "    ")


def format_decompose(dec: dict) -> list[str]:
    """The summary lines of ``report["decompose"]`` (the Gauss-Newton decomposition)."""
    how = (
        "one pass per product"
        if dec["residual_operator"] == "ResidualOperator"
        else "H and G products"
    )
    lines = [f"  Gauss-Newton decomposition H = G + R (R: {dec['residual_operator']}, {how}):"]
    for part, name in (("hessian", "H"), ("ggn", "G"), ("residual", "R")):
        vals = " ".join(_g(v) for v in dec["eigenvalues"][part])
        n = dec["outliers"][part]["count"]
        lines += _wrap(f"    top {name}: {vals} ({n} outlier{'s' if n != 1 else ''})", "      ")
    lm = dec["lambda_min"]
    lines.append(
        f"    lambda_min: H {_g(lm['hessian']['value'], 6)}, R {_g(lm['residual']['value'], 6)}"
        + ("" if all(v["converged"] for v in lm.values()) else " (not all converged)")
    )
    tr = {p: dec["trace"][p]["estimate"] for p in ("hessian", "ggn", "residual")}
    lines.append(
        f"    trace: H {_g(tr['hessian'], 6)} = G {_g(tr['ggn'], 6)} + R {_g(tr['residual'], 6)}"
        + (
            " (exact)"
            if dec["trace"]["hessian"]["method"] == "exact"
            else f" (one set of {dec['trace']['hessian']['method']} probes for all three)"
        )
    )
    lines.append(
        f"    overlap of the top-{dec['k']} eigenspaces of H and G: {_g(dec['overlap'], 4)}"
    )
    return lines
