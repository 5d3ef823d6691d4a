"""``hessfast demo --quick`` end to end: the summary, a valid report.json and a PNG, and the
report's numbers against a dense eigendecomposition of the same model's Hessian."""

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracle import dense_hessian, ggn_vp, param_offsets

from hessfast.analyze import count_outliers
from hessfast.cli import main
from hessfast.demo import setup

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


def _strict(s: str):
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c}")

    return json.loads(s, parse_constant=bad)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "hessfast-demo"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["demo", "--quick", "--out", str(out)])
    return code, buf.getvalue(), out


@pytest.fixture(scope="module")
def dense():
    """The float64 Hessian of the quick demo's trained model over its data, from
    ``torch.autograd.functional.hessian``."""
    s = setup(quick=True, seed=0)
    x = torch.cat([b[0] for b in s.data])
    y = torch.cat([b[1] for b in s.data])
    return dense_hessian(s.model, F.cross_entropy, (x,), y), param_offsets(s.model)


@pytest.mark.slow  # the whole quick demo (demo_run): tens of seconds on two cores
def test_demo_quick_runs_and_writes_the_report(demo_run):
    code, out, folder = demo_run
    assert code == 0, out
    assert "relative error" in out
    assert "separate from the bulk (10 classes)" in out
    assert (
        f"wrote {folder / 'report.json'}, {folder / 'spectrum.png'}, "
        f"{folder / 'landscape_1d.png'} and {folder / 'decomposition.png'}"
    ) in out
    assert "Gauss-Newton decomposition H = G + R" in out
    assert "landscape along the top Hessian eigenvector" in out
    report = _strict((folder / "report.json").read_text())
    for key in (
        "eigenvalues",
        "lambda_max",
        "lambda_min",
        "condition_number",
        "trace",
        "density",
        "outliers",
        "layerwise",
        "hvp_check",
        "training",
        "landscape",
        "decompose",
    ):
        assert key in report, key
    assert report["hvp_check"]["ok"]
    assert report["classes"] == 10 and report["outliers"]["classes"] == 10
    assert report["eigenvalues"]["converged"]
    for name in ("spectrum.png", "landscape_1d.png", "decomposition.png"):
        png = (folder / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, name
    assert report["files"]["landscape"] == str(folder / "landscape_1d.png")
    assert report["landscape"]["files"] == {"png": "landscape_1d.png"}


@pytest.mark.slow  # the whole quick demo (demo_run): tens of seconds on two cores
def test_demo_report_matches_dense_eigendecomposition(demo_run, dense):
    code, _, folder = demo_run
    assert code == 0
    report = json.loads((folder / "report.json").read_text())
    H, offsets = dense
    P = H.shape[0]
    assert report["operator"]["size"] == P
    evals = torch.linalg.eigvalsh(H)
    lam_max = float(evals[-1])
    fp32 = 1e-4 * lam_max  # the demo's HVPs are float32

    top = report["eigenvalues"]["values"]
    res = report["eigenvalues"]["residuals"]
    ref = evals.flip(0)[: len(top)].tolist()
    for got, want, r in zip(top, ref, res):
        assert abs(got - want) <= r + fp32, (got, want, r)

    lmin = report["lambda_min"]
    assert lmin["converged"]
    assert abs(lmin["value"] - float(evals[0])) <= lmin["residual"] + fp32

    cond = report["condition_number"]
    if float(evals[0]) <= 0:
        assert cond["value"] is None and cond["note"]
    else:
        assert math.isclose(cond["value"], lam_max / float(evals[0]), rel_tol=1e-3)

    tr = report["trace"]
    exact = float(H.trace())
    assert abs(tr["estimate"] - exact) <= 5 * tr["stderr"] + 1e-3 * abs(exact), (tr, exact)

    d = report["density"]
    assert d["lambda_max"] <= lam_max + fp32 and d["lambda_min"] >= float(evals[0]) - fp32
    assert abs(np.trapezoid(d["values"], d["grid"]) - 1.0) < 1e-6

    # the outlier count follows from the eigenvalues by the rule the report names
    dense_count = count_outliers(ref, d)["count"]
    assert report["outliers"]["count"] == dense_count
    assert report["outliers"]["method"] == "density"

    # per layer: each module's diagonal block
    groups = {}
    for name, (a, b) in offsets.items():
        groups.setdefault(name.rsplit(".", 1)[0], []).append((a, b))
    assert set(report["layerwise"]) == set(groups)
    for label, ranges in groups.items():
        idx = torch.cat([torch.arange(a, b) for a, b in ranges])
        block = H[idx][:, idx]
        r = report["layerwise"][label]
        want = float(torch.linalg.eigvalsh(block)[-1])
        assert abs(r["lambda_max"] - want) <= r["residual_max"] + fp32, (label, r, want)
        exact_tr = float(block.trace())
        assert abs(r["trace"] - exact_tr) <= 5 * r["trace_stderr"] + 1e-3 * abs(exact_tr)


def test_demo_missing_device_is_a_usage_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as e:
        main(["demo", "--quick", "--device", "cuda"])
    assert e.value.code == 2
    assert "torch sees no CUDA device" in capsys.readouterr().err


@pytest.mark.slow  # the whole quick demo (demo_run): tens of seconds on two cores
def test_demo_landscape_panel_against_the_dense_top_eigenvector(demo_run, dense):
    """The panel's loss is the training loss along the top eigenvector of the dense Hessian, and
    its quadratic model is ``L₀ + g t + ½λ_max t²`` over ``±√(2L₀/λ_max)``."""
    code, _, folder = demo_run
    assert code == 0
    report = json.loads((folder / "report.json").read_text())
    land = report["landscape"]
    H, offsets = dense
    ev, vecs = torch.linalg.eigh(H)
    lam = float(ev[-1])
    assert land["kind"] == "top" and land["operator"] == "Hessian" and land["ndim"] == 1
    assert land["eigenvalues"] == report["eigenvalues"]["values"][:1]
    assert abs(land["eigenvalues"][0] - lam) <= report["lambda_max"]["residual"] + 1e-4 * lam
    t = np.asarray(land["coords"][0])
    assert len(t) == 21 and t[10] == 0.0
    s = math.sqrt(2 * land["loss0"] / land["eigenvalues"][0])
    np.testing.assert_allclose(t[[0, -1]], [-s, s], rtol=1e-12)
    quad = land["loss0"] + land["slope"][0] * t + 0.5 * land["eigenvalues"][0] * t**2
    np.testing.assert_allclose(land["quadratic"], quad, rtol=1e-12)

    st = setup(quick=True, seed=0)
    model = st.model.double()
    x = torch.cat([b[0] for b in st.data]).double()
    y = torch.cat([b[1] for b in st.data])
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    want = []
    for ti in t:
        flat, params = theta + float(ti) * vecs[:, -1], {}
        for name, (a, b) in offsets.items():
            params[name] = flat[a:b].view_as(dict(model.named_parameters())[name])
        want.append(float(F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)))
    want = np.asarray(want)
    got = np.asarray(land["loss"])
    if np.abs(got - want).max() > np.abs(got - want[::-1]).max():
        want = want[::-1]  # the eigenvector's sign is free
    # float32 products and a Lanczos vector, against float64 along the exact eigenvector
    np.testing.assert_allclose(got, want, rtol=2e-5)  # measured: 5e-8
    assert land["loss"][10] == pytest.approx(report["training"]["loss"], rel=1e-5)


