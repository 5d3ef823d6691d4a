"""The per-rule micro-benchmarks as pytest-benchmark benchmarks: every case of every
``bench_<op>.py`` (the files that run through ``rule_bench.main``), one benchmark per method.

    pytest benchmarks/ --benchmark-only                           # small CPU shapes; large on a GPU
    pytest benchmarks/ --benchmark-only -k layer_norm --benchmark-autosave
    pytest benchmarks/ --benchmark-only --benchmark-compare       # against the last saved run
    pytest benchmarks/ --benchmark-only --benchmark-group-by=group --bench-size small
    pytest benchmarks/ --benchmark-disable                        # each method once, as a smoke test

Methods, as in ``rule_bench.py``: ``primal`` (the op alone), ``rule hvp`` / ``rule ggn`` (the
plain-torch rule, ``fwd_jvp`` then ``bwd_jvp``), ``fallback hvp`` (the ``torch.func`` rule) and
``<backend> hvp`` / ``<backend> ggn`` for each Triton / CUDA implementation of the op. A rule or
implementation that declines the call, and a fallback that cannot run it (the fused SDPA kernels
have no double backward), is skipped with the reason. The benchmarks of one case form one group
(``--benchmark-group-by=group`` puts them side by side).

Each benchmark's ``extra_info`` (kept in saved runs and ``--benchmark-json``): family, case, op,
method, device, dtype, K; ``rel_err`` of the method's cotangent tangents against the torch rule
(accelerated implementations, the fallback) or the fallback (the rule's hvp), checked before
timing; and, when
timed, ``bytes`` (the compulsory traffic, ``rule_bench.compulsory_bytes``), ``gb_per_s`` and
``pct_of_copy`` against the copy bandwidth measured in the same session, and ``flops`` (counted
by ``torch.utils.flop_counter`` on the torch rule in the same mode: matmuls, convolutions and
attention), ``tflop_per_s`` and ``pct_of_matmul`` against ``torch.mm`` measured in the same
session. Options (``benchmarks/conftest.py``): ``--bench-device``, ``--bench-size``,
``--bench-dtype``, ``--bench-k``.
"""

from __future__ import annotations

import contextlib
import importlib
from pathlib import Path

import pytest
import rule_bench
import torch
from torch.utils.flop_counter import FlopCounterMode

from hessfast.bench.timing import free_memory, sync
from hessfast.dispatch import reasons
from hessfast.rules import fallback_for, registered_rule
from hessfast.rules.base import invoke

HERE = Path(__file__).parent
STATIC_METHODS = ("primal", "rule hvp", "rule ggn", "fallback hvp")


def families() -> dict[str, object]:
    """``bench_<op>.py`` modules that run through the shared harness, by family name."""
    found = {}
    for path in sorted(HERE.glob("bench_*.py")):
        if "rule_bench.main(" in path.read_text():
            found[path.stem.removeprefix("bench_")] = importlib.import_module(path.stem)
    return found


def _methods(op) -> list[str]:
    backends = dict.fromkeys(impl.backend for impl in rule_bench.accelerated(op))
    return [*STATIC_METHODS, *(f"{b} {mode}" for b in backends for mode in ("hvp", "ggn"))]


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    dev = torch.device(metafunc.config.getoption("--bench-device"))
    size = metafunc.config.getoption("--bench-size") or ("large" if dev.type == "cuda" else "small")
    params = []
    for family, mod in families().items():
        for case in mod.CASES[size]:
            for method in _methods(case[1]):
                params.append(pytest.param(family, case, method, id=f"{family}-{case[0]}-{method}"))
    metafunc.parametrize("family, case, method", params)


class Ceilings:
    """The copy bandwidth and ``torch.mm`` throughput of this session's device and dtype,
    measured once each, on first need."""

    def __init__(self, dev, dtype):
        self.dev, self.dtype, self._copy, self._mm = dev, dtype, None, None

    def copy_bytes_per_s(self) -> float:
        if self._copy is None:
            with torch.no_grad():
                self._copy = rule_bench.copy_ceiling(self.dev, self.dtype)
        return self._copy

    def matmul_flops_per_s(self) -> float:
        if self._mm is None:
            with torch.no_grad():
                self._mm = rule_bench.matmul_ceiling(self.dev, self.dtype)
        return self._mm


