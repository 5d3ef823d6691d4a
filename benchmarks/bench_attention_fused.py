"""Flash-style Triton attention rule (``hessfast/triton/attention.py``): long-context GPT-2 HVPs and
an attention-only micro-benchmark.

    python benchmarks/bench_attention_fused.py                        # GPU: everything below
    python benchmarks/bench_attention_fused.py --seq-lens 4096,8192 --max-t 0 --json out.json
    TRITON_INTERPRET=1 python benchmarks/bench_attention_fused.py --size tiny   # CPU smoke run

**Model** (``--size full``: GPT-2 small from :mod:`hessfast.bench_models` — 12 layers, d = 768,
12 heads of 64, vocab 50304, untied head, causal ``F.scaled_dot_product_attention`` — at batch 1;
``tiny``: 1 layer, d = 32, 2 heads, vocab 128). For each T in ``--seq-lens`` (default 1024, 4096,
8192; tiny: 16, 48), with one random vector ``v``:

- ``gradient (SDPA)``: ``torch.autograd.grad`` of the mean token cross-entropy with PyTorch's
  fused SDPA kernels — the reference of the ``× grad`` columns;
- ``hessfast hvp`` / ``hessfast ggn_vp``: on ``--backend`` (default ``auto`` on the GPU, which
  dispatches SDPA to the Triton rule; ``triton`` on the CPU, through the interpreter). The
  ``attention`` column says which SDPA implementation ran and how often (a counter on the rule);
- ``hessfast hvp, torch rules``: ``backend="torch"``, the plain-torch math rule (``T × T``);
- ``double backward (math SDPA)``: autograd's HVP under SDPA's math backend, what users write
  today (fused SDPA has no double backward).

A method that runs out of GPU memory is reported as ``OOM``. ``rel. err`` compares each HVP with
the double-backward HVP where that fits (the Triton and math forms round differently in bf16).
Then (``--max-t``, default 131072; 0 skips; GPU only) the largest T whose hessfast HVP fits:
doubling from the largest listed T until it runs out of memory, then bisecting to a multiple of
1024.

**Attention micro-benchmark** (``[1, 12, T, 64]`` causal, T in ``--micro-seq-lens``, default 4096
and 8192; tiny: ``[1, 2, 64, 16]``), all of ``q, k, v`` active, K = 1 tangent: the Triton rule's
``fwd_jvp`` and ``bwd_jvp`` (hvp and GGN modes, and the gradient-only pair with K = 0) against
PyTorch's SDPA forward + backward and the measured matmul ceiling (``[8192, 8192]²`` in the same
dtype, and in float32 under the current ``torch.get_float32_matmul_precision()``).

FLOP model: one "matmul unit" is ``2 · P · D`` FLOPs per head, with ``P`` the attended
``(query, key)`` pairs (``T²``; ``T (T + 1) / 2`` causal) and ``D = Dv`` the head dim. Units are
the ``[BLOCK_M × BLOCK_N × D]`` products the kernels execute, recomputation included (see the
module docstring of ``hessfast/triton/attention.py``): ``fwd_jvp`` 6 per tangent (2 with K = 0);
``bwd_jvp`` 7 for the primal cotangents (flash attention 2's 4 + 3 with ``QKᵀ`` recomputed in
both kernels) plus 18 per tangent in hvp mode, 7 per tangent in GGN mode. PyTorch SDPA forward +
backward is credited flash attention's conventional 2 + 5 = 7 units. The kernels' skipping of
masked tiles is not credited (the diagonal tiles are computed whole), so the rates are slightly
pessimistic for causal attention, for both sides.

Times are medians of ``--repeats`` calls after one warm-up call (which compiles the kernels and
measures the peak memory: CUDA max allocated above what was allocated before the call). Prints
markdown; ``--json PATH`` also writes the numbers with their provenance.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA = torch.ops.aten.scaled_dot_product_attention.default
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SIZES = {
    "full": {"model": "full", "seq_lens": (1024, 4096, 8192), "micro": ((12, 64), (4096, 8192))},
    "tiny": {"model": "tiny", "seq_lens": (16, 48), "micro": ((2, 16), (64,))},
}
MATMUL_N = {"full": 8192, "tiny": 256}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=tuple(SIZES), default=None, help="default: full on CUDA")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default: bfloat16 on CUDA")
    p.add_argument("--backend", default=None, help="hessfast backend (default: auto on CUDA)")
    p.add_argument("--seq-lens", default=None, help="comma-separated T of the model benchmark")
    p.add_argument("--micro-seq-lens", default=None, help="comma-separated T of the micro run")
    p.add_argument("--max-t", type=int, default=131072, help="largest-T search bound (0: skip)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--parts", default="model,micro", help="model, micro or both")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.device = torch.device(args.device or ("cuda" if cuda else "cpu"))
    gpu = args.device.type == "cuda"
    args.size = args.size or ("full" if gpu else "tiny")
    args.dtype = DTYPES[args.dtype or ("bfloat16" if gpu else "float32")]
    args.backend = args.backend or ("auto" if gpu else "triton")
    preset = SIZES[args.size]
    args.seq_lens = _ints(args.seq_lens) or preset["seq_lens"]
    args.micro_seq_lens = _ints(args.micro_seq_lens) or preset["micro"][1]
    args.parts = set(args.parts.split(","))
    return args


def _ints(text: str | None) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",")) if text else ()


# ---- timing --------------------------------------------------------------------------------------


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def run(fn: Callable[[], object], dev: torch.device, repeats: int) -> dict:
    """``{"ms", "peak_mib", "out"}`` of ``fn`` (median of ``repeats`` after a warm-up that also
    measures the peak), or ``{"error": "OOM" | message}``."""
    _free(dev)
    try:
        base = 0
        if dev.type == "cuda":
            _sync(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
        out = fn()
        _sync(dev)
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20 if dev.type == "cuda" else None
        times = []
        for _ in range(repeats):
            if dev.type == "cuda":
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        ms = statistics.median(times) if times else None
        return {"ms": ms, "peak_mib": peak, "out": out}
    except torch.cuda.OutOfMemoryError:
        return {"error": "OOM"}
    except Exception as e:  # a failing method is a result, not a crash
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    finally:
        _free(dev)


class Counter:
    """Counts the calls of the Triton SDPA rule's ``fwd_jvp`` (patched on the instance)."""

    def __init__(self, impl):
        self.impl, self.n = impl, 0
        inner = impl.fwd_jvp

        def counted(call):
            self.n += 1
            return inner(call)

        impl.fwd_jvp = counted


