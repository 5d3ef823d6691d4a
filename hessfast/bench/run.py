"""The run of one workload: each method checked and warmed up, then interleaved timed rounds."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from .methods import Method, build_methods
from .reference import default_tolerance, reference, reference_dtype, rel_error
from .timing import (
    collect_garbage,
    describe_error,
    free_memory,
    peak_call,
    tf32,
    timed_call,
)
from .workloads import Workload, autograd_loss, needs_flatten, probe


def prepare_method(
    m: Method, refs: dict, names: list[str], n_batches: int, dev, tol: float
) -> dict:
    """A method's row before timing: its first call on batch 0, checked against the reference,
    then a warm-up call that measures peak memory; both together are ``first_call_seconds``
    (tracing — on a signature's second product — and compiling happen there). A method that
    raises is a row with its error."""
    row: dict[str, Any] = {
        "method": m.label,
        "family": m.family,
        "backend": m.backend,
        "kind": m.kind,
        "vectors": m.vectors,
        "hessfast": m.hessfast,
    }
    if m.unavailable is not None:
        row.update(status="unavailable", error=m.unavailable)
        return row
    try:
        first, out = timed_call(lambda: m.fn(0), dev)
        err = rel_error(out, refs[m.kind], names, m.kind == "hvpK")
        del out
        row["first_call_seconds"] = first
        row["rel_err"] = err if math.isfinite(err) else None
        row["tolerance"] = tol
        if math.isfinite(err) and err <= tol:
            row["status"] = "pass"
        else:
            row["status"] = "fail"
            row["error"] = (
                f"relative error {err:.2e} exceeds the tolerance {tol:g}"
                if math.isfinite(err)
                else "non-finite or missing result"
            )
        t0 = time.perf_counter()
        peak, out = peak_call(lambda: m.fn(1 % n_batches), dev)
        del out
        row["first_call_seconds"] += time.perf_counter() - t0
        row.update(peak_bytes=peak, times=[])
    except Exception as e:  # a failing method is a result, not a crash
        row.update(status="error", error=describe_error(e))
        row.pop("rel_err", None)
    finally:
        free_memory(dev)
    return row


def time_rounds(methods: list[Method], rows: list[dict], n_batches: int, dev, repeats: int) -> None:
    """``repeats`` interleaved rounds: each runnable method once per round, inputs rotated; the
    medians go into the rows. A method that raises while timed becomes an error row. The
    garbage of the preparation is collected first, not inside a timed call."""
    live = [i for i, r in enumerate(rows) if "times" in r]
    collect_garbage()
    for r in range(repeats):
        b = (r + 2) % n_batches
        for i in live:
            row = rows[i]
            if row["status"] == "error":
                continue
            try:
                t, out = timed_call(lambda b=b: methods[i].fn(b), dev)
                del out
                row["times"].append(t)
            except Exception as e:
                row.update(status="error", error=describe_error(e))
                row.pop("times", None)
    for i in live:
        row = rows[i]
        if row.get("times"):
            med = statistics.median(row["times"])
            row.update(seconds=med, seconds_per_vector=med / methods[i].vectors)
    free_memory(dev)


def bench_workload(
    w: Workload,
    dev: torch.device,
    *,
    k: int = 8,
    repeats: int = 5,
    compile: bool = False,
    tol: float | None = None,
    use_tf32: bool = False,
    backends: list[str] | None = None,
    peers: bool = True,
    log: Callable[[str], None] | None = None,
    modes: list[str] | None = None,
) -> dict:
    """Benchmark one workload; returns its result record (``rows`` in table order)."""
    dtype = next(w.model.parameters()).dtype
    tol = tol if tol is not None else default_tolerance(dtype, use_tf32 and dev.type == "cuda")
    names = [n for n, p in w.model.named_parameters() if p.requires_grad]
    x0, y0 = w.batches[0]
    out_shape, uses_sdpa = probe(w.model, x0)
    lf = autograd_loss(w.loss_fn, out_shape, y0)
    flatten = needs_flatten(w.loss_fn, out_shape, y0)
    gen = torch.Generator(device=dev).manual_seed(0)
    named = dict(w.model.named_parameters())
    V = {
        n: torch.randn((k, *named[n].shape), generator=gen, device=dev, dtype=torch.float32).to(
            dtype
        )
        for n in names
    }
    ref_dtype = reference_dtype(dev, dtype)
    t0 = time.perf_counter()
    refs, ref_how = reference(w, V, names, lf, ref_dtype)
    ref_seconds = time.perf_counter() - t0
    if log:
        log(f"  reference ({ref_how}): {ref_seconds:.1f} s")
    free_memory(dev)
    methods = build_methods(
        w,
        V,
        names,
        lf,
        uses_sdpa,
        flatten,
        k,
        compile=compile,
        backends=backends,
        dev=dev,
        peers=peers,
        modes=modes,
    )
    rows = []
    with tf32(use_tf32):
        for m in methods:
            t0 = time.perf_counter()
            rows.append(prepare_method(m, refs, names, len(w.batches), dev, tol))
            if log:
                log(f"{_row_log(rows[-1])} [{time.perf_counter() - t0:.1f} s]")
        time_rounds(methods, rows, len(w.batches), dev, repeats)
    if compile:
        torch._dynamo.reset()
    base = next(
        (r.get("seconds") for r in rows if r["method"] == "gradient (autograd)"),
        None,
    )
    for r in rows:
        if base and r.get("seconds_per_vector") is not None:
            r["ratio_to_gradient"] = r["seconds_per_vector"] / base
    del refs, V
    free_memory(dev)
    return {
        "model": w.name,
        "size": w.size,
        "description": w.description,
        "parameters": w.parameters,
        "dtype": str(dtype).replace("torch.", ""),
        "k": k,
        "repeats": repeats,
        "batches": len(w.batches),
        "uses_sdpa": uses_sdpa,
        "reference": f"{ref_how}, {str(ref_dtype).replace('torch.', '')} copy of the model, "
        "math SDPA backend, TF32 off, batch 0",
        "reference_seconds": ref_seconds,
        "tolerance": tol,
        "rows": rows,
    }


def _row_log(r: dict) -> str:
    if "first_call_seconds" in r:
        return f"  {r['method']}: first call {r['first_call_seconds']:.2f} s, {r['status']}"
    return f"  {r['method']}: {r['status']} ({r.get('error', '')})"
