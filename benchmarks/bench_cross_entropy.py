"""The fused softmax cross-entropy head: memory and time of its HVP and GGN-VP at LM head shapes.

    python benchmarks/bench_cross_entropy.py                  # GPU: GPT-2 small head (full); CPU: tiny
    python benchmarks/bench_cross_entropy.py --size tiny --threads 2
    python benchmarks/bench_cross_entropy.py --n 8192 --k 8 --chunk-mib 512 --json out.json

The model is the head alone: ``nn.Linear(D, V)`` on features ``x [N, D]`` with class targets ``y [N]``
and ``F.cross_entropy`` (mean), in one process on one device. For each ``(N, K)`` it runs, with K
random vectors over the head's weight and bias:

- ``gradient (autograd)``: the reference every time is divided by (``× gradient``);
- ``hessfast hvp`` / ``hessfast ggn``, fused (``engine.FUSE_HEAD = True``: the linear layer and the
  loss evaluated a chunk of rows at a time, the logits never materialised for the whole batch), on
  each backend that can run here (``torch``; on a GPU also ``auto`` and ``triton`` / ``cuda`` when
  available), and unfused (``FUSE_HEAD = False``: the linear rule, then the loss rule on ``[N, V]``
  logits and ``[K, N, V]`` tangents) on the default backend;
- ``double backward`` (autograd ``∇⟨∇L, v⟩``, one vector at a time, graph retained),
  ``torch.func jvp(grad)`` (vmapped over K) and ``torch.func ggn`` (``jvp``, loss Hessian,
  ``vjp``, vmapped over K).

Columns: median wall time after one warm-up call (CUDA events on GPU), its ratio to the gradient's,
peak memory (CUDA: the maximum allocated during the warm-up call above what was allocated before it;
model, inputs and vectors excluded), its ratio to double backward's peak (the issue's target: the
fused head at ≤ ¼ of autograd's peak at V = 50,304), and the relative error
``max_k ‖r_k − ref_k‖ / ‖ref_k‖`` against double backward (HVPs; ``torch.func`` when double
backward fails) or ``torch.func ggn`` (GGN-VPs), computed in float64 on the CPU and float32 on a GPU
from the same values. A method that fails (e.g. out of memory) is
reported with its error, not dropped.

Sizes (``--size``): ``tiny`` (CPU, seconds): D = 32, V = 1000, N = 64, K = 1, 4; ``small``:
D = 128, V = 8192, N = 512, K = 1, 8; ``full`` (GPU): the GPT-2 small head, D = 768, V = 50,304,
N = 4096, 8192, K = 1, 8. ``--n`` / ``--k`` override the lists, ``--chunk-mib`` the fused head's
chunk budget (``hessfast.rules.cross_entropy.HEAD_CHUNK_BYTES``, default 256 MiB).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

import hessfast
from hessfast import engine
from hessfast.bench import available_backends, measure, provenance, resolve_device, tf32, threads
from hessfast.rules import cross_entropy as ce

SIZES = {
    "tiny": {"d": 32, "v": 1000, "n": [64], "k": [1, 4]},
    "small": {"d": 128, "v": 8192, "n": [512], "k": [1, 8]},
    "full": {"d": 768, "v": 50304, "n": [4096, 8192], "k": [1, 8]},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@contextlib.contextmanager
def fused_head(on: bool):
    old = engine.FUSE_HEAD
    engine.FUSE_HEAD = on
    try:
        yield
    finally:
        engine.FUSE_HEAD = old


def build(d: int, v: int, n: int, k: int, dtype: torch.dtype, dev: torch.device, seed: int = 0):
    """``(head, x, y, vectors)``: the head, features, targets and K vectors ``{name: [K, ...]}``."""
    g = torch.Generator().manual_seed(seed)
    head = nn.Linear(d, v)
    with torch.no_grad():
        head.weight.copy_(torch.randn(v, d, generator=g) / d**0.5)
        head.bias.copy_(torch.randn(v, generator=g) * 0.1)
    head = head.to(dev, dtype)
    x = torch.randn(n, d, generator=g).to(dev, dtype)
    y = torch.randint(0, v, (n,), generator=g).to(dev)
    vecs = {
        name: torch.randn(k, *p.shape, generator=g).to(dev, dtype)
        for name, p in head.named_parameters()
    }
    return head, x, y, vecs


def methods(head, x, y, vecs, dev):
    """``[(label, kind, fn)]`` with ``kind`` in grad | hvp | ggn and ``fn() -> {name: tensor}``."""
    names = [n for n, _ in head.named_parameters()]
    ps = list(head.parameters())
    params = {n: p.detach() for n, p in head.named_parameters()}
    k = next(iter(vecs.values())).shape[0]

    def gradient():
        with torch.enable_grad():
            loss = F.cross_entropy(head(x), y)
            return dict(zip(names, torch.autograd.grad(loss, ps)))

    def hf(kind, backend, fuse):
        call = hessfast.hvp if kind == "hvp" else hessfast.ggn_vp

        def run():
            with fused_head(fuse):
                return call(head, F.cross_entropy, x, y, vecs, backend=backend)

        return run

    def double_backward():
        with torch.enable_grad():
            loss = F.cross_entropy(head(x), y)
            g = torch.autograd.grad(loss, ps, create_graph=True)
            out = {n: [] for n in names}
            for i in range(k):
                hv = torch.autograd.grad(g, ps, [vecs[n][i] for n in names], retain_graph=i < k - 1)
                for n, h in zip(names, hv):
                    out[n].append(h)
        return {n: torch.stack(t) for n, t in out.items()}

    def logits(p):
        return functional_call(head, p, (x,))

    def func_hvp():
        g = grad(lambda p: F.cross_entropy(logits(p), y))
        return vmap(lambda t: jvp(g, (params,), (t,))[1])(vecs)

    def func_ggn():
        z, pull = vjp(logits, params)
        gl = grad(lambda o: F.cross_entropy(o, y))

        def one(t):
            _, jv = jvp(logits, (params,), (t,))
            _, hjv = jvp(gl, (z,), (jv,))
            return pull(hjv)[0]

        return vmap(one)(vecs)

    default = "auto" if dev.type == "cuda" else "torch"
    out = [("gradient (autograd)", "grad", gradient)]
    for b in available_backends(dev):
        out.append((f"hessfast hvp, fused ({b})", "hvp", hf("hvp", b, True)))
        out.append((f"hessfast ggn, fused ({b})", "ggn", hf("ggn", b, True)))
    out.append((f"hessfast hvp, unfused ({default})", "hvp", hf("hvp", default, False)))
    out.append((f"hessfast ggn, unfused ({default})", "ggn", hf("ggn", default, False)))
    out.append(("double backward (autograd)", "hvp", double_backward))
    out.append(("torch.func jvp(grad)", "hvp", func_hvp))
    out.append(("torch.func ggn (jvp, vjp)", "ggn", func_ggn))
    return out


def rel_err(got: dict, want: dict) -> float:
    """``max_k ‖got_k − want_k‖ / ‖want_k‖`` over the parameters flattened together."""
    a = torch.cat([got[n].double().flatten(1) for n in want], 1)
    b = torch.cat([want[n].double().flatten(1) for n in want], 1)
    return float(((a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-300)).max())


def _free(dev):
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def _error(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:160] if lines else ''}"


REFERENCES = {
    "hvp": ("double backward (autograd)", "torch.func jvp(grad)"),
    "ggn": ("torch.func ggn (jvp, vjp)",),
}


def references(head, x, y, vecs, dev, results):
    """``{kind: (label, result)}``: double backward (HVPs; ``torch.func`` if it failed) and
    ``torch.func ggn`` (GGN-VPs) on a copy of the head in float64 on the CPU, float32 on a GPU
    (the values of the benchmarked dtype, upcast); the benchmarked runs themselves when that is
    their dtype."""
    ref_dtype = torch.float64 if dev.type == "cpu" else torch.float32
    same = x.dtype == ref_dtype
    if not same:
        head = copy.deepcopy(head).to(ref_dtype)
        x = x.to(ref_dtype)
        vecs = {n: t.to(ref_dtype) for n, t in vecs.items()}
    fns = {label: fn for label, _, fn in methods(head, x, y, vecs, dev)}
    out = {}
    for kind, labels in REFERENCES.items():
        for label in labels:
            if same:
                if label in results:
                    out[kind] = (label, results[label])
                    break
                continue
            try:
                res = {n: t.detach().to("cpu") for n, t in fns[label]().items()}
            except Exception:  # out of memory: the next reference, or none
                _free(dev)
                continue
            out[kind] = (f"{label}, {str(ref_dtype).replace('torch.', '')}", res)
            break
    return out


def bench_case(d, v, n, k, dtype, dev, repeats):
    """One ``(N, K)``: every method's row (see the module docstring)."""
    head, x, y, vecs = build(d, v, n, k, dtype, dev)
    rows, results = [], {}
    for label, kind, fn in methods(head, x, y, vecs, dev):
        row = {"method": label, "kind": kind, "n": n, "k": k}
        try:
            seconds, peak, out = measure(fn, dev, repeats)
            row.update(status="ok", seconds=seconds, peak_bytes=peak)
            results[label] = {name: t.detach().to("cpu") for name, t in out.items()}
            del out
        except Exception as e:  # out of memory, an unsupported transform: a result, not a crash
            row.update(status="error", error=_error(e))
        _free(dev)
        rows.append(row)
    refs = references(head, x, y, vecs, dev, results)
    by = {r["method"]: r for r in rows}
    grad_s = by["gradient (autograd)"].get("seconds")
    peak_ref = by["double backward (autograd)"].get("peak_bytes")
    for r in rows:
        if r["status"] != "ok":
            continue
        r["ratio_to_gradient"] = r["seconds"] / grad_s if grad_s else None
        if r["peak_bytes"] is not None and peak_ref:
            r["peak_vs_double_backward"] = r["peak_bytes"] / peak_ref
        ref = refs.get(r["kind"])
        if ref is not None:
            r["reference"] = ref[0]
            r["rel_err"] = rel_err(results[r["method"]], ref[1])
    return rows