# ---- the model benchmark -------------------------------------------------------------------------


def model_parts(size: str, t: int, dev: torch.device, dtype: torch.dtype):
    from hessfast.bench_models import gpt2

    model, _loss, (idx,), y = gpt2(size, dev, dtype=dtype, batch_size=1, seq_len=t)
    gen = torch.Generator().manual_seed(1)
    v = {n: torch.randn(p.shape, generator=gen).to(dev, dtype) for n, p in model.named_parameters()}
    return model, idx, y, v


def token_loss(model, idx, y):
    logits = model(idx)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


def gradient_fn(model, idx, y):
    params = list(model.parameters())

    def fn():
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            return torch.autograd.grad(token_loss(model, idx, y), params)

    return fn


def double_backward_fn(model, idx, y, v):
    names, params = zip(*model.named_parameters())

    def fn():
        with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
            for p in params:
                p.requires_grad_(True)
            g = torch.autograd.grad(token_loss(model, idx, y), params, create_graph=True)
            dot = sum((gi * v[n]).sum() for gi, n in zip(g, names))
            return dict(zip(names, torch.autograd.grad(dot, params)))

    return fn


def hessfast_fn(product, model, idx, y, v, backend):
    def fn():
        return product(model, F.cross_entropy, (idx,), y, v, backend=backend)

    return fn


def rel_err(a: dict, b: dict) -> float:
    num = sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in b)
    den = sum(float(b[n].double().pow(2).sum()) for n in b)
    return math.sqrt(num / max(den, 1e-300))


