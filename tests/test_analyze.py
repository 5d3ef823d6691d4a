"""``hessfast analyze`` on entry points defined here: the report against a dense Hessian, with and
without ``--params``, and exit code 2 with a clear message for bad input."""

import json
import math
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from oracle import dense_hessian, param_offsets

from hessfast.cli import main

ENTRY = textwrap.dedent(
    """
    import torch
    from torch import nn


    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4))


    def loader():
        g = torch.Generator().manual_seed(1)
        return [
            (torch.randn(32, 6, generator=g), torch.randint(0, 4, (32,), generator=g))
            for _ in range(3)
        ]


    def loader_once():  # a generator: hessfast reads it once
        yield from loader()


    def wrong_inputs():
        return [(torch.randn(32, 5), torch.randint(0, 4, (32,)))]


    def wrong_targets():
        return [(torch.randn(32, 6), torch.randint(0, 4, (31,)))]


    def nan_inputs():
        x = torch.randn(32, 6)
        x[0, 0] = float("nan")
        return [(x, torch.randint(0, 4, (32,)))]


    def my_loss(output, targets):
        return torch.nn.functional.cross_entropy(output, targets)


    def not_a_model():
        return 3


    def broken():
        raise RuntimeError("boom")
    """
)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


@pytest.fixture(scope="module")
def entry(tmp_path_factory):
    d = tmp_path_factory.mktemp("entry")
    path = d / "hf_analyze_entry.py"
    path.write_text(ENTRY)
    return path


def _load(entry):
    import importlib.util

    spec = importlib.util.spec_from_file_location("hf_analyze_entry_ref", entry)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _dense(entry):
    """float64 Hessian of the mean loss over the loader's batches (equal sizes) and the parameter
    offsets."""
    mod = _load(entry)
    model = mod.build().double().eval()
    batches = mod.loader()
    x = torch.cat([b[0] for b in batches]).double()
    y = torch.cat([b[1] for b in batches])
    return dense_hessian(model, F.cross_entropy, (x,), y), param_offsets(model)


