"""``hessfast profile``: where one HVP's time and memory go, per rule and per op, and which ops fell
back to ``torch.func`` — the list of rules and kernels worth writing next.

It runs the engine with its profiling hook (``engine.run(..., profiler=...)``): around every node
the device is synchronised and the clock read, so each node's time is its own (the synchronisation
makes the profiled run slower than a plain one: both totals are printed). Per node and phase the
hook reports:

- ``constant``: a node that does not depend on the parameters (evaluated once, no tangents);
- ``forward``: the rule's ``fwd_jvp`` (value, K tangents, residuals);
- ``loss``: the loss rule (gradient and Hessian-vector product at the output);
- ``backward``: the rule's ``bwd_jvp`` (cotangent and its K tangents).

Bytes are those of the distinct tensor storages a rule returned that are not storages of its inputs
(values, tangents and residuals forward; cotangents and their tangents backward): what it allocated
for its results, not its transient workspace. Times are means over ``repeats`` profiled runs after
a warm-up; shares are of the profiled run's total, whose remainder is the interpreter's own
overhead (argument lookup, activity checks, freeing). The per-rule view needs the interpreter
(:mod:`hessfast.traced` replays one graph with no per-node hook), so the unprofiled product is
timed both ways, interleaved: traced (what ``hessfast.hvp`` runs) and interpreted.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import api
from .bench import (
    DTYPES,
    add_common_arguments,
    available_backends,
    backend_context,
    json_safe,
    parse_backends,
    provenance,
    resolve_device,
    tf32,
    threads,
)
from .bench_models import BUILTIN
from .bench_models import build as build_workload
from .rules.fallback import FuncFallback
from .vectors import parse, select_params


@dataclass
class Profiler:
    """The engine's profiling hook: collects ``(step, rule, phase, seconds, nbytes)`` records."""

    device: torch.device
    records: list = field(default_factory=list)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def record(self, step, rule, phase: str, seconds: float, nbytes: int) -> None:
        self.records.append((step, rule, phase, seconds, nbytes))


def rule_name(rule: Any, phase: str) -> str:
    if rule is None:
        return "constant (no derivative)" if phase == "constant" else "?"
    name = getattr(rule, "name", None) or type(rule).__name__
    backend = getattr(rule, "backend", "torch")
    return name if backend == "torch" else f"{name} [{backend}]"


def op_name(step: Any, rule: Any, phase: str) -> str:
    if step is None:
        return f"loss: {rule_name(rule, phase)}"
    return str(step.op)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def profile_workload(w, dev, *, mode="hvp", k=1, repeats=3, backends=None) -> dict:
    """Profile one engine run of ``mode`` on batch 0 of workload ``w``: a dict of tables."""
    if mode not in ("hvp", "ggn", "grad"):
        raise ValueError(f"mode {mode!r}: choose hvp, ggn or grad")
    model, loss_fn = w.model, w.loss_fn
    inputs, targets = w.batches[0]
    selected = select_params(model, None)
    gen = torch.Generator(device=dev).manual_seed(0)
    V = {
        n: torch.randn((k, *p.shape), generator=gen, device=dev, dtype=torch.float32).to(p.dtype)
        for n, p in selected
    }
    vec = parse(V, selected) if mode != "grad" else None

    def compute(profiler=None, compile=None):
        return api.compute(
            model,
            loss_fn,
            inputs,
            targets,
            selected,
            vec,
            mode,
            True,
            profiler=profiler,
            compile=compile,
            grads=mode == "grad",  # as hessfast.hvp: no gradient returned, none computed
        )

    out = {
        "model": w.name,
        "size": w.size,
        "description": w.description,
        "parameters": w.parameters,
        "mode": mode,
        "k": k if mode != "grad" else 0,
        "repeats": repeats,
        "backends": {},
    }
    for b in backends if backends is not None else available_backends(dev):
        with backend_context(b)():
            compute()  # capture, warm-up
            compute()  # trace (a signature's second product, hessfast.traced.TRACE_AFTER)
            compute(compile="interpret")
            _sync(dev)
            plain, interp = [], []
            for _ in range(repeats):  # interleaved: the traced product, then the interpreter
                for c, times in ((None, plain), ("interpret", interp)):
                    _sync(dev)
                    t = time.perf_counter()
                    compute(compile=c)
                    _sync(dev)
                    times.append(time.perf_counter() - t)
            prof = Profiler(dev)
            walls = []
            for _ in range(repeats):
                _sync(dev)
                t = time.perf_counter()
                compute(prof)
                _sync(dev)
                walls.append(time.perf_counter() - t)
        out["backends"][b] = _aggregate(prof.records, repeats, statistics.median(plain), walls)
        out["backends"][b]["seconds_interpreted"] = statistics.median(interp)
    return out