def model_rows(args, impl) -> list[dict]:
    import hessfast

    rows = []
    for t in args.seq_lens:
        model, idx, y, v = model_parts(args.size, t, args.device, args.dtype)
        methods = [
            ("gradient (SDPA)", gradient_fn(model, idx, y)),
            (
                f"hessfast hvp ({args.backend})",
                hessfast_fn(hessfast.hvp, model, idx, y, v, args.backend),
            ),
            (
                f"hessfast ggn_vp ({args.backend})",
                hessfast_fn(hessfast.ggn_vp, model, idx, y, v, args.backend),
            ),
            ("hessfast hvp, torch rules", hessfast_fn(hessfast.hvp, model, idx, y, v, "torch")),
            ("double backward (math SDPA)", double_backward_fn(model, idx, y, v)),
        ]
        results = {}
        for label, fn in methods:
            before = impl.n
            r = run(fn, args.device, args.repeats)
            r["attention"] = f"triton ×{impl.n - before}" if impl.n > before else "torch / SDPA"
            results[label] = r
        ref = results["double backward (math SDPA)"].get("out")
        grad = results["gradient (SDPA)"]
        for label, r in results.items():
            row = {"T": t, "method": label, "attention": r["attention"]}
            if "error" in r:
                row["error"] = r["error"]
            else:
                row.update(ms=r["ms"], peak_mib=r["peak_mib"])
                if "error" not in grad:
                    row["x_grad_time"] = r["ms"] / grad["ms"]
                    if r["peak_mib"] is not None and grad["peak_mib"]:
                        row["x_grad_peak"] = r["peak_mib"] / grad["peak_mib"]
                if ref is not None and "hvp" in label:
                    row["rel_err"] = rel_err(r["out"], ref)
            rows.append(row)
        del model, idx, y, v, results, ref, grad
        _free(args.device)
    return rows


def fits(args, t: int) -> bool:
    import hessfast

    model, idx, y, v = model_parts(args.size, t, args.device, args.dtype)
    r = run(hessfast_fn(hessfast.hvp, model, idx, y, v, args.backend), args.device, 0)
    del model, idx, y, v
    _free(args.device)
    return "error" not in r


def largest_t(args) -> dict:
    """Doubling from the largest listed T, then bisection to a multiple of 1024."""
    ok, t = max(args.seq_lens), 2 * max(args.seq_lens)
    while t <= args.max_t and fits(args, t):
        ok, t = t, 2 * t
    bad = t
    while bad - ok > 1024 and bad <= args.max_t:
        mid = (ok + bad) // 2 // 1024 * 1024
        if mid <= ok:
            break
        ok, bad = (mid, bad) if fits(args, mid) else (ok, mid)
    return {"largest_T": ok, "first_failing_T": bad if bad <= args.max_t else None}


# ---- the attention micro-benchmark ---------------------------------------------------------------


def pairs(t: int, causal: bool) -> int:
    return t * (t + 1) // 2 if causal else t * t


def micro_rows(args, impl) -> list[dict]:
    from hessfast.rules.base import Call

    heads, d = SIZES[args.size]["micro"][0]
    dev, dt = args.device, args.dtype
    rows = []
    n = MATMUL_N[args.size]
    for dtype in dict.fromkeys((dt, torch.float32)):
        label = f"matmul {str(dtype).replace('torch.', '')}"
        a = torch.randn(n, n, device=dev, dtype=dtype)
        r = run(lambda a=a: a @ a, dev, args.repeats)
        rows.append({"what": label, "T": n, "ms": r["ms"], "tflops": 2 * n**3 / r["ms"] / 1e9})
    ceiling = rows[0]["tflops"]
    for t in args.micro_seq_lens:
        gen = torch.Generator().manual_seed(2)

        def rnd(*shape):
            return torch.randn(*shape, generator=gen).to(dev, dt)

        q, k, v = (rnd(1, heads, t, d) for _ in range(3))
        tans = tuple(rnd(1, *x.shape) for x in (q, k, v))
        g, gd = rnd(1, heads, t, d), rnd(1, 1, heads, t, d)
        args8 = (q, k, v, None, 0.0, True, None, False)
        active = (True, True, True, False, False, False, False, False)
        call1 = Call(SDPA, args8, active, (*tans, *(None,) * 5), 1)
        call0 = Call(SDPA, args8, active, (None,) * 8, 0)
        unit = 2 * pairs(t, True) * d * heads * 1e-12
        res1 = impl.fwd_jvp(call1)[2]
        res0 = impl.fwd_jvp(call0)[2]
        qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))

        def sdpa_fwd_bwd():
            with torch.enable_grad():
                o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
                return torch.autograd.grad(o, (qg, kg, vg), g)

        cases = [
            ("torch SDPA fwd+bwd", sdpa_fwd_bwd, 7),
            ("triton fwd (K=0)", lambda: impl.fwd_jvp(call0), 2),
            ("triton bwd grad (K=0)", lambda: impl.bwd_jvp(res0, g, None), 7),
            ("triton fwd_jvp (K=1)", lambda: impl.fwd_jvp(call1), 6),
            ("triton bwd_jvp hvp (K=1)", lambda: impl.bwd_jvp(res1, g, gd), 7 + 18),
            ("triton bwd_jvp ggn (K=1)", lambda: impl.bwd_jvp(res1, None, gd), 7),
        ]
        sdpa_ms = None
        for what, fn, units in cases:
            r = run(fn, dev, args.repeats)
            row = {"what": what, "T": t, "heads": heads, "D": d, "units": units}
            if "error" in r:
                row["error"] = r["error"]
            else:
                sdpa_ms = sdpa_ms or r["ms"]
                tflops = units * unit / (r["ms"] * 1e-3)
                row.update(
                    ms=r["ms"],
                    peak_mib=r["peak_mib"],
                    tflops=tflops,
                    pct_ceiling=100 * tflops / ceiling,
                    x_sdpa_time=r["ms"] / sdpa_ms,
                )
            rows.append(row)
        _free(dev)
    return rows


