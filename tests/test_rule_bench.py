"""The per-rule benchmark harness (benchmarks/rule_bench.py) runs, checks agreement and reports
every implementation with its compulsory bandwidth."""

import importlib
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import hessfast.cuda
from hessfast import registry, rules
from hessfast.rules import activation

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
import bench_activation  # noqa: E402
import rule_bench  # noqa: E402

TANH = torch.ops.aten.tanh.default


class FakeTriton(activation.ElementwiseUnary):
    backend = "triton"

    def __init__(self):
        super().__init__(TANH, "fake_tanh", activation.tanh_derivs, from_result=True)


def test_rule_bench_reports_each_implementation(monkeypatch, capsys):
    monkeypatch.setattr(registry, "_ACCELERATED", {TANH: [FakeTriton()]})
    argv = ["--size", "small", "--k", "2", "--repeats", "1", "--threads", "1"]
    rows = bench_activation.main([*argv, "--cases", "tanh 256×512,relu 256×512"])
    out = capsys.readouterr().out
    tanh = next(r for r in rows if r["case"].startswith("tanh"))
    m = tanh["methods"]["triton hvp"]
    assert m["rel_err_vs_rule"] == 0.0 and m["seconds"] > 0
    # forward: x, ẋ read, y, ẏ written; backward: the residuals y and ẋ, then ḡ, ġ read and
    # ḡ_x, ġ_x written (K = 2)
    n = 256 * 512 * 4
    assert m["bytes"] == n * (1 + 2 + 1 + 2) + n * (1 + 2 + 1 + 2 + 1 + 2)
    assert "| tanh 256×512 | triton hvp |" in out and "copy ceiling" in out
    relu = next(r for r in rows if r["case"].startswith("relu"))
    assert "triton hvp" not in relu["methods"]


def test_compulsory_bytes_counts_new_residuals_once():
    rule = rules.registered_rule(torch.ops.aten.gelu.default)
    x = torch.randn(8, 4)
    call = rule_bench.make_call(torch.ops.aten.gelu.default, (x, "none"), (True, False), 3)
    g, gdot = rule_bench.make_cotangents(x, 3)
    n = x.numel() * 4
    # forward: x, ẋ read; y, ẏ written. backward: residuals x and ẋ, ḡ, ġ read; ḡ_x, ġ_x written
    got = rule_bench.compulsory_bytes(rule, call, g, gdot)
    assert got == n * (1 + 3 + 1 + 3) + n * (1 + 3 + 1 + 3 + 1 + 3)


@pytest.mark.slow  # a fresh pytest process
def test_rule_benchmarks_run_under_pytest_benchmark():
    """``benchmarks/test_rules.py`` runs a case under pytest-benchmark (untimed here:
    ``--benchmark-disable``; one tangent, and the accelerated GGN left out, so that the Triton
    kernel in the interpreter runs once: its HVP takes the accelerated methods' path, the plain
    rule's GGN the GGN's); a method that cannot run the case is skipped with its reason."""
    pytest.importorskip("pytest_benchmark")
    root = Path(__file__).parent.parent
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
         "--benchmark-disable", "--bench-k", "1", "benchmarks/test_rules.py",
         "-k", "activation-tanh and not (triton and ggn)"],
        cwd=root, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout, done.stdout[-3000:]
    if hessfast.cuda.unavailable():
        assert "tanh [cuda] declines" in done.stdout, done.stdout[-3000:]


class _Metafunc:
    """What ``benchmarks/test_rules.py``'s ``pytest_generate_tests`` reads of pytest's metafunc."""

    fixturenames = ("benchmark", "settings", "family", "case", "method")

    def __init__(self):
        options = {"--bench-device": "cpu", "--bench-size": None}
        self.config = SimpleNamespace(getoption=options.__getitem__)
        self.ids = []

    def parametrize(self, names, params):
        assert names == "family, case, method"
        self.ids += [p.id for p in params]


def test_rule_benchmarks_have_every_family():
    """Every ``bench_<op>.py`` that runs through ``rule_bench.main`` gives benchmarks, one per
    case and method, and each family's cases have the plain rule's methods."""
    bench_rules = importlib.import_module("test_rules")
    metafunc = _Metafunc()
    bench_rules.pytest_generate_tests(metafunc)
    assert len(metafunc.ids) == len(set(metafunc.ids))
    root = Path(__file__).parent.parent / "benchmarks"
    families = {p.stem.removeprefix("bench_") for p in root.glob("bench_*.py")
                if "rule_bench.main(" in p.read_text()}  # fmt: skip
    assert families
    for family in families:
        cases = {i.rsplit("-", 1)[0] for i in metafunc.ids if i.startswith(f"{family}-")}
        assert cases, family
        for case in cases:
            for method in bench_rules.STATIC_METHODS:
                assert f"{case}-{method}" in metafunc.ids, (case, method)
