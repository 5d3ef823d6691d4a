"""HessianMonitor over a few training steps: the JSONL records it promised, their values against a
dense Hessian, and a model left as it was."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from oracle import dense_hessian
from torch import nn

import hessfast
from hessfast import HessianMonitor

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


def _dense_hessian(model, x, y):
    return dense_hessian(model, F.cross_entropy, (x,), y)


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 10), nn.Tanh(), nn.Linear(10, 3))
    x, y = torch.randn(48, 5), torch.randint(0, 3, (48,))
    return model, x, y


@pytest.mark.slow  # a training run with every metric: about ten seconds on two cores
def test_monitor_records_promised_metrics(tmp_path):
    model, x, y = _setup()
    path = tmp_path / "curv.jsonl"
    path.write_text("old run\n")  # truncated at the first record
    mon = HessianMonitor(
        model,
        F.cross_entropy,
        (x, y),
        every=2,
        metrics=("lambda_max", "trace", "kappa"),
        path=path,
        tol=1e-8,
        num_matvecs=200,  # > P: the exact trace
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    dense = {}
    for step in range(5):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rec = mon(step, loss=loss)
        if step % 2:
            assert rec is None
        else:
            assert rec is not None and rec["step"] == step
            dense[step] = (
                torch.linalg.eigvalsh(_dense_hessian(model, x, y)),
                float(_dense_hessian(model, x, y).trace()),
            )
    lines = [json.loads(s) for s in path.read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 2, 4] == [r["step"] for r in mon.records]
    assert lines == HessianMonitor.read(path)
    for rec in lines:
        assert {"step", "lambda_max", "lambda_min", "kappa", "trace", "products", "seconds"} <= set(
            rec
        )
        evals, tr = dense[rec["step"]]
        assert isinstance(rec["loss"], float) and rec["loss"] > 0
        assert abs(rec["lambda_max"] - float(evals[-1])) <= 1e-4 * float(evals[-1])
        assert abs(rec["lambda_min"] - float(evals[0])) <= 1e-4 * float(evals[-1])
        assert abs(rec["trace"] - tr) <= 1e-4 * abs(tr)
        if rec["lambda_min"] > 0:
            assert rec["kappa"] == pytest.approx(rec["lambda_max"] / rec["lambda_min"])
        else:
            assert rec["kappa"] is None
    # the curvature changes over training, and the warm start makes later records cheaper
    assert lines[0]["lambda_max"] != lines[-1]["lambda_max"]
    png = mon.plot(tmp_path / "curv.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_monitor_leaves_the_model_alone(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)
    )
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    F.cross_entropy(model(x), y).backward()  # some .grad to keep
    model.train()
    model[1].eval()  # a mixed mode to restore exactly
    before = copy.deepcopy(model.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()

    strict = HessianMonitor(model, F.cross_entropy, (x, y), every=1, path=None)
    with pytest.raises(hessfast.DropoutError, match="eval_mode=True"):
        strict.step(0)

    mon = HessianMonitor(
        model, F.cross_entropy, (x, y), every=1, path=tmp_path / "m.jsonl", eval_mode=True
    )
    rec = mon.step(0)
    assert rec["lambda_max"] > 0 and rec["trace"] is not None
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    assert torch.equal(torch.get_rng_state(), rng)


def test_monitor_validates_arguments():
    model, x, y = _setup()
    with pytest.raises(ValueError, match="metrics"):
        HessianMonitor(model, F.cross_entropy, (x, y), metrics=("sharpness",))
    with pytest.raises(ValueError, match="every"):
        HessianMonitor(model, F.cross_entropy, (x, y), every=0)


def test_monitor_plot_puts_the_loss_above_the_curvature(tmp_path, monkeypatch):
    import matplotlib.figure

    recs = [
        {"step": s, "loss": 1.0 / (s + 1), "lambda_max": 2.0 + s, "trace": 5.0 - s}
        for s in range(4)
    ]
    model, x, y = _setup()
    mon = HessianMonitor(model, F.cross_entropy, (x, y))
    seen = []
    real = matplotlib.figure.Figure.add_subplot

    def spy(self, *args, **kwargs):
        ax = real(self, *args, **kwargs)
        seen.append(ax)
        return ax

    monkeypatch.setattr(matplotlib.figure.Figure, "add_subplot", spy)
    png = mon.plot(tmp_path / "m.png", records=recs)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert [ax.get_ylabel() for ax in seen] == ["training loss", "λ_max", "trace"]
