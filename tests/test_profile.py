"""``hessfast profile`` and the engine's profiling hook."""

import json

import pytest
import torch
import torch.nn.functional as F

from hessfast import api, engine
from hessfast.bench_models import build
from hessfast.cli import main
from hessfast.profile import Profiler, profile_workload
from hessfast.rules import registered_rule
from hessfast.rules.fallback import FuncFallback
from hessfast.vectors import parse, select_params

aten = torch.ops.aten

CUMSUM_MODULE = """
import torch, torch.nn.functional as F

class CumsumNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 8)
        self.b = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.tanh(torch.cumsum(self.a(x), dim=1)))

def build(seed=0):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(seed)
    return CumsumNet(), F.cross_entropy, torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)
"""


def test_ops_without_rules_are_what_the_tests_assume():
    assert registered_rule(aten.cumsum.default) is None


def test_profile_lists_an_op_without_a_rule_as_fallback(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_cumsum_model.py").write_text(CUMSUM_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "profile.json"
    code = main(
        [
            "profile",
            "--model",
            "my_cumsum_model:build",
            "--device",
            "cpu",
            "--repeats",
            "1",
            "--threads",
            "1",
        ]
        + ["--k", "2", "--json", str(path)]
    )
    assert code == 0
    out = capsys.readouterr().out
    section = out.split("Ops that fell back to torch.func")[1]
    assert "aten.cumsum.default" in section
    data = json.loads(path.read_text())
    (r,) = data["backends"].values()
    assert [f["name"] for f in r["fallbacks"]] == ["aten.cumsum.default"]
    fb = r["fallbacks"][0]
    assert fb["calls"] == 1 and fb["seconds"] > 0 and 0 < fb["share"] < 1
    assert 0 < r["fallback_share"] < 1
    ops = {x["name"]: x for x in r["by_op"]}
    assert ops["aten.cumsum.default"]["rules"] == ["torch.func fallback"]
    assert ops["aten.linear.default"]["rules"] == ["linear"]
    assert ops["aten.linear.default"]["calls"] == 2
    assert "loss: cross_entropy" in ops
    rules = {x["name"] for x in r["by_rule"]}
    assert {"linear", "torch.func fallback", "cross_entropy"} <= rules
    assert sum(x["share"] for x in r["by_op"]) <= 1.0 + 1e-9


@pytest.mark.slow  # a whole ResNet-18 profiled rule by rule
def test_profile_resnet_has_no_fallback(capsys):
    assert (
        main(
            ["profile", "--model", "resnet18", "--size", "tiny", "--device", "cpu"]
            + ["--repeats", "1", "--threads", "1"]
        )
        == 0
    )
    out = capsys.readouterr().out
    section = out.split("Ops that fell back to torch.func")[1]
    assert "aten.max_pool2d.default" not in section  # pooling has its own rule now
    assert "aten.conv2d.default" not in section  # conv has its own rule
    assert "| conv |" in out and "| pool |" in out


def test_profile_without_fallbacks_says_so(capsys):
    w = build("mlp", "tiny", "cpu", n_batches=1)
    res = profile_workload(w, torch.device("cpu"), mode="ggn", k=2, repeats=1)
    r = res["backends"]["torch"]
    assert r["fallbacks"] == [] and r["fallback_share"] == 0
    phases = {x["name"]: x for x in r["by_rule"]}
    assert phases["linear"]["calls"] == 3 and phases["linear"]["backward_seconds"] > 0
    assert r["seconds_profiled"] >= r["seconds_in_nodes"] > 0


def test_engine_hook_records_every_node_and_changes_nothing():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.GELU(), torch.nn.Linear(5, 3))
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    sel = select_params(model, None)
    vec = parse({n: torch.randn(2, *p.shape) for n, p in sel}, sel)
    plain = api.compute(model, F.cross_entropy, x, y, sel, vec, "hvp", True)
    prof = Profiler(torch.device("cpu"))
    timed = api.compute(model, F.cross_entropy, x, y, sel, vec, "hvp", True, profiler=prof)
    for a, b in zip(plain[1:], timed[1:]):
        assert all(torch.equal(a[n], b[n]) for n in a)
    phases = [(str(s.op) if s is not None else None, p) for s, _, p, _, _ in prof.records]
    assert phases.count(("aten.linear.default", "forward")) == 2
    assert phases.count(("aten.linear.default", "backward")) == 2
    assert phases.count((None, "loss")) == 1
    assert all(sec >= 0 and nb >= 0 for *_, sec, nb in prof.records)
    fwd = [
        nb
        for s, _, p, _, nb in prof.records
        if p == "forward" and str(s.op) == "aten.linear.default"
    ]
    # the first linear's value [7, 5], tangents [2, 7, 5] (and residuals): at least 3 × 35 floats
    assert fwd[0] >= 3 * 35 * 4
    assert not any(isinstance(r, FuncFallback) for _, r, *_ in prof.records)


def test_produced_bytes_counts_new_storages_only():
    a = torch.zeros(10)
    b = torch.zeros(3, 4)
    assert engine.produced_bytes((a, a.view(2, 5), b[0]), (a,)) == b.untyped_storage().nbytes()
    assert engine.produced_bytes([None, {"x": b}], ()) == 48
