"""hessfast against the float64 torch.func oracles on every model of the zoo. Each model is built
once per module (``zoo_problem``) and the products take K = 3, so the tests of one model share its
captured program and traced graphs."""

import pytest
import torch
from models import zoo
from oracle import dense_hessian, double_backward_hvp, ggn_vp, hvp, rel_err, torch_loss

import hessfast

TOL = 1e-10
MODELS = list(zoo.MODELS)


def _needs(name):
    if name.startswith("hf_"):
        pytest.importorskip("transformers")


def _vectors(model, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(k, *p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()
    }


@pytest.mark.parametrize("name", zoo.params(MODELS))
def test_hvp_matches_forward_over_reverse_oracle(name, zoo_problem):
    _needs(name)
    model, loss_fn, inputs, targets = zoo_problem(name)
    v = _vectors(model, 3)
    got = hessfast.hvp(model, loss_fn, inputs, targets, v)
    assert rel_err(got, hvp(model, loss_fn, inputs, targets, v)) < TOL


@pytest.mark.parametrize("name", zoo.params(MODELS))
def test_hvp_matches_double_backward_oracle(name, zoo_problem):
    _needs(name)
    model, loss_fn, inputs, targets = zoo_problem(name)
    v = _vectors(model, 3)
    got = hessfast.hvp(model, loss_fn, inputs, targets, v)
    assert rel_err(got, double_backward_hvp(model, loss_fn, inputs, targets, v)) < TOL


@pytest.mark.parametrize("name", zoo.params(MODELS))
def test_ggn_vp_matches_oracle(name, zoo_problem):
    _needs(name)
    model, loss_fn, inputs, targets = zoo_problem(name)
    v = _vectors(model, 3)
    got = hessfast.ggn_vp(model, loss_fn, inputs, targets, v)
    assert rel_err(got, ggn_vp(model, loss_fn, inputs, targets, v)) < TOL


@pytest.mark.parametrize("name", zoo.params(MODELS))
def test_grad_matches_autograd(name, zoo_problem):
    _needs(name)
    model, loss_fn, inputs, targets = zoo_problem(name)
    with torch.enable_grad():
        from oracle import math_attention, without_running_stats

        ref_model = without_running_stats(model)
        with math_attention():
            loss = torch_loss(loss_fn)(ref_model(*inputs), targets)
        names = [n for n, _ in model.named_parameters()]
        ref = torch.autograd.grad(loss, list(ref_model.parameters()))
    got = hessfast.grad(model, loss_fn, inputs, targets)
    assert rel_err(got, dict(zip(names, ref))) < TOL


@pytest.mark.parametrize("name", ["mlp", "cnn_bn_train", "resnet"])
def test_against_dense_hessian(name):
    """Under ~2000 parameters: the dense Hessian by double backward, row by row.

    (``torch.func.hessian`` is ``jacfwd(jacrev)`` and returns wrong entries for training-mode
    BatchNorm on torch 2.14 — e.g. a nonzero ∂²L/∂γ∂b where the batch mean cancels the conv bias —
    so the dense reference comes from ``torch.autograd.functional.hessian`` instead.)
    """
    model, loss_fn, inputs, targets = zoo.MODELS[name]()
    total = sum(p.numel() for p in model.parameters())
    assert total < 2000
    H = dense_hessian(model, loss_fn, inputs, targets)
    torch.testing.assert_close(H, H.T, rtol=1e-10, atol=1e-12)
    V = torch.randn(4, total, dtype=torch.float64)
    got = hessfast.hvp(model, loss_fn, inputs, targets, V)
    torch.testing.assert_close(got, V @ H.T, rtol=1e-10, atol=1e-12)