def _aggregate(records, repeats, plain, walls) -> dict:
    total = statistics.mean(walls)
    by_rule: dict = defaultdict(lambda: defaultdict(float))
    by_op: dict = defaultdict(lambda: defaultdict(float))
    fallbacks: dict = defaultdict(lambda: defaultdict(float))
    fb_modules: dict = defaultdict(set)
    by_op_rule: dict = {}
    timed = 0.0
    for step, rule, phase, sec, nbytes in records:
        sec, nbytes = sec / repeats, nbytes / repeats
        timed += sec
        rn, on = rule_name(rule, phase), op_name(step, rule, phase)
        for d, key in ((by_rule, rn), (by_op, on)):
            e = d[key]
            e["seconds"] += sec
            e[phase] += sec
            e["bytes"] += nbytes
            if phase in ("forward", "constant", "loss"):
                e["calls"] += 1 / repeats
        by_op_rule.setdefault(on, set()).add(rn)
        if isinstance(rule, FuncFallback):
            e = fallbacks[on]
            e["seconds"] += sec
            e[phase] += sec
            e["bytes"] += nbytes
            if phase == "forward":
                e["calls"] += 1 / repeats
            fb_modules[on].add(step.module)

    def table(d, extra=None):
        rows = []
        for key, e in d.items():
            row = {
                "name": key,
                "calls": round(e["calls"]),
                "seconds": e["seconds"],
                "forward_seconds": e["forward"] + e["constant"] + e["loss"],
                "backward_seconds": e["backward"],
                "share": e["seconds"] / total if total else None,
                "bytes": int(e["bytes"]),
            }
            if extra:
                row.update(extra(key))
            rows.append(row)
        rows.sort(key=lambda r: -r["seconds"])
        return rows

    fb_rows = table(fallbacks, lambda key: {"modules": sorted(fb_modules[key])})
    return {
        "seconds_unprofiled": plain,
        "seconds_profiled": total,
        "seconds_in_nodes": timed,
        "seconds_overhead": total - timed,
        "by_rule": table(by_rule),
        "by_op": table(by_op, lambda key: {"rules": sorted(by_op_rule[key])}),
        "fallbacks": fb_rows,
        "fallback_share": sum(r["seconds"] for r in fb_rows) / total if total else None,
    }


def _ms(s):
    return f"{s * 1e3:.3f} ms" if s < 0.01 else f"{s * 1e3:.1f} ms"


def _mib(b):
    return f"{b / 2**20:.2f} MiB"


