"""Where a traced product's time goes outside the aten kernels: the Python around the graph.

For each workload and product kind (``grad``, ``hvp``, ``ggn``) it times, interleaved in one
process on one CPU thread (docs/architecture.md, measurement):

- the whole product as a user calls it (``hessfast.grad`` / ``hvp`` / ``ggn_vp``): the capture
  guard, loss resolution and target checks, the trace lookup, the graph, and the finiteness checks
  of ``v`` and the result;
- inside that same call, the time in the traced graph and the time in the finiteness checks (the
  graph's function and ``api.first_non_finite_in`` wrapped in timers), so the split is of one call
  and not of two runs with different cache states;
- the same graph traced without its finiteness probe (``traced.PROBE = False``, on a copy of the
  model), called on the same inputs before or after it (alternating): ``graph − probe-less
  graph`` is what the probe (the sums of ``v`` and the results, inside the graph) costs;
- the guards a replay cannot skip, around the same graph (:func:`_guards_only`): the floor under
  ``outside`` for any Python guard;
- the autograd reference (gradient; double backward for the HVP and the GGN-VP row, math SDPA).

``outside`` is the share of the product spent outside its graph; ``finiteness`` is the part of it
that reads ``v`` and the result again (only when the graph's probe cannot vouch for them: a
non-finite or overflowing probe, or a ``v`` entry no product reads); ``Python`` is the rest.
``--clock cpu`` times with the calling thread's CPU time instead of the
wall clock: on a shared machine a preempted product otherwise charges the wait to whatever it
was in (on one torch thread every kernel runs in the calling thread, so nothing is left out).
Usage::

    PYTHONPATH=. python benchmarks/bench_overhead.py [--size small] [--rounds 15] [--clock wall]
        [--models mlp,resnet18,gpt2,benchmarks.untuned_models:vgg_bn] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import hessfast
from hessfast import api, bench_models, capture, replay, traced


def _flat_loss(loss_fn):
    def f(z, y):
        if z.dim() == 3:
            return loss_fn(z.flatten(0, 1), y.flatten())
        return loss_fn(z, y)

    return f


#: The clocks ``--clock`` picks: the wall clock, or the calling thread's CPU time.
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock = CLOCKS["wall"]


class _Timer:
    """``fn`` with the seconds of each call appended to ``seconds`` (and its last arguments
    kept in ``args``)."""

    def __init__(self, fn):
        self.fn, self.seconds, self.args = fn, [], ()

    def __call__(self, *args, **kwargs):
        self.args = args
        t0 = _clock()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds.append(_clock() - t0)


def _time_plain(plain, args, times) -> None:
    with torch.no_grad():  # as a replay
        t0 = _clock()
        plain.fn(*args)
        times["plain"].append(_clock() - t0)


def _guards_only(model, params, v, y, fn, args, guard, times, check_range) -> None:
    """The least a guarded replay does around its graph, timed apart from the graph: the model's
    fingerprint (the stale-graph guard), the parameter selection (``requires_grad``), ``v``
    lifted to a K axis, the shapes, strides, dtypes and devices of every graph input (the trace
    key), the target range check where the replay makes one (``check_range``), the graph, the
    probe read, the K axis dropped again. What remains of ``outside`` above this floor is the
    library's own Python."""
    t0 = _clock()
    capture.fingerprint(model)
    [p.requires_grad for p in params]
    if v is not None:
        [t.unsqueeze(0) for t in v.values()]
    if guard is not None:  # replay.py's C++ check of the metas, else its Python one
        guard.check(*args)
    else:
        traced._metas(args)
    if check_range:  # (a CPU graph of aten ops refuses a bad target itself: replay.checks_bounds)
        torch.stack(torch.aminmax(y)).tolist()
    with torch.no_grad():
        g0 = _clock()
        out = fn(*args)
        g1 = _clock()
    out[-1].item()
    [t.squeeze(0) for t in out[1:-1]]
    times["floor"].append(_clock() - t0 - (g1 - g0))


