"""Where a traced product's time goes outside the aten kernels: the Python around the graph.

For each workload and product kind (``grad``, ``hvp``, ``ggn``) it times, interleaved in one
process on one CPU thread (docs/architecture.md, measurement):

- the whole product as a user calls it (``hessfast.grad`` / ``hvp`` / ``ggn_vp``): the capture
  guard, loss resolution and target checks, the input and result finiteness checks, the trace
  lookup and the graph;
- the traced graph alone, replayed on the same flat inputs under ``torch.no_grad()`` (what the
  product runs per call: the parameters as they are, not detached);
- the autograd reference (gradient; double backward for the HVP and the GGN-VP row, math SDPA).

``outside`` is the share of the product spent outside the graph. Usage::

    PYTHONPATH=. python benchmarks/bench_overhead.py [--size small] [--rounds 15] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import hessfast
from hessfast import bench_models, capture, traced


def _flat_loss(loss_fn):
    def f(z, y):
        if z.dim() == 3:
            return loss_fn(z.flatten(0, 1), y.flatten())
        return loss_fn(z, y)

    return f


def _graph_inputs(program):
    """The most recent trace of ``program`` and the flat inputs of its next replay."""
    trace = traced.traces(program)[-1]
    seen = {}
    real = trace.fn

    def spy(*args):
        seen["args"] = args
        return real(*args)

    return trace, real, spy, seen


def _replay(fn, args):
    """The graph as :func:`hessfast.traced.run` replays it."""
    with torch.no_grad():
        return fn(*args)


def measure(name: str, size: str, rounds: int) -> list[dict]:
    model, loss_fn, (x,), y = bench_models.MODELS[name](size)
    params = list(model.parameters())
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    loss = _flat_loss(loss_fn)
    rows = []
    for kind in ("grad", "hvp", "ggn"):
        if kind == "grad":

            def product():
                return hessfast.grad(model, loss_fn, x, y)

            def reference():
                return torch.autograd.grad(loss(model(x), y), params)

            ctx = contextlib.nullcontext()
        else:
            f = hessfast.hvp if kind == "hvp" else hessfast.ggn_vp

            def product(f=f):
                return f(model, loss_fn, x, y, v)

            def reference():
                g = torch.autograd.grad(loss(model(x), y), params, create_graph=True)
                return torch.autograd.grad(g, params, list(v.values()))

            ctx = sdpa_kernel([SDPBackend.MATH])
        with ctx:
            for _ in range(3):
                product()
            trace, real, spy, seen = _graph_inputs(capture.capture(model, (x,)))
            trace.fn = spy
            product()
            trace.fn = real
            args = seen["args"]
            times: dict[str, list[float]] = {"product": [], "graph": [], "autograd": []}
            for _ in range(rounds):
                for key, fn in (
                    ("product", product),
                    ("graph", lambda: _replay(real, args)),
                    ("autograd", reference),
                ):
                    t0 = time.perf_counter()
                    fn()
                    times[key].append(time.perf_counter() - t0)
        med = {k: statistics.median(t) for k, t in times.items()}
        rows.append(
            {
                "model": name,
                "kind": kind,
                "nodes": len(real.graph.nodes),
                **med,
                "outside": (med["product"] - med["graph"]) / med["product"],
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model | product | graph nodes | product | graph alone | outside the graph | "
        "autograd (double backward for hvp/ggn) | product / autograd |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['kind']} | {r['nodes']} | {r['product'] * 1e3:.2f} ms | "
            f"{r['graph'] * 1e3:.2f} ms | {r['outside']:.1%} | {r['autograd'] * 1e3:.2f} ms | "
            f"{r['product'] / r['autograd']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--models", default="mlp,resnet18,gpt2")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = [r for m in a.models.split(",") for r in measure(m, a.size, a.rounds)]
    text = (
        f"hessfast {hessfast.__version__}, torch {torch.__version__}, CPU, 1 thread, float32, "
        f"size {a.size}, median of {a.rounds} interleaved rounds\n\n{table(rows)}\n"
    )
    print(text)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