@pytest.mark.slow  # the whole quick demo (demo_run): tens of seconds on two cores
def test_demo_decomposition_against_dense_h_g_and_r(demo_run, dense):
    """The demo's Gauss-Newton decomposition: top eigenvalues of H, G and R = H − G and λ_min of
    H and R against the dense float64 matrices of the same model and data (G from the
    ``torch.func`` oracle, column by column), the traces within their error bars, and the trace
    identity on the shared probes."""
    code, _, folder = demo_run
    assert code == 0
    dec = _strict((folder / "report.json").read_text())["decompose"]
    H, _ = dense
    s = setup(quick=True, seed=0)
    model = s.model.double()
    x = torch.cat([b[0] for b in s.data]).double()
    y = torch.cat([b[1] for b in s.data])
    P = H.shape[0]
    eye = torch.eye(P, dtype=torch.float64)
    v, off = {}, 0
    for n, p in model.named_parameters():
        v[n] = eye[:, off : off + p.numel()].reshape(P, *p.shape)
        off += p.numel()
    cols = ggn_vp(model, F.cross_entropy, (x,), y, v)
    G = torch.cat([cols[n].reshape(P, -1) for n, _ in model.named_parameters()], dim=1)
    G = (G + G.T) / 2
    mats = {"hessian": H, "ggn": G, "residual": H - G}
    fp32 = 1e-4 * float(torch.linalg.eigvalsh(H)[-1])  # the demo's products are float32
    for part, M in mats.items():
        evals = torch.linalg.eigvalsh(M)
        want = evals.flip(0)[: dec["k"]].tolist()
        for got, w, r in zip(dec["eigenvalues"][part], want, dec["residual_norms"][part]):
            assert abs(got - w) <= r + fp32, (part, got, w, r)
        exact = float(M.trace())
        t = dec["trace"][part]
        assert abs(t["estimate"] - exact) <= 5 * t["stderr"] + 1e-3 * abs(exact), (part, t, exact)
        if part in dec["lambda_min"]:
            lm = dec["lambda_min"][part]
            assert abs(lm["value"] - float(evals[0])) <= lm["residual"] + fp32, (part, lm)
    tr = dec["trace"]
    total = tr["ggn"]["estimate"] + tr["residual"]["estimate"]
    assert abs(tr["hessian"]["estimate"] - total) <= 1e-5 * abs(tr["hessian"]["estimate"])