@pytest.fixture(scope="session")
def settings(request):
    opt = request.config.getoption
    dev = torch.device(opt("--bench-device"))
    dtype = rule_bench.DTYPES[opt("--bench-dtype")]
    return {"dev": dev, "dtype": dtype, "k": opt("--bench-k"), "ceilings": Ceilings(dev, dtype)}


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _implementation(op, backend):
    if backend == "rule":
        return registered_rule(op)
    if backend == "fallback":
        return fallback_for(op)
    return next(i for i in rule_bench.accelerated(op) if i.backend == backend)


def test_rule(benchmark, settings, family, case, method):
    dev, dtype, k = settings["dev"], settings["dtype"], settings["k"]
    label, op, build, active = case[:4]
    context = case[4] if len(case) > 4 else contextlib.nullcontext
    backend, _, mode = method.partition(" ")
    benchmark.group = f"{family}: {label}"
    info = benchmark.extra_info
    info.update(
        family=family, case=label, op=str(op), method=method, device=str(dev), k=k,
        dtype=str(dtype).removeprefix("torch."),
    )  # fmt: skip
    with torch.no_grad(), context():
        torch.manual_seed(0)
        args = tuple(build(dev, dtype))
        call = rule_bench.make_call(op, args, active, k)
        g, gdot = rule_bench.make_cotangents(invoke(op, args), k)
        gbar = g if mode == "hvp" else None
        rule = registered_rule(op)

        def pair(impl):
            return lambda: impl.bwd_jvp(impl.fwd_jvp(call)[2], gbar, gdot)

        if backend == "primal":
            impl, fn = None, lambda: invoke(op, args)
        else:
            impl = _implementation(op, backend)
            if backend == "rule":
                if impl is None:
                    pytest.skip(f"no hand-written rule for {op}")
                declined = impl.declines(call)
                if declined:
                    pytest.skip(f"the rule declines: {declined}")
            elif backend != "fallback":
                why = reasons(impl, call, explicit=True)
                if why:
                    pytest.skip(f"{impl.name} [{backend}] declines: {'; '.join(why)}")
            fn = pair(impl)
            try:  # agreement before timing
                got = fn()[1]
            except Exception as e:
                if backend != "fallback":
                    raise
                pytest.skip(f"the fallback cannot run this case: {type(e).__name__}: {e}")
            ref = fallback_for(op) if backend == "rule" else rule
            if ref is not None and not (backend == "rule" and mode == "ggn"):
                with contextlib.suppress(Exception):  # a fallback that fails is its own benchmark
                    info["rel_err"] = rule_bench.rel_err(got, pair(ref)()[1], active)
        if impl is not None and backend != "fallback":
            info["bytes"] = rule_bench.compulsory_bytes(impl, call, gbar, gdot)
        counted = fn if impl is None or backend in ("rule", "fallback") else pair(rule)
        flops = _flops(counted)
        if flops:
            info["flops"] = flops

        def timed():
            out = fn()
            sync(dev)
            return out

        benchmark(timed)
    free_memory(dev)
    if benchmark.stats is None:  # --benchmark-disable: ran once, not timed
        return
    seconds = benchmark.stats.stats.median
    ceilings = settings["ceilings"]
    if "bytes" in info:
        copy = ceilings.copy_bytes_per_s()
        info.update(
            gb_per_s=info["bytes"] / seconds / 1e9,
            copy_gb_per_s=copy / 1e9,
            pct_of_copy=100 * info["bytes"] / seconds / copy,
        )
    if "flops" in info:
        mm = ceilings.matmul_flops_per_s()
        info.update(
            tflop_per_s=info["flops"] / seconds / 1e12,
            matmul_tflop_per_s=mm / 1e12,
            pct_of_matmul=100 * info["flops"] / seconds / mm,
        )
