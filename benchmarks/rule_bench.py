"""Shared harness of the per-rule benchmarks ``benchmarks/bench_<op>.py``: one op call, four ways.

For each case ``(label, op, build, active)`` (``build(device, dtype) -> args`` in schema order,
``active`` as in the rule tests; an optional fifth element is a zero-argument factory of a context
manager that every method of the case runs inside, e.g. the math SDPA backend) it times, in one
process on one device, with K tangent vectors:

- ``primal``: the op alone, ``invoke(op, args)``;
- ``rule hvp``: the hand-written rule, ``fwd_jvp`` then ``bwd_jvp(res, ḡ, ġ)``;
- ``rule ggn``: the same with ``ḡ = None`` (no second-order terms);
- ``fallback hvp``: the generic ``torch.func`` rule (``fallback_for(op)``), ``fwd_jvp`` then
  ``bwd_jvp(res, ḡ, ġ)``: what the engine would run for this op without a hand-written rule.

- ``<backend> hvp`` / ``<backend> ggn``: every accelerated implementation of the op (Triton,
  CUDA: ``hessfast.rules.implementations(op)``) that takes the call on this device, run the same
  way; one that declines is reported with its reasons. Their ``rel. err`` is against the rule's
  hvp / ggn of the same call.

Bandwidth: ``GB/s`` counts the compulsory traffic of the implementation, not of the hardware
counters: each tensor the forward reads (arguments, tangents) and writes (outputs, residuals that
are new tensors), and each tensor the backward reads (residuals, ``ḡ``, ``ġ``) and writes (the
cotangents), once — an ideal fused kernel moves exactly this. It is reported as a fraction of the
copy bandwidth (``x.copy_(y)`` of 256 MiB, counted as read + write) measured in the same run; with
``flops=`` (``bench_linear.py``) the TFLOP/s of the tangent GEMMs are reported against the
``torch.mm`` ceiling measured in the same run, in the same dtype.

Before timing, the rule and the fallback are run once in hvp mode and their cotangent tangents
``ġ`` compared: the ``rel. err`` column is the largest, over active arguments, of
``‖ġ_rule − ġ_fallback‖ / ‖ġ_fallback‖``. Times are medians after one warm-up call
(CUDA-synchronised wall time, everything under ``torch.no_grad()`` as in the engine); ratios are to
the primal op of the same case in the same run; ``speed-up`` is fallback time / rule hvp time; peak
memory (CUDA only) is the maximum allocated above the resting inputs. A method that raises (or a
rule that declines the call) is reported as failed with its error, not dropped.

Options (every ``bench_<op>.py``): ``--device`` (default cuda if available), ``--dtype``
(float32 | bfloat16 | float64), ``--size`` (small: CPU-friendly; large: realistic GPU shapes;
default large on CUDA, small on CPU), ``--k``, ``--repeats`` (default 5 small, 3 large: the fallback
is slow), ``--threads`` (CPU threads), ``--cases`` (comma-separated labels), ``--json PATH`` (merged
per family into one file, with provenance).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch

import hessfast
from hessfast.bench import measure, provenance
from hessfast.dispatch import reasons
from hessfast.rules import fallback_for, implementations, registered_rule
from hessfast.rules.base import Call, invoke

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
METHODS = ("primal", "rule hvp", "rule ggn", "fallback hvp")


def _is_float(t):
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


def _randn_k(k, x):
    return torch.randn((k, *x.shape), dtype=x.dtype, device=x.device)


def make_call(op, args, active, k):
    """The ``Call`` with random ``[K, *shape]`` tangents for the active arguments."""
    tangents = []
    for a, act in zip(args, active):
        if isinstance(act, list):
            tangents.append([_randn_k(k, x) if aj else None for x, aj in zip(a, act)])
        else:
            tangents.append(_randn_k(k, a) if act else None)
    return Call(op, tuple(args), tuple(active), tuple(tangents), k)


def make_cotangents(y, k):
    """Random ``ḡ`` (the primal's shape) and ``ġ`` (``[K, *shape]``) for the float outputs."""
    if isinstance(y, (tuple, list)):
        pairs = [make_cotangents(o, k) if _is_float(o) else (None, None) for o in y]
        return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    return torch.randn(y.shape, dtype=y.dtype, device=y.device), _randn_k(k, y)


def _flat(x):
    """A cotangent slot (tensor, list of tensors or None) as a list of tensors-or-None."""
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]