def _run(args, capsys):
    code = main(["analyze", "--no-progress", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_analyze_full_report_matches_dense(entry, tmp_path, capsys):
    out = tmp_path / "res"
    code, stdout, err = _run(
        [
            "--model", f"{entry}:build",
            "--data", f"{entry}:loader",
            "--dtype", "float64",
            "--top-k", "6",
            "--density", "--trace", "--layerwise",
            "--out", str(out),
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "separate" in stdout and "(4 classes)" in stdout and "per layer" in stdout
    report = json.loads((out / "report.json").read_text())
    assert (out / "spectrum.png").read_bytes()[:4] == b"\x89PNG"
    H, _ = _dense(entry)
    evals = torch.linalg.eigvalsh(H)
    assert report["operator"]["size"] == H.shape[0]
    ref = evals.flip(0)[:6]
    assert torch.allclose(
        torch.tensor(report["eigenvalues"]["values"], dtype=torch.float64),
        ref,
        rtol=1e-8,
        atol=1e-10,
    )
    assert abs(report["lambda_min"]["value"] - float(evals[0])) < 1e-8
    tr = report["trace"]
    assert abs(tr["estimate"] - float(H.trace())) <= 5 * tr["stderr"] + 1e-8
    assert set(report["layerwise"]) == {"0", "2"}
    assert report["model"]["mode"] == "eval" and report["loss"] == "cross_entropy"
    assert report["data"]["batches"] == 3


def test_analyze_params_subset_module_entry_point(entry, tmp_path, capsys, monkeypatch):
    # module:function, importable from the current directory like `python -m`
    monkeypatch.chdir(entry.parent)
    out = tmp_path / "res"
    code, _, err = _run(
        [
            "--model", "hf_analyze_entry:build",
            "--data", "hf_analyze_entry:loader_once",
            "--params", "2.*",
            "--dtype", "float64",
            "--top-k", "5",
            "--out", str(out),
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    H, offsets = _dense(entry)
    idx = torch.cat([torch.arange(*offsets["2.weight"]), torch.arange(*offsets["2.bias"])])
    block = H[idx][:, idx]
    assert report["operator"]["size"] == idx.numel() == report["model"]["analysed_parameters"]
    assert report["model"]["params"] == ["2.*"]
    ref = torch.linalg.eigvalsh(block).flip(0)[:5]
    assert torch.allclose(
        torch.tensor(report["eigenvalues"]["values"], dtype=torch.float64),
        ref,
        rtol=1e-8,
        atol=1e-10,
    )
    assert "density" not in report and "trace" not in report


def test_analyze_ggn_custom_loss_micro_batches(entry, tmp_path, capsys):
    common = ["--model", f"{entry}:build", "--data", f"{entry}:loader", "--dtype", "float64"]
    common += ["--curvature", "ggn", "--top-k", "3", "--no-lambda-min"]
    code, stdout, err = _run([*common, "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    assert "GGN of the loss" in stdout
    code, _, err = _run(
        [
            *common,
            "--loss",
            f"{entry}:my_loss",
            "--max-batch-size",
            "10",
            "--out",
            str(tmp_path / "b"),
        ],
        capsys,
    )
    assert code == 0, err
    a = json.loads((tmp_path / "a" / "report.json").read_text())
    b = json.loads((tmp_path / "b" / "report.json").read_text())
    assert a["operator"]["kind"] == "GGN" and "lambda_min" not in a
    assert b["loss"] == f"{entry}:my_loss" and "classes" not in b
    # the closed-form cross-entropy rule and torch.func on a custom loss, whole and micro-batched
    assert a["eigenvalues"]["values"] == pytest.approx(b["eigenvalues"]["values"], rel=1e-9)
    assert min(a["eigenvalues"]["values"]) > 0


def test_analyze_checkpoint(entry, tmp_path, capsys):
    mod = _load(entry)
    model = mod.build()
    with torch.no_grad():
        model[2].weight.mul_(2.0)
    good = tmp_path / "good.pt"
    torch.save({"state_dict": model.state_dict()}, good)
    common = ["--model", f"{entry}:build", "--data", f"{entry}:loader", "--top-k", "2"]
    code, _, err = _run([*common, "--checkpoint", str(good), "--out", str(tmp_path / "a")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["model"]["checkpoint"] == str(good)

    bad = tmp_path / "bad.pt"
    torch.save(torch.nn.Linear(6, 4).state_dict(), bad)
    code, _, err = _run([*common, "--checkpoint", str(bad)], capsys)
    assert code == 2
    assert "does not match the model" in err and "missing keys: 0.weight" in err
    assert "unexpected keys: weight, bias" in err

    code, _, err = _run([*common, "--checkpoint", str(tmp_path / "nope.pt")], capsys)
    assert code == 2 and "no such file" in err


@pytest.mark.parametrize(
    "model, data, message",
    [
        ("no_such_module_xyz:build", "{e}:loader", "cannot import no_such_module_xyz"),
        ("{e}:no_such_function", "{e}:loader", "has no function no_such_function"),
        ("{e}", "{e}:loader", "give module:function"),
        ("{e}:not_a_model", "{e}:loader", "not a torch.nn.Module"),
        ("{e}:broken", "{e}:loader", "broken() raised RuntimeError: boom"),
        (
            "{e}:build",
            "{e}:wrong_inputs",
            "the model does not accept the data's inputs of shape [32, 5]",
        ),
        ("{e}:build", "{e}:wrong_targets", "output of shape [32, 4] with targets of shape [31]"),
    ],
)
def test_analyze_bad_input_exit_code_2(entry, capsys, model, data, message):
    code, _, err = _run(["--model", model.format(e=entry), "--data", data.format(e=entry)], capsys)
    assert code == 2
    assert err.startswith("hessfast analyze: error:")
    assert message in err


def test_analyze_missing_device_exit_code_2(entry, capsys):
    dev = "cuda:99" if torch.cuda.is_available() else "cuda"
    code, _, err = _run(
        ["--model", f"{entry}:build", "--data", f"{entry}:loader", "--device", dev], capsys
    )
    assert code == 2
    assert f"--device {dev}: torch sees" in err


def test_analyze_failure_exit_code_1(entry, capsys, tmp_path):
    code, _, err = _run(
        ["--model", f"{entry}:build", "--data", f"{entry}:nan_inputs", "--out", str(tmp_path)],
        capsys,
    )
    assert code == 1
    assert "the analysis failed" in err and "NaN" in err
    assert not (tmp_path / "report.json").exists()


def _oriented(got, want):
    """``want`` or its reverse, whichever is closer to ``got``: an eigenvector's sign is free, and
    the loss along ``-v`` is the loss along ``v`` read backwards."""
    want = np.asarray(want)
    flip = want[::-1] if want.ndim == 1 else want[::-1, ::-1]
    return want if np.abs(got - want).max() <= np.abs(got - flip).max() else flip


def test_analyze_landscape_1d_matches_dense_and_hessfast_landscape(entry, tmp_path, capsys):
    import hessfast

    out = tmp_path / "res"
    code, stdout, err = _run(
        [
            "--model", f"{entry}:build",
            "--data", f"{entry}:loader",
            "--dtype", "float64",
            "--top-k", "3",
            "--landscape", "1d",
            "--landscape-span", "0.5",
            "--landscape-steps", "5",
            "--out", str(out),
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "landscape along the top Hessian eigenvector, t in [-0.5, 0.5] (5 points)" in stdout
    assert f"and {out / 'landscape_1d.png'} (" in stdout
    assert (out / "landscape_1d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    land = report["landscape"]
    assert report["files"]["landscape"] == str(out / "landscape_1d.png")
    assert land["files"] == {"png": "landscape_1d.png"}
    assert land["kind"] == "top" and land["operator"] == "Hessian" and land["ndim"] == 1
    assert land["coords"] == [[-0.5, -0.25, 0.0, 0.25, 0.5]]
    assert len(land["loss"]) == len(land["quadratic"]) == 5
    assert land["products"] == 0 and report["products"]["landscape"] == 0  # no second eigsh
    assert land["eigenvalues"] == report["eigenvalues"]["values"][:1]
    # against the dense float64 Hessian: λ_max, and the loss along its top eigenvector
    H, _ = _dense(entry)
    ev, vecs = torch.linalg.eigh(H)
    assert land["eigenvalues"][0] == pytest.approx(float(ev[-1]), rel=1e-8)
    mod = _load(entry)
    model = mod.build().double().eval()
    batches = [(x.double(), y) for x, y in mod.loader()]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    want = []
    for t in land["coords"][0]:
        params, off, flat = {}, 0, theta + t * vecs[:, -1]
        for n, p in model.named_parameters():
            params[n] = flat[off : off + p.numel()].view_as(p)
            off += p.numel()
        want.append(float(F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)))
    got = np.asarray(land["loss"])
    np.testing.assert_allclose(got, _oriented(got, want), rtol=1e-7)  # eigsh's vector to 1e-5
    # the same numbers as hessfast.landscape called directly with those eigenpairs
    direct = hessfast.landscape(
        model, F.cross_entropy, batches, "top", span=0.5, steps=5, eigenpairs=(ev, vecs)
    ).to_dict()
    assert set(direct) == set(land)
    np.testing.assert_allclose(got, _oriented(got, direct["loss"]), rtol=1e-7)
    q = np.asarray(land["quadratic"])
    np.testing.assert_allclose(q, _oriented(q, direct["quadratic"]), rtol=1e-7)
    assert land["loss0"] == pytest.approx(direct["loss0"], rel=1e-12)
    assert abs(land["slope"][0]) == pytest.approx(abs(direct["slope"][0]), rel=1e-5)


def test_analyze_landscape_2d_ggn_names_the_gauss_newton_model(entry, tmp_path, capsys):
    out = tmp_path / "res"
    code, stdout, err = _run(
        [
            "--model", f"{entry}:build",
            "--data", f"{entry}:loader",
            "--dtype", "float64",
            "--curvature", "ggn",
            "--top-k", "2",
            "--no-lambda-min",
            "--landscape", "2d",
            "--landscape-steps", "3",
            "--out", str(out),
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "landscape on the top 2 GGN eigenvectors" in stdout and "Gauss-Newton model" in stdout
    report = json.loads((out / "report.json").read_text())
    land = report["landscape"]
    assert land["operator"] == "GGN" and land["ndim"] == 2
    assert "GGN" in land["axes"][0] and "GGN" in land["axes"][1]
    assert np.asarray(land["loss"]).shape == (3, 3) == np.asarray(land["quadratic"]).shape
    lams = report["eigenvalues"]["values"]
    assert land["eigenvalues"] == lams[:2]
    np.testing.assert_allclose(land["curvature"], np.diag(lams[:2]))
    # the default span: where ½λ_max t² reaches the loss at θ
    s = math.sqrt(2 * land["loss0"] / lams[0])
    np.testing.assert_allclose(land["coords"], [[-s, 0.0, s]] * 2, rtol=1e-12)
    a = np.stack(np.meshgrid(*land["coords"], indexing="ij"), axis=-1)
    quad = land["loss0"] + a @ land["slope"] + 0.5 * (a**2) @ np.asarray(lams[:2])
    np.testing.assert_allclose(land["quadratic"], quad, rtol=1e-12)
    assert land["loss"][1][1] == pytest.approx(land["loss0"], rel=1e-12)
    assert (out / "landscape_2d.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "landscape_1d.png").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--landscape", "1d", "--landscape-span", "-1"], "--landscape-span -1: a positive number"),
        (["--landscape", "1d", "--landscape-span", "wide"], "--landscape-span wide: a positive"),
        (["--landscape", "1d", "--landscape-span", "inf"], "--landscape-span inf: a positive"),
        (["--landscape", "1d", "--landscape-steps", "1"], "--landscape-steps must be at least 2"),
        (["--landscape", "2d", "--top-k", "1"], "--landscape 2d needs the top two eigenvectors"),
        (["--landscape-steps", "5"], "--landscape-steps without --landscape 1d|2d"),
        (["--landscape-span", "0.1"], "--landscape-span without --landscape 1d|2d"),
    ],
)
def test_analyze_landscape_bad_options_exit_code_2(entry, tmp_path, capsys, extra, message):
    args = ["--model", f"{entry}:build", "--data", f"{entry}:loader", "--out", str(tmp_path)]
    code, _, err = _run([*args, *extra], capsys)
    assert code == 2
    assert err.startswith("hessfast analyze: error:") and message in err
    assert not (tmp_path / "report.json").exists()


def test_analyze_landscape_choices_and_python_errors(entry, capsys):
    with pytest.raises(SystemExit) as e:
        main(["analyze", "--model", f"{entry}:build", "--data", "x:y", "--landscape", "3d"])
    assert e.value.code == 2 and "invalid choice: '3d'" in capsys.readouterr().err
    import hessfast
    from hessfast.analyze import analyze

    dense = hessfast.DenseOperator(torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="needs the model, loss and data"):
        analyze(dense, top_k=2, landscape=1, lambda_min=False, trace=False, density=False)
    mod = _load(entry)
    H = hessfast.HessianOperator(
        mod.build().double(), F.cross_entropy, [(torch.randn(4, 6).double(), torch.arange(4))]
    )
    with pytest.raises(ValueError, match="landscape must be 1 or 2"):
        analyze(H, top_k=2, landscape=3)
    with pytest.raises(ValueError, match="steps must be an integer"):
        analyze(H, top_k=2, landscape=1, landscape_steps=1.5)


def test_landscape_panel_is_written_with_the_report_or_not_at_all(tmp_path, monkeypatch):
    import hessfast
    from hessfast.analyze import UsageError, check_out_folder, write_report

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    data = (torch.randn(8, 3), torch.arange(8) % 2)
    land = hessfast.landscape(model, F.cross_entropy, data, steps=3).to_dict()
    report = {"eigenvalues": {"values": land["eigenvalues"]}, "landscape": land}

    def broken(self, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(hessfast.Landscape, "plot", broken)
    with pytest.raises(KeyboardInterrupt):
        write_report(report, tmp_path / "r")
    assert list((tmp_path / "r").iterdir()) == []  # no spectrum, no partial files
    monkeypatch.undo()
    js, _ = write_report(report, tmp_path / "r")
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [
        "landscape_1d.png",
        "report.json",
        "spectrum.png",
    ]
    assert json.loads(js.read_text())["landscape"]["loss"] == land["loss"]
    (tmp_path / "s" / "landscape_2d.png").mkdir(parents=True)
    with pytest.raises(UsageError, match="landscape_2d.png is a folder"):
        check_out_folder(tmp_path / "s")


def test_analyze_criterion_reaches_every_eigsh_and_matches_dense(entry, monkeypatch):
    """``criterion="eigenvalue"`` reaches both eigsh runs (top and ``λ_min``; eigsh's own info
    says so in the report), spends fewer products than the default residual test, and the
    eigenvalues still match the dense float64 spectrum within the eigenvalue bound ``tol·|λ|``."""
    import hessfast
    import hessfast.algorithms as algorithms
    from hessfast.analyze import analyze

    mod = _load(entry)
    H = hessfast.HessianOperator(
        mod.build().double().eval(),
        F.cross_entropy,
        [(x.double(), y) for x, y in mod.loader()],
    )
    seen = []
    eigsh = algorithms.eigsh

    def spy(*args, **kwargs):
        seen.append((kwargs["which"], kwargs.get("criterion")))
        return eigsh(*args, **kwargs)

    monkeypatch.setattr(algorithms, "eigsh", spy)
    tol = 1e-5
    opts = dict(top_k=6, tol=tol, trace=False, density=False, layerwise=False)
    by_value = analyze(H, criterion="eigenvalue", **opts)
    assert seen == [("LA", "eigenvalue"), ("SA", "eigenvalue")]
    default = analyze(H, **opts)
    assert seen[2:] == [("LA", "residual"), ("SA", "residual")]
    for report, crit in ((by_value, "eigenvalue"), (default, "residual")):
        assert report["eigenvalues"]["criterion"] == crit
        assert report["lambda_min"]["criterion"] == crit
        assert report["eigenvalues"]["converged"]
    assert by_value["eigenvalues"]["products"] < default["eigenvalues"]["products"]
    Hd, _ = _dense(entry)
    evals = torch.linalg.eigvalsh(Hd)
    got = torch.tensor(by_value["eigenvalues"]["values"], dtype=torch.float64)
    assert float((got - evals.flip(0)[:6]).abs().max()) <= tol * float(evals.abs().max())
    assert by_value["lambda_min"]["converged"]
    assert abs(by_value["lambda_min"]["value"] - float(evals[0])) <= tol * abs(float(evals[0]))
    with pytest.raises(ValueError, match="criterion must be one of"):
        analyze(H, criterion="residuals", **opts)


def test_analyze_cli_criterion(entry, tmp_path, capsys):
    """``--criterion eigenvalue`` reaches the report (and the summary line); a value not in eigsh's
    list is argparse's exit code 2, before anything runs."""
    out = tmp_path / "res"
    args = ["--model", f"{entry}:build", "--data", f"{entry}:loader", "--dtype", "float64"]
    code, stdout, err = _run(
        [*args, "--top-k", "3", "--criterion", "eigenvalue", "--out", str(out)], capsys
    )
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["eigenvalues"]["criterion"] == "eigenvalue"
    assert report["lambda_min"]["criterion"] == "eigenvalue"
    assert "converged on the eigenvalue error bound" in stdout
    evals = torch.linalg.eigvalsh(_dense(entry)[0])
    got = torch.tensor(report["eigenvalues"]["values"], dtype=torch.float64)
    assert float((got - evals.flip(0)[:3]).abs().max()) <= 1e-5 * float(evals.abs().max())
    with pytest.raises(SystemExit) as e:
        main(["analyze", *args, "--criterion", "eigenvalues", "--out", str(tmp_path / "bad")])
    assert e.value.code == 2 and "invalid choice: 'eigenvalues'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
