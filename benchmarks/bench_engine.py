"""hessfast's grad / HVP / GGN-VP against autograd, as ratios to the gradient, with peak memory.

    python benchmarks/bench_engine.py                      # GPU if available (baseline shapes), else small CPU sizes
    python benchmarks/bench_engine.py --size small --models mlp,resnet18 --json out.json

Everything runs in one process on one device. The error column is each method's relative
difference from the first method of its kind in the table (hessfast's HVP, or its GGN-VP), on the
first vector: hessfast and every autograd method are thus checked against each other in float32
(the float64 oracle comparisons live in the tests). Times are medians after a warm-up
(CUDA-synchronised wall time); peak memory is the maximum allocated above the resting model
(CUDA only). A method that raises is reported as failed with its error, not dropped. On a CPU pass
``--threads 1``: with several threads on a loaded machine every parallel op pays milliseconds of
thread wake-up, which hides the work being measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
import model_zoo  # noqa: E402

import hessfast  # noqa: E402


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def measure(fn, dev, repeats):
    """``(median seconds, peak bytes above the resting allocation or None, result)``."""
    out = fn()
    _sync(dev)
    times = []
    for _ in range(repeats):
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
    peak = None
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        _sync(dev)
        peak = torch.cuda.max_memory_allocated(dev) - base
    return statistics.median(times), peak, out


def seq_loss(loss_fn):
    def f(z, t):
        if z.dim() == 3:
            return loss_fn(z.flatten(0, -2), t.flatten())
        return loss_fn(z, t)

    return f


def methods(model, loss_fn, inputs, targets, k):
    params = {n: p.detach() for n, p in model.named_parameters()}
    plist = [p for p in model.parameters()]
    lf = seq_loss(loss_fn)
    gen = torch.Generator(device="cpu").manual_seed(0)
    V = {n: torch.randn(k, *p.shape, generator=gen).to(p) for n, p in params.items()}
    v1 = {n: t[:1] for n, t in V.items()}
    v1s = {n: t[0] for n, t in V.items()}

    def L(p):
        return lf(functional_call(model, p, inputs), targets)

    def z_of(p):
        return functional_call(model, p, inputs)

    def autograd_grad():
        return torch.autograd.grad(lf(model(*inputs), targets), plist)

    def func_hvp():
        return jvp(grad(L), (params,), (v1s,))[1]

    def double_backward():
        g = torch.autograd.grad(lf(model(*inputs), targets), plist, create_graph=True)
        return torch.autograd.grad(g, plist, [v1s[n] for n in params])

    def func_ggn():
        out, pull = vjp(z_of, params)
        _, jv = jvp(z_of, (params,), (v1s,))
        _, hjv = jvp(grad(lambda o: lf(o, targets)), (out,), (jv,))
        return pull(hjv)[0]

    def func_vmap_k():
        return vmap(lambda t: jvp(grad(L), (params,), (t,))[1])(V)

    def math_attention(fn):
        def run():
            with sdpa_kernel([SDPBackend.MATH]):
                return fn()

        return run

    autograd_methods = {
        "torch.func jvp(grad)": (func_hvp, 1, "hvp"),
        "double backward": (double_backward, 1, "hvp"),
        "torch.func GGN (jvp+vjp)": (func_ggn, 1, "ggn"),
        f"torch.func vmap K={k}": (func_vmap_k, k, "hvpK"),
    }
    table = {
        "gradient (autograd)": (autograd_grad, 1, None),
        "hessfast.grad": (lambda: hessfast.grad(model, loss_fn, inputs, targets), 1, None),
        "hessfast.hvp": (lambda: hessfast.hvp(model, loss_fn, inputs, targets, v1), 1, "hvp"),
        "hessfast.ggn_vp": (lambda: hessfast.ggn_vp(model, loss_fn, inputs, targets, v1), 1, "ggn"),
        f"hessfast.hvp K={k}": (
            lambda: hessfast.hvp(model, loss_fn, inputs, targets, V),
            k,
            "hvpK",
        ),
        **autograd_methods,
    }
    if any(isinstance(m, model_zoo.CausalSelfAttention) for m in model.modules()):
        # autograd cannot differentiate the fused SDPA kernels twice; the math backend is what
        # users fall back to (softmax(QKᵀ)V written out, T×T memory)
        table["gradient (autograd, math attention)"] = (math_attention(autograd_grad), 1, None)
        for label, (fn, per, kind) in autograd_methods.items():
            table[label + ", math attention"] = (math_attention(fn), per, kind)
    return table, params


def run_model(name, size, dev, k, repeats):
    model, loss_fn, inputs, targets = model_zoo.MODELS[name](size, dev)
    table, params = methods(model, loss_fn, inputs, targets, k)
    names = list(params)
    refs = {}
    rows = []
    grad_time = None
    for label, (fn, per, kind) in table.items():
        row = {"method": label, "vectors": per}
        try:
            t, peak, out = measure(fn, dev, repeats)
            row.update(seconds=t, seconds_per_vector=t / per, peak_bytes=peak)
            if label == "gradient (autograd)":
                grad_time = t
            if kind is not None:
                flat = (
                    torch.cat(
                        [
                            out[n].reshape(out[n].shape[0] if kind == "hvpK" else 1, -1)
                            for n in names
                        ],
                        dim=1,
                    )
                    if isinstance(out, dict)
                    else torch.cat([o.reshape(1, -1) for o in out], dim=1)
                    if kind != "hvpK"
                    else None
                )
                if flat is not None:
                    key = "ggn" if kind == "ggn" else "hvp"
                    first = flat[:1].double()
                    if key not in refs:
                        refs[key] = first
                    row["rel_err_vs_first_" + key] = float(
                        (first - refs[key]).norm() / refs[key].norm()
                    )
        except Exception as e:  # a failing method is a result, not a crash
            row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
        rows.append(row)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        if "seconds" in row and grad_time:
            row["ratio_to_gradient_per_vector"] = row["seconds_per_vector"] / grad_time
    return {
        "model": name,
        "size": size,
        "parameters": sum(p.numel() for p in params.values()),
        "rows": rows,
    }


def provenance(dev):
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(dev)
        if dev.type == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "dtype": "float32",
        "tf32": torch.backends.cuda.matmul.allow_tf32,
        "date": datetime.date.today().isoformat(),
        "commit": commit,
        "hessfast": hessfast.__version__,
    }


def render(results):
    lines = []
    for res in results:
        lines.append(f"\n### {res['model']} ({res['size']}, {res['parameters']:,} parameters)\n")
        lines.append("| method | time / vector | × gradient | peak memory | rel. error vs first |")
        lines.append("|---|---|---|---|---|")
        for r in res["rows"]:
            if "error" in r:
                lines.append(f"| {r['method']} | **fails**: {r['error']} | | | |")
                continue
            peak = (
                f"{r['peak_bytes'] / 2**30:.2f} GiB" if r.get("peak_bytes") is not None else "n/a"
            )
            err = next((f"{v:.1e}" for key, v in r.items() if key.startswith("rel_err")), "")
            lines.append(
                f"| {r['method']} | {r['seconds_per_vector'] * 1e3:.2f} ms | "
                f"{r.get('ratio_to_gradient_per_vector', float('nan')):.2f} | {peak} | {err} |"
            )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", choices=["small", "full"], default=None)
    ap.add_argument("--models", default="mlp,resnet18,gpt2")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--json", default=None, help="write results and provenance here")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    size = args.size or ("full" if dev.type == "cuda" else "small")
    repeats = args.repeats or (5 if dev.type == "cuda" else 3)
    torch.manual_seed(0)
    results = [run_model(m, size, dev, args.k, repeats) for m in args.models.split(",")]
    prov = provenance(dev)
    print(f"hessfast {prov['hessfast']} on {prov['device']}, torch {prov['torch']}, {prov['date']}")
    print(render(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"provenance": prov, "results": results}, indent=1))


if __name__ == "__main__":
    main()
