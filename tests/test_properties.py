"""Properties that catch what oracles miss: symmetry, linearity, batching, determinism, PSD."""

import pytest
import torch
from models import zoo

import hessfast

MODELS = ["mlp", "cnn_bn_train", "gpt"]


@pytest.fixture
def problem(zoo_problem):
    """``(model, loss_fn, inputs, targets, P)`` of a zoo model, shared by this module's tests; K is
    1 or 5 throughout, so that they replay each other's traced products."""

    def get(name):
        model, loss_fn, inputs, targets = zoo_problem(name)
        return model, loss_fn, inputs, targets, sum(p.numel() for p in model.parameters())

    return get


def _dot(a, b):
    return float((a * b).sum())


@pytest.mark.parametrize("fn", ["hvp", "ggn_vp"])
@pytest.mark.parametrize("name", zoo.params(MODELS, slow=("gpt",)))
def test_symmetric(name, fn, problem):
    model, lf, x, y, P = problem(name)
    op = getattr(hessfast, fn)
    u, v = torch.randn(P, dtype=torch.float64), torch.randn(P, dtype=torch.float64)
    hu, hv = op(model, lf, x, y, u), op(model, lf, x, y, v)
    assert abs(_dot(u, hv) - _dot(hu, v)) <= 1e-10 * (abs(_dot(u, hv)) + 1e-12)


@pytest.mark.parametrize("name", zoo.params(MODELS, slow=("gpt",)))
def test_linear_in_v(name, problem):
    model, lf, x, y, P = problem(name)
    u, v = torch.randn(P, dtype=torch.float64), torch.randn(P, dtype=torch.float64)
    lhs = hessfast.hvp(model, lf, x, y, 2.5 * u - 0.5 * v)
    rhs = 2.5 * hessfast.hvp(model, lf, x, y, u) - 0.5 * hessfast.hvp(model, lf, x, y, v)
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fn", ["hvp", "ggn_vp"])
@pytest.mark.parametrize("name", zoo.params(MODELS, slow=("gpt",)))
def test_k_batched_equals_loop(name, fn, problem):
    model, lf, x, y, P = problem(name)
    op = getattr(hessfast, fn)
    V = torch.randn(5, P, dtype=torch.float64)
    batched = op(model, lf, x, y, V)
    loop = torch.stack([op(model, lf, x, y, V[i]) for i in range(5)])
    torch.testing.assert_close(batched, loop, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", zoo.params(MODELS, slow=("gpt",)))
def test_deterministic(name, problem):
    model, lf, x, y, P = problem(name)
    V = torch.randn(5, P, dtype=torch.float64)
    assert torch.equal(hessfast.hvp(model, lf, x, y, V), hessfast.hvp(model, lf, x, y, V))


@pytest.mark.parametrize("name", zoo.params(MODELS, slow=("gpt",)))
def test_ggn_psd_for_cross_entropy(name, problem):
    model, lf, x, y, P = problem(name)
    V = torch.randn(5, P, dtype=torch.float64)
    GV = hessfast.ggn_vp(model, lf, x, y, V)
    quad = (V * GV).sum(-1)
    assert (quad >= -1e-12 * quad.abs().max()).all()