# ---- output --------------------------------------------------------------------------------------


def _f(x, fmt="{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def render(model: list[dict], largest: dict | None, micro: list[dict], prov: dict) -> str:
    out = [
        f"# Flash-style Triton attention rule — {prov['device']}, {prov['dtype']}",
        "",
        f"torch {prov['torch']}, triton {prov['triton']}, commit {prov['commit']}, "
        f"{prov['time_utc']}",
    ]
    if model:
        out += [
            "",
            "## GPT-2 small, batch 1",
            "",
            "| T | method | attention | time ms | × grad | peak MiB | × grad | rel. err |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in model:
            if "error" in r:
                out.append(f"| {r['T']} | {r['method']} | {r['attention']} | {r['error']} |||||")
                continue
            out.append(
                f"| {r['T']} | {r['method']} | {r['attention']} | {_f(r['ms'])} | "
                f"{_f(r.get('x_grad_time'))} | {_f(r['peak_mib'], '{:.0f}')} | "
                f"{_f(r.get('x_grad_peak'))} | {_f(r.get('rel_err'), '{:.1e}')} |"
            )
    if largest:
        out += [
            "",
            f"Largest T whose hessfast HVP fits: **{largest['largest_T']}** "
            f"(first failing: {largest['first_failing_T'] or 'not reached'}).",
        ]
    if micro:
        out += [
            "",
            "## Attention only (causal, K = 1)",
            "",
            "| what | T | time ms | units | TFLOP/s | % matmul ceiling | × SDPA fwd+bwd |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in micro:
            if "error" in r:
                out.append(f"| {r['what']} | {r['T']} | {r['error']} |||||")
                continue
            out.append(
                f"| {r['what']} | {r['T']} | {_f(r['ms'], '{:.3f}')} | {r.get('units', '–')} | "
                f"{_f(r['tflops'], '{:.1f}')} | {_f(r.get('pct_ceiling'), '{:.0f}')} | "
                f"{_f(r.get('x_sdpa_time'))} |"
            )
    return "\n".join(out)


def main(argv=None) -> int:
    args = parse(argv)
    if args.device.type == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are first imported
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hessfast.bench import provenance
    from hessfast.triton.attention import IMPLEMENTATIONS

    impl = IMPLEMENTATIONS[0]
    counter = Counter(impl)
    prov = provenance(args.device, str(args.dtype).replace("torch.", ""))
    model = micro = []
    largest = None
    if "model" in args.parts:
        model = model_rows(args, counter)
        if args.max_t and args.device.type == "cuda":
            largest = largest_t(args)
    if "micro" in args.parts:
        micro = micro_rows(args, impl)
    print(render(model, largest, micro, prov))
    if args.json:
        strip = [{k: v for k, v in r.items() if k != "out"} for r in model]
        data = {"provenance": prov, "model": strip, "largest": largest, "micro": micro}
        Path(args.json).write_text(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
