"""hessfast.decompose: H = G + R against dense float64 H, G and H − G of a small MLP."""

import json

import oracle
import pytest
import torch
from models import zoo
from test_operator_algebra import _dense

import hessfast
from hessfast import traced
from hessfast.algorithms.trace import trace_probes, trace_with_probes

D = torch.float64
K = 4


@pytest.fixture(scope="module")
def problem():
    model, lf, (x,), y = zoo.mlp()
    data = [((x[:5],), y[:5]), ((x[5:],), y[5:])]
    Hd = oracle.dense_hessian(model, lf, (x,), y)
    Gd = _dense(oracle.ggn_vp, model, lf, (x,), y)
    return model, lf, data, Hd, Gd


@pytest.fixture(scope="module")
def dec(problem):
    model, lf, data, _, _ = problem
    # interpreted: the run takes a dozen product signatures (block sizes), and tracing them was
    # most of its time; test_analyze_decompose_writes_the_section_and_the_plot runs the traced path
    return hessfast.decompose(
        model,
        lf,
        data,
        k=K,
        trace_matvecs=30,
        density_probes=4,
        density_steps=30,
        seed=0,
        compile="interpret",
    )


def test_eigenvalues_match_dense_h_g_and_h_minus_g(problem, dec):
    *_, Hd, Gd = problem
    dense = {"hessian": Hd, "ggn": Gd, "residual": Hd - Gd}
    for part, M in dense.items():
        ref = torch.linalg.eigvalsh(M).flip(0)[:K]
        torch.testing.assert_close(
            torch.tensor(dec.eigenvalues[part], dtype=D), ref, rtol=1e-7, atol=1e-10
        )
        assert dec.converged[part]
    for part in ("hessian", "residual"):
        lam = float(torch.linalg.eigvalsh(dense[part])[0])
        assert dec.lambda_min[part]["converged"]
        assert dec.lambda_min[part]["value"] == pytest.approx(lam, rel=1e-6, abs=1e-10)
    assert dec.lambda_min["residual"]["value"] < 0  # R carries negative curvature here
    assert set(dec.lambda_min) == {"hessian", "residual"}


def test_traces_share_probes_so_the_identity_holds_on_the_estimates(problem, dec):
    *_, Hd, Gd = problem
    tr = {p: dec.trace[p].estimate for p in ("hessian", "ggn", "residual")}
    scale = sum(abs(v) for v in tr.values())
    assert abs(dec.trace_gap) <= 1e-12 * scale
    assert tr["hessian"] - tr["ggn"] - tr["residual"] == pytest.approx(dec.trace_gap, abs=1e-15)
    assert {t.method for t in dec.trace.values()} == {"hutch++"}
    # the same estimates by hand from the same probes on the dense matrices
    probes = trace_probes(Hd, num_matvecs=30, seed=0)
    for part, M in {"hessian": Hd, "ggn": Gd, "residual": Hd - Gd}.items():
        ref = trace_with_probes(M, probes).estimate
        assert tr[part] == pytest.approx(ref, rel=1e-9, abs=1e-12)
        # statistical: Hutch++ with 30 products on P = 164, fixed seed; within 4 stderr + 5%
        truth = float(M.trace())
        assert abs(tr[part] - truth) <= 4 * dec.trace[part].stderr + 0.05 * abs(truth)


def test_exact_traces_when_the_budget_covers_p(problem):
    model, lf, data, Hd, Gd = problem
    P = Hd.shape[0]
    # interpreted, as ``dec`` is (the exact branch is the trace estimator's, not the engine's)
    d = hessfast.decompose(
        model, lf, data, k=2, trace_matvecs=P, density=False, compile="interpret"
    )
    for part, M in {"hessian": Hd, "ggn": Gd, "residual": Hd - Gd}.items():
        assert d.trace[part].method == "exact"
        assert d.trace[part].estimate == pytest.approx(float(M.trace()), rel=1e-10, abs=1e-12)


def test_overlap_matches_dense_eigenvectors(problem, dec):
    *_, Hd, Gd = problem
    U_H = torch.linalg.eigh(Hd).eigenvectors[:, -K:]
    U_G = torch.linalg.eigh(Gd).eigenvectors[:, -K:]
    ref = float((U_H.T @ U_G).square().sum()) / K
    assert dec.overlap == pytest.approx(ref, abs=1e-6)
    assert 0.0 < dec.overlap < 1.0
    V = dec.eigenvectors["hessian"]
    torch.testing.assert_close(V.T @ V, torch.eye(K, dtype=D), rtol=0, atol=1e-8)