def _ms(s):
    return f"{s * 1e3:.3f} ms" if s < 0.01 else f"{s * 1e3:.1f} ms"


def _mem(b):
    if b is None:
        return "n/a"
    return f"{b / 2**20:.1f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def render(rows: list[dict], header: str) -> str:
    lines = [header, ""]
    lines.append(
        "| method | N | K | time | × gradient | peak memory | peak / double backward | rel. error |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["status"] != "ok":
            lines.append(
                f"| {r['method']} | {r['n']} | {r['k']} | **fails**: {r['error']} | | | | |"
            )
            continue
        ratio = r.get("ratio_to_gradient")
        pr = r.get("peak_vs_double_backward")
        err = f"{r['rel_err']:.1e}" if "rel_err" in r else "—"
        lines.append(
            f"| {r['method']} | {r['n']} | {r['k']} | {_ms(r['seconds'])} | "
            f"{f'{ratio:.2f}' if ratio is not None else 'n/a'} | {_mem(r['peak_bytes'])} | "
            f"{f'{pr:.3f}' if pr is not None else 'n/a'} | {err} |"
        )
    return "\n".join(lines)


def _ints(s: str | None) -> list[int] | None:
    return [int(t) for t in s.split(",")] if s else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", choices=list(SIZES), default=None, help="default: full on CUDA, tiny")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls")
    p.add_argument("--n", default=None, help="token counts N, comma-separated")
    p.add_argument("--k", default=None, help="vector counts K, comma-separated")
    p.add_argument("--d", type=int, default=None, help="hidden size D")
    p.add_argument("--v", type=int, default=None, help="vocabulary size V")
    p.add_argument("--chunk-mib", type=float, default=None, help="fused head chunk budget (MiB)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls (default 3; tiny 5)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    p.add_argument("--json", default=None, help="write rows and provenance here")
    args = p.parse_args(argv)
    dev = resolve_device(args.device)
    size = args.size or ("full" if dev.type == "cuda" else "tiny")
    cfg = SIZES[size]
    d, v = args.d or cfg["d"], args.v or cfg["v"]
    ns, ks = _ints(args.n) or cfg["n"], _ints(args.k) or cfg["k"]
    repeats = args.repeats or (5 if size == "tiny" else 3)
    dtype = DTYPES[args.dtype]
    if args.chunk_mib is not None:
        ce.HEAD_CHUNK_BYTES = int(args.chunk_mib * 2**20)
    rows = []
    with threads(args.threads), tf32(args.tf32):
        prov = provenance(dev, args.dtype)
        for n in ns:
            for k in ks:
                rows += bench_case(d, v, n, k, dtype, dev, repeats)
    header = (
        f"Fused cross-entropy head, D = {d}, V = {v:,}, {args.dtype}, on {prov['device']} "
        f"(torch {prov['torch']}, Triton {prov['triton']}, TF32 {'on' if args.tf32 else 'off'}, "
        f"{prov['date']}, commit {prov['commit']}); chunk budget "
        f"{ce.HEAD_CHUNK_BYTES / 2**20:g} MiB; median of {repeats} after a warm-up."
    )
    print(render(rows, header))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        payload = {"provenance": prov, "size": size, "d": d, "v": v, "rows": rows}
        Path(args.json).write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