def measure(name: str, size: str, rounds: int) -> list[dict]:
    if name in bench_models.MODELS:
        model, loss_fn, (x,), y = bench_models.MODELS[name](size)
    else:  # module:function, as `hessfast bench --model` takes it (one input tensor)
        w = bench_models.build(name, size, n_batches=1)
        model, loss_fn, ((x,), y) = w.model, w.loss_fn, w.batches[0]
    params = list(model.parameters())
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    loss = _flat_loss(loss_fn)
    rows = []
    plain_model = copy.deepcopy(model)
    for kind in ("grad", "hvp", "ggn"):
        if kind == "grad":

            def product(model=model):
                return hessfast.grad(model, loss_fn, x, y)

            def reference():
                return torch.autograd.grad(loss(model(x), y), params)

            ctx = contextlib.nullcontext()
        else:
            f = hessfast.hvp if kind == "hvp" else hessfast.ggn_vp

            def product(model=model, f=f):
                return f(model, loss_fn, x, y, v)

            def reference():
                g = torch.autograd.grad(loss(model(x), y), params, create_graph=True)
                return torch.autograd.grad(g, params, list(v.values()))

            ctx = sdpa_kernel([SDPBackend.MATH])
        with ctx:
            traced.PROBE = False
            try:
                for _ in range(3):
                    product(plain_model)
            finally:
                traced.PROBE = True
            plain = traced.traces(capture.capture(plain_model, (x,)))[-1]
            for _ in range(3):
                product()
            trace = traced.traces(capture.capture(model, (x,)))[-1]
            graph, checks = _Timer(trace.fn), _Timer(api.first_non_finite_in)
            times: dict[str, list[float]] = {
                "product": [], "graph": [], "plain": [], "finiteness": [], "floor": [],
                "autograd": [],
            }  # fmt: skip
            vv = None if kind == "grad" else v
            trace.fn, api.first_non_finite_in = graph, checks
            guard = ...
            # the target range check the replay makes (none where the graph refuses bad targets)
            check_range = not y.is_floating_point() and any(
                r.classes is not None for r in replay._RECORDS[model].values() if r.trace is trace
            )
            try:
                for i in range(rounds):
                    if i % 2:  # the probe-less graph first on odd rounds: neither is favoured
                        _time_plain(plain, graph.args, times)
                    graph.seconds.clear()
                    checks.seconds.clear()
                    t0 = _clock()
                    product()
                    times["product"].append(_clock() - t0)
                    times["graph"].append(sum(graph.seconds))
                    times["finiteness"].append(sum(checks.seconds))
                    if not i % 2:
                        _time_plain(plain, graph.args, times)
                    if guard is ...:
                        guard = replay._tensor_guard(graph.args)
                    _guards_only(
                        model, params, vv, y, graph.fn, graph.args, guard, times, check_range
                    )
                    t0 = _clock()
                    reference()
                    times["autograd"].append(_clock() - t0)
            finally:
                trace.fn, api.first_non_finite_in = graph.fn, checks.fn
        med = {k: statistics.median(t) for k, t in times.items()}
        rows.append(
            {
                "model": name,
                "kind": kind,
                "nodes": len(graph.fn.graph.nodes),
                **med,
                "probe": (med["graph"] - med["plain"]) / med["product"],
                "outside": (med["product"] - med["graph"]) / med["product"],
                "python": (med["product"] - med["graph"] - med["finiteness"]) / med["product"],
                "floor": med["floor"] / med["product"],
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model | product | graph nodes | product | in the graph | "
        "of which the probe (graph − probe-less graph) | outside the graph | "
        "of which finiteness checks | of which Python | guards alone (floor) | "
        "autograd (double backward for hvp/ggn) | product / autograd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['kind']} | {r['nodes']} | {r['product'] * 1e3:.2f} ms | "
            f"{r['graph'] * 1e3:.2f} ms | {r['probe']:.1%} | {r['outside']:.1%} | "
            f"{r['finiteness'] / r['product']:.1%} | {r['python']:.1%} | {r['floor']:.1%} | "
            f"{r['autograd'] * 1e3:.2f} ms | "
            f"{r['product'] / r['autograd']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--models", default="mlp,resnet18,gpt2")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    global _clock
    _clock = CLOCKS[a.clock]
    torch.set_num_threads(1)
    rows = [r for m in a.models.split(",") for r in measure(m, a.size, a.rounds)]
    text = (
        f"hessfast {hessfast.__version__}, torch {torch.__version__}, CPU, 1 thread, float32, "
        f"size {a.size}, median of {a.rounds} interleaved rounds; graph and finiteness "
        f"timed inside the product's own call"
        f"{'; thread CPU time' if a.clock == 'cpu' else ''}\n\n{table(rows)}\n"
    )
    print(text)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
