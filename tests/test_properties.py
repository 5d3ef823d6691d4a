"""Properties that catch what oracles miss: symmetry, linearity, batching, determinism, PSD."""

import pytest
import torch
from models import zoo

import hessfast

MODELS = ["mlp", "cnn_bn_train", "gpt"]


def _setup(name):
    model, loss_fn, inputs, targets = zoo.MODELS[name]()
    P = sum(p.numel() for p in model.parameters())
    return model, loss_fn, inputs, targets, P


def _dot(a, b):
    return float((a * b).sum())


@pytest.mark.parametrize("fn", ["hvp", "ggn_vp"])
@pytest.mark.parametrize("name", zoo.params(MODELS, slow=("gpt",)))
def test_symmetric(name, fn):
    model, lf, x, y, P = _setup(name)
    op = getattr(hessfast, fn)
    u, v = torch.randn(P, dtype=torch.float64), torch.randn(P, dtype=torch.float64)
    hu, hv = op(model, lf, x, y, u), op(model, lf, x, y, v)
    assert abs(_dot(u, hv) - _dot(hu, v)) <= 1e-10 * (abs(_dot(u, hv)) + 1e-12)


@pytest.mark.parametrize("name", zoo.params(MODELS, slow=("gpt",)))
def test_linear_in_v(name):
    model, lf, x, y, P = _setup(name)
    u, v = torch.randn(P, dtype=torch.float64), torch.randn(P, dtype=torch.float64)
    lhs = hessfast.hvp(model, lf, x, y, 2.5 * u - 0.5 * v)
    rhs = 2.5 * hessfast.hvp(model, lf, x, y, u) - 0.5 * hessfast.hvp(model, lf, x, y, v)
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fn", ["hvp", "ggn_vp"])
@pytest.mark.parametrize("name", zoo.params(MODELS, slow=("gpt",)))
def test_k_batched_equals_loop(name, fn):
    model, lf, x, y, P = _setup(name)
    op = getattr(hessfast, fn)
    V = torch.randn(5, P, dtype=torch.float64)
    batched = op(model, lf, x, y, V)
    loop = torch.stack([op(model, lf, x, y, V[i]) for i in range(5)])
    torch.testing.assert_close(batched, loop, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", zoo.params(MODELS, slow=("gpt",)))
def test_deterministic(name):
    model, lf, x, y, P = _setup(name)
    V = torch.randn(2, P, dtype=torch.float64)
    assert torch.equal(hessfast.hvp(model, lf, x, y, V), hessfast.hvp(model, lf, x, y, V))


@pytest.mark.parametrize("name", zoo.params(MODELS, slow=("gpt",)))
def test_ggn_psd_for_cross_entropy(name):
    model, lf, x, y, P = _setup(name)
    V = torch.randn(8, P, dtype=torch.float64)
    GV = hessfast.ggn_vp(model, lf, x, y, V)
    quad = (V * GV).sum(-1)
    assert (quad >= -1e-12 * quad.abs().max()).all()
