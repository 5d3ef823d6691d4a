"""``hessfast bench``: the CPU smoke run of every built-in model (CI runs it), user models, and
failures reported rather than dropped. The built-in models' smoke runs (seconds each on two cores)
carry the ``slow`` marker; ``pytest -m "not slow"`` keeps the unit tests and the two runs on small
MLPs in the interpreter (a fraction of a second each).

Five runs in all: each checks every property its rows can show. Only the MLP's times hessfast's
default (traced) mode; the others time the interpreter (``--modes interpret``), whose rows take the
same paths through the benchmark, without tracing each product signature of each model
(``tests/test_traced.py`` tests tracing)."""

import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch

import hessfast
from hessfast import bench
from hessfast.cli import main

STATUSES = {"pass", "fail", "error", "unavailable"}
HESSFAST = [
    "hessfast.grad",
    "hessfast.hvp",
    "hessfast.ggn_vp",
    "hessfast.hvp K=2",
    "hessfast.residual_vp (R = H − G, one pass)",
    "hessfast.hvp − hessfast.ggn_vp (two passes)",
]
AUTOGRAD = ["torch.func jvp(grad)", "double backward", "torch.func GGN (jvp+vjp)"]


def _no_constants(name):
    raise ValueError(f"non-finite number {name} in the JSON")


def _numbers(x):
    if isinstance(x, bool):
        return
    if isinstance(x, (int, float)):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _numbers(v)
    elif isinstance(x, list):
        for v in x:
            yield from _numbers(v)


COMMON = ["--size", "tiny", "--repeats", "1", "--k", "2", "--threads", "1"]
ENGINE = Path(__file__).parent.parent / "benchmarks" / "bench_engine.py"


def _run(tmp_path, *args, engine=False):
    """``hessfast bench`` on tiny inputs; with ``engine``, through ``benchmarks/bench_engine.py``
    run as a script (its ``--models`` is ``--model``), which exits with the code."""
    path = tmp_path / "out.json"
    if engine:
        args = ["--models" if a == "--model" else a for a in args]
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "argv", ["bench_engine.py", *COMMON, "--json", str(path), *args])
            with pytest.raises(SystemExit) as e:
                runpy.run_path(str(ENGINE), run_name="__main__")
        code = e.value.code
    else:
        code = main(["bench", *COMMON, "--json", str(path), *args])
    data = json.loads(path.read_text(), parse_constant=_no_constants)
    return code, data


def _rows(data):
    (res,) = data["results"]
    return {r["method"]: r for r in res["rows"]}, res


def _check_rows(rows, res):
    for label, r in rows.items():
        assert r["status"] in STATUSES, label
        if r["status"] == "pass":
            assert r["rel_err"] is not None and r["rel_err"] <= res["tolerance"], label
            assert r["seconds"] > 0 and r["seconds_per_vector"] > 0, label
            assert r["ratio_to_gradient"] > 0, label
        else:
            assert isinstance(r.get("error"), str) and r["error"], label
        if r["status"] == "fail":
            assert "seconds" in r, f"{label}: a wrong method is still timed"