def rel_err(got, want, active):
    """``max over active arguments of ‖got − want‖ / ‖want‖`` (``None`` counts as zero)."""
    worst = 0.0
    for i, act in enumerate(active):
        if not (any(act) if isinstance(act, list) else act):
            continue
        gs = _flat(got[i]) if got[i] is not None else [None] * len(_flat(want[i]))
        ws = _flat(want[i]) if want[i] is not None else [None] * len(gs)
        for a, b in zip(gs, ws):
            if a is None and b is None:
                continue
            a = torch.zeros_like(b) if a is None else a
            b = torch.zeros_like(a) if b is None else b
            diff = (a.double() - b.double()).norm().item()
            ref = b.double().norm().item()
            worst = max(worst, diff / ref if ref > 0 else diff)
    return worst


def _error(e):
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:160] if msg else ''}"


def _free(dev):
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _storages(x, out):
    """Collect the tensors in ``x`` (nested tuples/lists/dicts) by storage, for byte counting."""
    if isinstance(x, torch.Tensor):
        out[(x.untyped_storage().data_ptr(), x.device)] = x.untyped_storage().nbytes()
    elif isinstance(x, (list, tuple)):
        for y in x:
            _storages(y, out)
    elif isinstance(x, dict):
        for y in x.values():
            _storages(y, out)


def _nbytes(*xs):
    found = {}
    for x in xs:
        _storages(x, found)
    return sum(found.values())


def compulsory_bytes(impl, call, g, gdot):
    """Bytes an ideal fused ``impl`` moves for one hvp (``g`` given) or ggn (``g`` is None): the
    forward's inputs and outputs, then the backward's residuals, cotangent inputs and outputs
    (see the module docstring)."""
    y, ydot, res = impl.fwd_jvp(call)
    seen = _nbytes(call.args, call.tangents, y, ydot)
    new_residuals = _nbytes(call.args, call.tangents, y, ydot, res) - seen
    fwd = _nbytes(call.args, call.tangents) + _nbytes(y, ydot) + new_residuals
    gx, gdx = impl.bwd_jvp(res, g, gdot)
    bwd = _nbytes(res) + _nbytes(g, gdot) + _nbytes(gx, gdx)
    return fwd + bwd


def copy_ceiling(dev, dtype, repeats=5):
    """Copy bandwidth in bytes/s (read + write of 256 MiB; 32 MiB on CPU)."""
    n = (256 if dev.type == "cuda" else 32) * 2**20 // torch.finfo(dtype).bits * 8
    a = torch.empty(n, dtype=dtype, device=dev)
    b = torch.randn(n, dtype=dtype, device=dev)
    t, _, _ = measure(lambda: a.copy_(b), dev, repeats)
    _free(dev)
    return 2 * n * torch.finfo(dtype).bits // 8 / t


def matmul_ceiling(dev, dtype, repeats=5):
    """``torch.mm`` FLOP/s on square matrices (8192 on GPU, 1024 on CPU) in ``dtype``."""
    n = 8192 if dev.type == "cuda" else 1024
    a = torch.randn(n, n, dtype=dtype, device=dev)
    b = torch.randn(n, n, dtype=dtype, device=dev)
    t, _, _ = measure(lambda: a @ b, dev, repeats)
    _free(dev)
    return 2 * n**3 / t


def accelerated(op):
    """The op's Triton / CUDA implementations, in dispatch order."""
    return [i for i in implementations(op) if i.backend != "torch"]