def render(res: dict, prov: dict | None = None) -> str:
    lines = []
    if prov is not None:
        lines.append(
            f"hessfast {prov['hessfast']} (commit {prov['commit']}) on {prov['device']}, "
            f"torch {prov['torch']}, {prov['dtype']}, {prov['date']}"
        )
    what = f"{res['mode']}, K = {res['k']}" if res["mode"] != "grad" else "grad"
    for b, r in res["backends"].items():
        lines.append(
            f"\n## {res['model']} ({res['size']}, {res['parameters']:,} parameters): one {what}, "
            f"backend {b}\n"
        )
        lines.append(
            f"{res['description']}. Unprofiled (medians of {res['repeats']}, interleaved): "
            f"{_ms(r['seconds_unprofiled'])} traced, {_ms(r['seconds_interpreted'])} "
            f"interpreted; profiled (the interpreter, synchronised per node): "
            f"{_ms(r['seconds_profiled'])}, of which {_ms(r['seconds_in_nodes'])} in rules and "
            f"{_ms(r['seconds_overhead'])} ({r['seconds_overhead'] / r['seconds_profiled']:.1%}) "
            "interpreter overhead, which the traced product does not pay. Shares are of the "
            "profiled total."
        )
        lines.append("\n### By rule\n")
        lines.append("| rule | calls | forward | backward | total | share | bytes |")
        lines.append("|---|---|---|---|---|---|---|")
        for x in r["by_rule"]:
            lines.append(
                f"| {x['name']} | {x['calls']} | {_ms(x['forward_seconds'])} | "
                f"{_ms(x['backward_seconds'])} | {_ms(x['seconds'])} | {x['share']:.1%} | "
                f"{_mib(x['bytes'])} |"
            )
        lines.append("\n### By op\n")
        lines.append("| op | rule | calls | forward | backward | total | share | bytes |")
        lines.append("|---|---|---|---|---|---|---|---|")
        for x in r["by_op"]:
            lines.append(
                f"| {x['name']} | {', '.join(x['rules'])} | {x['calls']} | "
                f"{_ms(x['forward_seconds'])} | {_ms(x['backward_seconds'])} | "
                f"{_ms(x['seconds'])} | {x['share']:.1%} | {_mib(x['bytes'])} |"
            )
        fb = r["fallbacks"]
        lines.append(
            f"\n### Ops that fell back to torch.func: {len(fb)}"
            + (f", {r['fallback_share']:.1%} of the time\n" if fb else "\n")
        )
        if fb:
            lines.append("| op | calls | time | share | bytes | modules |")
            lines.append("|---|---|---|---|---|---|")
            for x in fb:
                lines.append(
                    f"| {x['name']} | {x['calls']} | {_ms(x['seconds'])} | {x['share']:.1%} | "
                    f"{_mib(x['bytes'])} | {'; '.join(x['modules'])} |"
                )
        else:
            lines.append("none: every op on the parameter path has a hand-written rule.")
    return "\n".join(lines)


def main(args) -> int:
    dev = resolve_device(args.device)
    size = args.size or ("full" if dev.type == "cuda" else "tiny")
    name = args.model or "mlp"
    if "," in name:
        raise SystemExit("hessfast profile takes one model")
    k = args.k or 1
    repeats = args.repeats or 3
    with threads(args.threads), tf32(bool(args.tf32)):
        prov = provenance(dev, args.dtype)
        w = build_workload(
            name,
            size,
            dev,
            DTYPES[args.dtype],
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            n_batches=1,
        )
        res = profile_workload(
            w,
            dev,
            mode=args.mode,
            k=k,
            repeats=repeats,
            backends=parse_backends(args.backends, dev),
        )
    text = render(res, prov)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(json_safe({"provenance": prov, **res}), indent=1, allow_nan=False) + "\n"
        )
        print(f"\nresults: {args.json}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "profile",
        help="time and bytes per rule and op of one HVP, and the ops that fell back to autograd",
        description="Profile one hessfast HVP (or GGN-VP, or gradient) of a model: time and "
        "bytes per rule and per op, per backend, and the ops that went through the torch.func "
        "fallback with their share of the time.",
    )
    add_common_arguments(p, several_models=False, k=1, repeats=3)
    p.add_argument("--mode", choices=["hvp", "ggn", "grad"], default="hvp")


__all__ = ["Profiler", "profile_workload", "render", "main", "BUILTIN"]