@pytest.mark.slow
@pytest.mark.parametrize("model", ["mlp", "resnet18", "gpt2"])
def test_bench_tiny_smoke(model, tmp_path, capsys):
    """Every built-in model's rows. The MLP runs through ``benchmarks/bench_engine.py`` (the
    wrapper kept for old results files) in hessfast's default mode; ResNet-18 and the GPT time
    hessfast's interpreter (tracing twenty convolutions, or the GPT's blocks, once per product
    signature would cost most of the test; ``tests/test_traced.py`` traces the zoo's)."""
    mode = "traced" if model == "mlp" else "interpret"
    tag = "[torch]" if mode == "traced" else f"[torch, {mode}]"
    args = ["--model", model] + ([] if mode == "traced" else ["--modes", mode])
    code, data = _run(tmp_path, *args, engine=model == "mlp")
    assert code == 0
    assert all(math.isfinite(v) for v in _numbers(data))
    prov = data["provenance"]
    for key in ("device", "torch", "cuda", "triton", "dtype", "tf32", "date", "commit", "hessfast"):
        assert key in prov
    assert prov["dtype"] == "float32" and prov["size"] == "tiny" and prov["k"] == 2
    rows, res = _rows(data)
    assert res["model"] == model and res["parameters"] > 0
    assert "float64" in res["reference"] and res["tolerance"] == 1e-4
    _check_rows(rows, res)
    assert rows["gradient (autograd)"]["status"] == "pass"
    assert rows["gradient (autograd)"]["ratio_to_gradient"] == pytest.approx(1.0)
    for name in HESSFAST:
        r = rows[f"{name} {tag}"]
        assert r["status"] == "pass", (name, r.get("error"))
        assert r["rel_err"] < 1e-5
    assert rows[f"hessfast.hvp K=2 {tag}"]["vectors"] == 2
    for label in (
        "PyHessian hvp",
        "curvlinops HessianLinearOperator",
        "curvlinops GGNLinearOperator",
    ):
        assert any(m.startswith(label) for m in rows), f"{label} missing from the table"
    if model == "gpt2":
        # the fused SDPA kernels have no forward-mode derivative nor double backward on CPU:
        # reported as failed, not dropped, and repeated under the math backend, where they pass
        for label in [*AUTOGRAD, "torch.func vmap K=2"]:
            assert rows[label]["status"] == "error"
            assert "scaled_dot_product" in rows[label]["error"]
            assert rows[label + ", math attention"]["status"] == "pass"
        assert res["uses_sdpa"]
    else:
        for label in [*AUTOGRAD, "torch.func vmap K=2"]:
            assert rows[label]["status"] == "pass", rows[label].get("error")
        assert not any("math attention" in m for m in rows)
    out = capsys.readouterr().out
    assert "| method |" in out and f"hessfast.hvp {tag}" in out


USER_MODULE = '''
import torch, torch.nn.functional as F

def build(batch_size=None, seed=0):
    """A user's regression MLP with an MSE loss."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    g = torch.Generator().manual_seed(seed)
    n = batch_size or 12
    return model, F.mse_loss, torch.randn(n, 5, generator=g), torch.randn(n, 3, generator=g)

def build_no_seed():
    model, loss, x, y = build()
    return model, loss, (x,), y
'''


def test_bench_user_model(tmp_path, monkeypatch):
    mod = tmp_path / "my_bench_models.py"
    mod.write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["--model", "my_bench_models:build", "--batch-size", "7", "--modes", "interpret"]
    code, data = _run(tmp_path, *args)
    assert code == 0
    rows, res = _rows(data)
    assert res["model"] == "my_bench_models:build"
    assert res["description"] == "A user's regression MLP with an MSE loss."
    assert res["parameters"] == 5 * 16 + 16 + 16 * 3 + 3
    assert res["batches"] == 3 and data["provenance"]["batch_size"] == 7
    _check_rows(rows, res)
    assert all(rows[f"{n} [torch, interpret]"]["status"] == "pass" for n in HESSFAST)
    assert rows["double backward"]["status"] == "pass"


def test_user_batches_are_rotated(tmp_path, monkeypatch):
    from hessfast.bench_models import build

    path = tmp_path / "my_rot_models.py"
    path.write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    # a module, or a path to a file; a function with ``seed`` is called once per batch, one
    # without it gets its batch rolled
    specs = ("my_rot_models:build", "my_rot_models:build_no_seed", f"{path}:build_no_seed")
    for spec in specs:
        w = build(spec, "tiny", "cpu", n_batches=3)
        assert sum(p.numel() for p in w.model.parameters()) == 5 * 16 + 16 + 16 * 3 + 3
        xs = [b[0][0] for b in w.batches]
        assert all(x.shape == xs[0].shape for x in xs)
        assert not torch.equal(xs[0], xs[1]) and not torch.equal(xs[1], xs[2])
    rolled = build(f"{path}:build_no_seed", "tiny", "cpu", n_batches=2).batches
    assert torch.equal(rolled[1][0][0], torch.roll(rolled[0][0][0], 1, 0))
    assert torch.equal(rolled[1][1], torch.roll(rolled[0][1], 1, 0))
    w = build("gpt2", "tiny", "cpu", seq_len=8, batch_size=3)
    assert w.batches[0][0][0].shape == (3, 8)
    assert not torch.equal(w.batches[0][0][0], w.batches[1][0][0])