def run_case(case, dev, dtype, k, repeats, flops=None):
    label, op, build, active = case[:4]
    context = case[4] if len(case) > 4 else contextlib.nullcontext
    row = {"case": label, "op": str(op), "active": list(active), "k": k}
    if len(case) > 4:
        row["context"] = getattr(context, "__name__", str(context))
    with torch.no_grad(), context():
        try:
            torch.manual_seed(0)
            args = tuple(build(dev, dtype))
            row["shapes"] = [
                list(a.shape)
                if isinstance(a, torch.Tensor)
                else [list(x.shape) for x in a]
                if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)
                else None
                for a in args
            ]
            row["methods"] = {}
            call = make_call(op, args, active, k)
            g, gdot = make_cotangents(invoke(op, args), k)
        except Exception as e:  # e.g. out of memory building a large case
            row["error"] = _error(e)
            _free(dev)
            return row
        rule = registered_rule(op)
        fb = fallback_for(op)
        declined = "no hand-written rule registered" if rule is None else rule.declines(call)

        def pair(impl, gbar):
            return lambda: impl.bwd_jvp(impl.fwd_jvp(call)[2], gbar, gdot)

        fns = {
            "primal": lambda: invoke(op, args),
            "rule hvp": pair(rule, g),
            "rule ggn": pair(rule, None),
            "fallback hvp": pair(fb, g),
        }
        impls = {"rule": rule}
        skipped = {}
        for impl in accelerated(op):
            why = reasons(impl, call, explicit=True)
            for mode in ("hvp", "ggn"):
                name = f"{impl.backend} {mode}"
                if why:
                    skipped[name] = "declined: " + "; ".join(why)
                else:
                    fns[name] = pair(impl, g if mode == "hvp" else None)
                    impls[impl.backend] = impl
        # agreement checks, before any timing
        try:
            want = fns["fallback hvp"]()[1] if declined is None else None
            if want is not None:
                row["rel_err_rule_vs_fallback"] = rel_err(fns["rule hvp"]()[1], want, active)
        except Exception as e:
            row["check_error"] = _error(e)
        want = None
        checks = {}
        for name in fns:
            b, _, mode = name.partition(" ")
            if b in ("primal", "rule", "fallback") or declined is not None:
                continue
            try:
                checks[name] = rel_err(fns[name]()[1], fns[f"rule {mode}"]()[1], active)
            except Exception as e:
                checks[name] = _error(e)
        _free(dev)
        for name, fn in [*fns.items(), *((n, None) for n in skipped)]:
            entry = {}
            b, _, mode = name.partition(" ")
            if name in skipped:
                entry["error"] = skipped[name]
            elif b == "rule" and declined is not None:
                entry["error"] = f"declined: {declined}"
            else:
                try:
                    t, peak, _ = measure(fn, dev, repeats)
                    entry.update(seconds=t, peak_bytes=peak)
                    if b in impls:
                        entry["bytes"] = compulsory_bytes(
                            impls[b], call, g if mode == "hvp" else None, gdot
                        )
                        if flops is not None:
                            entry["flops"] = flops(args, active, k, mode)
                except Exception as e:  # a failing method is a result, not a crash
                    entry["error"] = _error(e)
            if name in checks:
                entry["rel_err_vs_rule"] = checks[name]
            row["methods"][name] = entry
            _free(dev)
    base = row["methods"]["primal"].get("seconds")
    for entry in row["methods"].values():
        if base and "seconds" in entry:
            entry["ratio_to_primal"] = entry["seconds"] / base
    r, f = row["methods"]["rule hvp"].get("seconds"), row["methods"]["fallback hvp"].get("seconds")
    if r and f:
        row["speedup_rule_over_fallback"] = f / r
    return row


def _ms(s):
    return f"{s * 1e3:.3f} ms" if s < 0.01 else f"{s * 1e3:.1f} ms"


def _mem(b):
    return "n/a" if b is None else f"{b / 2**20:.0f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def render(family, rows, k, ceilings=None):
    """A markdown table, one row per case, failures listed beneath it."""
    lines = [
        f"\n### {family} (K = {k}: rule and fallback times are for K tangent vectors in one call)\n",
        "| case | primal | rule hvp (× primal) | rule ggn (× primal) | fallback hvp (× primal) "
        "| rule speed-up over fallback | peak memory: rule hvp / ggn / fallback | rel. err rule vs fallback |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | **fails**: {r['error']} | | | | | | |")
            continue
        cells, mems = [], []
        for name in METHODS:
            m = r["methods"][name]
            if "error" in m:
                notes.append(f"- {r['case']}, {name}: {m['error']}")
                cells.append(f"**fails** ({len(notes)})" if name != "primal" else "**fails**")
            elif name == "primal":
                cells.append(_ms(m["seconds"]))
            else:
                cells.append(f"{_ms(m['seconds'])} ({m['ratio_to_primal']:.1f}×)")
            if name != "primal":
                mems.append(_mem(m.get("peak_bytes")) if "error" not in m else "—")
        speed = r.get("speedup_rule_over_fallback")
        err = r.get("rel_err_rule_vs_fallback")
        if "check_error" in r and r["check_error"] != r["methods"]["fallback hvp"].get("error"):
            notes.append(f"- {r['case']}, agreement check: {r['check_error']}")
        lines.append(
            f"| {r['case']} | {' | '.join(cells)} | "
            f"{f'**{speed:.1f}×**' if speed else 'n/a'} | {' / '.join(mems)} | "
            f"{f'{err:.1e}' if err is not None else 'n/a'} |"
        )
    if notes:
        lines += ["", "Failures:", *[f"{i + 1}. {n[2:]}" for i, n in enumerate(notes)]]
    lines += render_backends(rows, ceilings or {})
    return "\n".join(lines)


