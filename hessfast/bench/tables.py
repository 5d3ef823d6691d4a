"""Rendering: the Markdown tables ``hessfast bench`` prints, the JSON-safe record, its path."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any


def _ms(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 0.01 else f"{s * 1e3:.1f} ms"


def _first(s: float | None) -> str:
    return "" if s is None else (f"{s:.2f} s" if s >= 0.1 else _ms(s))


def _mem(b: int | None) -> str:
    if b is None:
        return "n/a"
    return f"{b / 2**20:.1f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def render(results: list[dict], prov: dict | None = None) -> str:
    """Markdown: a header line with the provenance, then one table per model."""
    lines = []
    if prov is not None:
        lines.append(
            f"hessfast {prov['hessfast']} (commit {prov['commit']}) on {prov['device']} "
            f"({prov['device_type']}, {prov['cpu_threads']} CPU threads), torch {prov['torch']}, "
            f"CUDA {prov['cuda']}, Triton {prov['triton']}, {prov['dtype']}, "
            f"TF32 {'on' if prov['tf32_requested'] else 'off'}, {prov['date']}"
        )
    for res in results:
        lines.append(
            f"\n### {res['model']} ({res['size']}, {res['parameters']:,} parameters, "
            f"{res['dtype']})\n"
        )
        lines.append(
            f"{res['description'].rstrip('.')}. K = {res['k']}; median of {res['repeats']} "
            f"interleaved rounds after a warm-up, {res['batches']} input batches rotated; "
            "first calls: the checked call and the warm-up, where tracing and compiling "
            "happen. Reference: "
            f"{res['reference']}; tolerance {res['tolerance']:g}.\n"
        )
        lines.append(
            "| method | vectors | time / vector | × gradient | peak memory | max rel. error "
            "| check | first calls |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        notes = []
        for r in res["rows"]:
            st = r["status"]
            if st == "unavailable":
                lines.append(f"| {r['method']} | {r['vectors']} | {r['error']} | | | | — | |")
                continue
            if st == "error":
                notes.append(f"{r['method']}: {r['error']}")
                lines.append(
                    f"| {r['method']} | {r['vectors']} | **fails** ({len(notes)}) | | | | **error** | |"
                )
                continue
            err = f"{r['rel_err']:.1e}" if r.get("rel_err") is not None else "non-finite"
            ratio = r.get("ratio_to_gradient")
            check = "ok" if st == "pass" else "**WRONG**"
            lines.append(
                f"| {r['method']} | {r['vectors']} | {_ms(r['seconds_per_vector'])} | "
                f"{f'{ratio:.2f}' if ratio is not None else 'n/a'} | {_mem(r.get('peak_bytes'))} | "
                f"{err} | {check} | {_first(r.get('first_call_seconds'))} |"
            )
        if notes:
            lines += ["", "Failures:", *[f"{i + 1}. {n}" for i, n in enumerate(notes)]]
    return "\n".join(lines)


def json_safe(x: Any) -> Any:
    """JSON-safe: non-finite floats become ``None``."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def default_json_path(models: list[str], size: str) -> Path:
    tag = "+".join(re.sub(r"[^A-Za-z0-9_.-]+", "-", m).strip("-") for m in models)
    return Path("benchmarks") / "out" / f"bench-{tag}-{size}.json"