def test_failures_are_reported_not_raised(tmp_path, monkeypatch, capsys):
    """One run where things go wrong: ``torch.compile`` raises, hessfast's HVP is 1 % off and no
    peer is installed. Each is a row with its reason; only the wrong hessfast rows fail the run
    (exit 1, listed on stderr), and a wrong row is still timed."""

    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("dynamo says no")

        return run

    real = hessfast.hvp

    def wrong(*a, **k):
        out = real(*a, **k)
        return {n: 1.01 * t for n, t in out.items()}

    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(hessfast, "hvp", wrong)
    monkeypatch.setattr(bench.methods, "importable", lambda name: False)
    code, data = _run(tmp_path, "--model", "mlp", "--compile", "--modes", "interpret")
    assert code == 1
    rows, res = _rows(data)
    _check_rows(rows, res)
    for label in ("torch.compile(torch.func jvp(grad))", "torch.compile(torch.func GGN)"):
        assert rows[label]["status"] == "error"
        assert "dynamo says no" in rows[label]["error"]
    tag = "[torch, interpret]"
    r = rows[f"hessfast.hvp {tag}"]
    assert r["status"] == "fail" and r["rel_err"] == pytest.approx(0.01, rel=1e-3)
    assert "exceeds the tolerance" in r["error"]
    assert rows[f"hessfast.ggn_vp {tag}"]["status"] == "pass"
    # the rows that call hessfast.hvp fail, and they are the whole list of failures
    wrong_rows = {m for m, r in rows.items() if r["hessfast"] and r["status"] != "pass"}
    assert wrong_rows == {
        f"hessfast.hvp {tag}",
        f"hessfast.hvp K=2 {tag}",
        f"hessfast.hvp − hessfast.ggn_vp (two passes) {tag}",
    }
    listed = capsys.readouterr().err.split("hessfast failed its correctness check:")[1]
    assert sorted(line.strip() for line in listed.strip().splitlines()) == sorted(
        f"mlp: {m} ({rows[m]['error']})" for m in wrong_rows
    )
    for label in (
        "PyHessian hvp",
        "curvlinops HessianLinearOperator",
        "curvlinops GGNLinearOperator",
    ):
        assert rows[label]["status"] == "unavailable"
        assert rows[label]["error"] == "not installed"


def test_rel_error():
    ref = {"a": torch.tensor([3.0, 4.0]), "b": torch.zeros(2)}
    assert bench.rel_error(ref, ref, ["a", "b"], False) == 0.0
    got = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.5, 0.0])}
    assert bench.rel_error(got, ref, ["a", "b"], False) == pytest.approx(0.1)
    batched = {n: torch.stack([t, 2 * t]) for n, t in ref.items()}
    worse = {n: torch.stack([t, t]) for n, t in ref.items()}
    assert bench.rel_error(worse, batched, ["a", "b"], True) == pytest.approx(0.5)
    assert (
        bench.rel_error({"a": torch.tensor([math.nan, 1.0])}, {"a": ref["a"]}, ["a"], False)
        == math.inf
    )
    assert bench.rel_error({}, ref, ["a"], False) == math.inf


def test_default_json_path_and_commit():
    assert bench.default_json_path(["mlp"], "tiny") == Path("benchmarks/out/bench-mlp-tiny.json")
    p = bench.default_json_path(["pkg.mod:fn", "gpt2"], "small")
    assert p.name == "bench-pkg.mod-fn+gpt2-small.json"
    commit = bench.git_commit()
    assert commit is None or (len(commit) == 12 and int(commit, 16) >= 0)


def test_backends_option_is_checked(monkeypatch):
    from hessfast.bench import parse_backends

    cpu = torch.device("cpu")
    assert parse_backends(None, cpu) is None
    assert parse_backends("torch, AUTO", cpu) == ["torch", "auto"]
    with pytest.raises(SystemExit, match="unknown backend 'xla'"):
        parse_backends("torch,xla", cpu)
    monkeypatch.setattr("hessfast.cuda._LOADED", "extension not built (simulated)")
    with pytest.raises(SystemExit, match="cuda cannot run here: extension not built"):
        parse_backends("cuda", cpu)