def test_report_dict_plot_and_outliers(dec, tmp_path):
    d = dec.to_dict()
    json.dumps(d, allow_nan=False)
    assert (
        set(d["eigenvalues"])
        == set(d["outliers"])
        == set(d["density"])
        == {
            "hessian",
            "ggn",
            "residual",
        }
    )
    for part, o in dec.outliers.items():
        assert o["method"] == "density" and 0 <= o["count"] <= K
        assert o["values"] == dec.eigenvalues[part][: o["count"]]
    assert all(n > 0 for n in dec.products.values())
    assert dec.residual_operator == "ResidualOperator"  # one engine pass per product of R
    png = dec.plot(tmp_path / "decomposition.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_criterion_reaches_every_eigsh_and_the_eigenvalues_match_dense(problem, monkeypatch):
    """``criterion="eigenvalue"`` reaches the five eigsh runs (top of H, G and R; ``λ_min`` of H
    and R); the eigenvalues still match the dense spectra within ``tol·|λ|``; a bad value is
    eigsh's error."""
    import sys

    mod = sys.modules["hessfast.decompose"]
    model, lf, data, Hd, Gd = problem
    seen = []
    eigsh = mod.eigsh

    def spy(*args, **kwargs):
        seen.append(kwargs.get("criterion"))
        return eigsh(*args, **kwargs)

    monkeypatch.setattr(mod, "eigsh", spy)
    tol = 1e-6
    d = hessfast.decompose(
        model, lf, data, k=2, tol=tol, criterion="eigenvalue", density=False, trace_matvecs=3,
        compile="interpret",
    )  # fmt: skip
    assert seen == ["eigenvalue"] * 5
    for part, M in {"hessian": Hd, "ggn": Gd, "residual": Hd - Gd}.items():
        ref = torch.linalg.eigvalsh(M).flip(0)[:2]
        got = torch.tensor(d.eigenvalues[part], dtype=D)
        assert float((got - ref).abs().max()) <= tol * float(ref.abs().max())
    with pytest.raises(ValueError, match="criterion must be one of"):
        hessfast.decompose(model, lf, data, k=2, criterion="residuals", density=False)


def test_without_densities_and_bad_k(problem, tmp_path):
    model, lf, data, Hd, _ = problem
    d = hessfast.decompose(model, lf, data, k=2, density=False, trace_matvecs=3)
    assert d.density is None and d.to_dict()["density"] is None
    # one Hutchinson sample beside a one-column sketch: no spread, an infinite stderr -> None
    assert d.trace["hessian"].stderr == float("inf")
    assert json.loads(json.dumps(d.to_dict(), allow_nan=False))["trace"]["ggn"]["stderr"] is None
    assert abs(d.trace_gap) <= 1e-12 * abs(d.trace["ggn"].estimate)
    assert d.outliers["hessian"]["method"] == "gap"
    d.plot(tmp_path / "ranks.png")
    with pytest.raises(ValueError, match="k must be a positive integer"):
        hessfast.decompose(model, lf, data, k=0)
    with pytest.raises(ValueError, match="different parameters"):
        hessfast.decompose.decompose_operators(
            hessfast.HessianOperator(model, lf, data, params=["0.weight", "0.bias", "2.bias"]),
            hessfast.GGNOperator(model, lf, data, params=["2.weight"]),
        )


ENTRY = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def loader():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(2)]
"""


def test_analyze_decompose_writes_the_section_and_the_plot(tmp_path, capsys):
    import importlib.util

    import torch.nn.functional as F

    from hessfast.cli import main

    path = tmp_path / "hf_decompose_entry.py"
    path.write_text(ENTRY)
    out = tmp_path / "res"
    args = ["--model", f"{path}:build", "--data", f"{path}:loader", "--dtype", "float64"]
    code = main(
        ["analyze", "--no-progress", *args, "--top-k", "3", "--decompose", "--density"]
        + ["--no-lambda-min", "--out", str(out)]
    )
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "Gauss-Newton decomposition H = G + R" in stdout and "top R:" in stdout
    report = json.loads((out / "report.json").read_text())
    assert (out / "decomposition.png").read_bytes()[:4] == b"\x89PNG"
    assert report["files"]["decomposition"] == str(out / "decomposition.png")
    dec = report["decompose"]
    spec = importlib.util.spec_from_file_location("hf_decompose_entry_ref", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.build().double().eval()
    x = torch.cat([b[0] for b in mod.loader()]).double()
    y = torch.cat([b[1] for b in mod.loader()])
    Hd = oracle.dense_hessian(model, F.cross_entropy, (x,), y)
    Gd = _dense(oracle.ggn_vp, model, F.cross_entropy, (x,), y)
    for part, M in {"hessian": Hd, "ggn": Gd, "residual": Hd - Gd}.items():
        ref = torch.linalg.eigvalsh(M).flip(0)[:3]
        got = torch.tensor(dec["eigenvalues"][part], dtype=D)
        torch.testing.assert_close(got, ref, rtol=1e-7, atol=1e-10)
    assert dec["lambda_min"]["residual"]["value"] == pytest.approx(
        float(torch.linalg.eigvalsh(Hd - Gd)[0]), rel=1e-6, abs=1e-10
    )
    assert report["products"]["decompose"] == sum(dec["products"].values())


def test_decompose_section_builds_h_from_a_ggn_operator_with_its_settings(problem):
    from hessfast.analyze.analysis import decompose_section

    model, lf, data, Hd, Gd = problem
    # interpreted: tracing the micro-batches' new shapes would be most of the test, and H is
    # built with G's compile setting as well as its max_batch_size
    G = hessfast.GGNOperator(model, lf, data, max_batch_size=4, compile="interpret")
    before = traced.TRACE_COUNT
    sec = decompose_section(G, k=2, density=False, trace_matvecs=9)
    assert sec["residual_operator"] == "ResidualOperator"  # H built with G's settings
    assert traced.TRACE_COUNT == before  # nothing traced: H interprets too
    for part, M in {"hessian": Hd, "ggn": Gd, "residual": Hd - Gd}.items():
        ref = torch.linalg.eigvalsh(M).flip(0)[:2]
        torch.testing.assert_close(
            torch.tensor(sec["eigenvalues"][part], dtype=D), ref, rtol=1e-7, atol=1e-10
        )
    with pytest.raises(ValueError, match="HessianOperator or GGNOperator"):
        decompose_section(hessfast.DenseOperator(Hd), k=2)