def render_backends(rows, ceilings):
    """Per implementation: time, speed-up over the plain-torch rule, compulsory GB/s against the
    copy ceiling (and TFLOP/s against the matmul ceiling when FLOPs are known)."""
    copy, mm = ceilings.get("copy_bytes_per_s"), ceilings.get("matmul_flops_per_s")
    head = [
        "",
        "Implementations (same K; GB/s of compulsory traffic, see benchmarks/rule_bench.py)"
        + (f"; copy ceiling {copy / 1e9:.0f} GB/s" if copy else "")
        + (f"; matmul ceiling {mm / 1e12:.1f} TFLOP/s" if mm else "")
        + ":",
        "",
        "| case | implementation | time | speed-up over torch rule | GB/s | % of copy "
        "| TFLOP/s | % of matmul | rel. err vs torch rule |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    body = []
    for r in rows:
        ms = r.get("methods", {})
        for name, m in ms.items():
            b, _, mode = name.partition(" ")
            if b in ("primal", "fallback"):
                continue
            if "error" in m:
                if b != "rule":
                    body.append(f"| {r['case']} | {name} | — {m['error'][:120]} | | | | | | |")
                continue
            ref = ms.get(f"rule {mode}", {}).get("seconds")
            speed = f"{ref / m['seconds']:.2f}×" if ref else "n/a"
            bw = m["bytes"] / m["seconds"] if "bytes" in m else None
            fl = m["flops"] / m["seconds"] if "flops" in m else None
            err = m.get("rel_err_vs_rule")
            body.append(
                f"| {r['case']} | {name} | {_ms(m['seconds'])} | {speed} | "
                f"{f'{bw / 1e9:.0f}' if bw else 'n/a'} | "
                f"{f'{100 * bw / copy:.0f}%' if bw and copy else 'n/a'} | "
                f"{f'{fl / 1e12:.2f}' if fl else 'n/a'} | "
                f"{f'{100 * fl / mm:.0f}%' if fl and mm else 'n/a'} | "
                f"{err if isinstance(err, str) else (f'{err:.1e}' if err is not None else '—')} |"
            )
    return head + body if body else []


def _write_json(path, family, prov, rows):
    """Merge this family's results into ``path`` (one file holds every ``bench_<op>.py`` of a run;
    each family keeps the provenance of the run that produced it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            data = {}
    if "families" not in data:
        data = {"families": {}}
    data["provenance"] = prov
    data["families"][family] = {"provenance": prov, "cases": rows}
    path.write_text(json.dumps(data, indent=1))


def main(family, cases, doc, argv=None, flops=None):
    """Entry point of every ``bench_<op>.py``: ``cases`` maps ``"small"`` / ``"large"`` to lists of
    ``(label, op, build, active[, context])``; ``flops(args, active, k, mode)`` (optional) gives the
    floating-point operations of one hvp / ggn, for TFLOP/s."""
    ap = argparse.ArgumentParser(description=(doc or family).strip().splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--size", choices=["small", "large"], default=None)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (torch.set_num_threads); default: torch's own choice",
    )
    ap.add_argument(
        "--cases", default=None, help="comma-separated case labels to run (default all)"
    )
    ap.add_argument("--json", default=None, help="merge results and provenance into this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    size = args.size or ("large" if dev.type == "cuda" else "small")
    repeats = args.repeats or (3 if size == "large" else 5)
    dtype = DTYPES[args.dtype]
    chosen = cases[size]
    if args.cases:
        want = set(args.cases.split(","))
        unknown = want - {c[0] for c in chosen}
        if unknown:
            ap.error(f"unknown case(s) {sorted(unknown)}; {size} cases: {[c[0] for c in chosen]}")
        chosen = [c for c in chosen if c[0] in want]
    with torch.no_grad():
        ceilings = {"copy_bytes_per_s": copy_ceiling(dev, dtype)}
        if flops is not None:
            ceilings["matmul_flops_per_s"] = matmul_ceiling(dev, dtype)
    rows = [run_case(c, dev, dtype, args.k, repeats, flops) for c in chosen]
    prov = provenance(dev)
    prov.update(ceilings)
    prov.update(
        dtype=args.dtype, size=size, k=args.k, repeats=repeats, benchmark=f"bench_{family}.py"
    )
    print(
        f"hessfast {hessfast.__version__} (commit {prov['commit']}) on {prov['device']} "
        f"({prov['cpu_threads']} CPU threads), torch {prov['torch']}, CUDA {prov['cuda']}, "
        f"Triton {prov['triton']}, {prov['date']}; {args.dtype}, {size} shapes, K = {args.k}, "
        f"median of {repeats}"
    )
    print(render(family, rows, args.k, ceilings))
    if args.json:
        _write_json(args.json, family, prov, rows)
    return rows
