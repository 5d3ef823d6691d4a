"""The PyHessian shim against the real ``pyhessian`` package (the ``test`` extra) on the same model
and data: eigenvalues, trace samples and density agree within what PyHessian's own iterations
reach, and the model's mode and gradients are left alone."""

import copy

import numpy as np
import pytest
import torch
from oracle import dense_hessian
from torch import nn

from hessfast.compat.pyhessian import hessian

pyhessian = pytest.importorskip("pyhessian")

# PyHessian itself calls loss.backward(create_graph=True)
pytestmark = [
    pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph:UserWarning"),
    pytest.mark.usefixtures("one_thread"),
]


def _problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).eval()
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    return model, nn.CrossEntropyLoss(), x, y


def _dense_eigvals(model, criterion, x, y):
    H = dense_hessian(model, criterion, (x,), y)
    return torch.linalg.eigvalsh(H), float(H.trace())


@pytest.fixture
def torch_eig(monkeypatch):
    """PyHessian 0.1's density calls ``torch.eig``, gone from torch 2: give it one."""

    def eig(T, eigenvectors=False):
        w, V = torch.linalg.eigh(T.double())
        return torch.stack([w, torch.zeros_like(w)], 1).to(T.dtype), V.to(T.dtype)

    monkeypatch.setattr(torch, "eig", eig, raising=False)


def test_eigenvalues_match_pyhessian_and_dense():
    model, crit, x, y = _problem()
    ref = pyhessian.hessian(copy.deepcopy(model), crit, data=(x, y), cuda=False)
    ours = hessian(model, crit, data=(x, y), cuda=False)
    torch.manual_seed(1)
    ph_vals, ph_vecs = ref.eigenvalues(maxIter=1000, tol=1e-6, top_n=3)
    torch.manual_seed(1)
    vals, vecs = ours.eigenvalues(maxIter=1000, tol=1e-6, top_n=3)
    assert isinstance(vals, list) and all(type(v) is float for v in vals)
    assert isinstance(vecs, list) and len(vecs) == 3
    assert [t.shape for t in vecs[0]] == [t.shape for t in ph_vecs[0]]
    # power iteration stops at a relative change of 1e-6: its values are that close
    np.testing.assert_allclose(vals, ph_vals, rtol=1e-4)
    evals, _ = _dense_eigvals(model, crit, x, y)
    by_magnitude = evals[torch.argsort(evals.abs(), descending=True)][:3].tolist()
    np.testing.assert_allclose(vals, by_magnitude, rtol=1e-5)
    # eigenvectors: unit norm, H v = λ v
    flat = torch.cat([t.reshape(-1) for t in vecs[0]])
    assert abs(float(flat.norm()) - 1) < 1e-5
    hv = ours.operator @ flat
    assert float((hv - vals[0] * flat).norm()) < 1e-3 * abs(vals[0])
    # the hessfast extension: algebraic ends
    la, _ = ours.eigenvalues(top_n=2, which="LA", tol=1e-6)
    sa, _ = ours.eigenvalues(top_n=1, which="SA", tol=1e-6)
    np.testing.assert_allclose(la, evals.flip(0)[:2].tolist(), rtol=1e-5)
    np.testing.assert_allclose(sa, [float(evals[0])], rtol=1e-4)


def test_trace_samples_are_pyhessians():
    model, crit, x, y = _problem()
    ref = pyhessian.hessian(copy.deepcopy(model), crit, data=(x, y), cuda=False)
    ours = hessian(model, crit, data=(x, y), cuda=False)
    torch.manual_seed(2)
    ph = ref.trace(maxIter=200, tol=1e-3)
    torch.manual_seed(2)
    got = ours.trace(maxIter=200, tol=1e-3)
    assert isinstance(got, list) and all(type(v) is float for v in got)
    # same Rademacher vectors, same stopping rule: the same samples
    assert len(got) == len(ph)
    np.testing.assert_allclose(got, ph, rtol=1e-4, atol=1e-5)
    _, exact = _dense_eigvals(model, crit, x, y)
    assert abs(np.mean(got) - exact) < 5 * np.std(got) / np.sqrt(len(got))


def test_density_matches_pyhessian(torch_eig):
    model, crit, x, y = _problem()
    ref = pyhessian.hessian(copy.deepcopy(model), crit, data=(x, y), cuda=False)
    ours = hessian(model, crit, data=(x, y), cuda=False)
    torch.manual_seed(3)
    ph_nodes, ph_weights = ref.density(iter=12, n_v=2)
    torch.manual_seed(3)
    nodes, weights = ours.density(iter=12, n_v=2)
    assert len(nodes) == len(weights) == 2 and all(len(r) == 12 for r in nodes)
    assert all(type(v) is float for v in nodes[0] + weights[0])
    for i in range(2):
        order = np.argsort(ph_nodes[i])
        np.testing.assert_allclose(nodes[i], np.asarray(ph_nodes[i])[order], atol=1e-4)
        np.testing.assert_allclose(weights[i], np.asarray(ph_weights[i])[order], atol=1e-4)
        assert abs(sum(weights[i]) - 1) < 1e-10


def test_dataloader_matches_pyhessian():
    model, crit, x, y = _problem()
    loader = [(x[:40], y[:40]), (x[40:], y[40:])]  # ragged: weighted by batch size
    ref = pyhessian.hessian(copy.deepcopy(model), crit, dataloader=loader, cuda=False)
    ours = hessian(model, crit, dataloader=loader, cuda=False)
    torch.manual_seed(4)
    ph_vals, _ = ref.eigenvalues(maxIter=1000, tol=1e-6, top_n=2)
    vals, _ = ours.eigenvalues(maxIter=1000, tol=1e-6, top_n=2)
    np.testing.assert_allclose(vals, ph_vals, rtol=1e-4)
    torch.manual_seed(5)
    ph = ref.trace(maxIter=30)
    torch.manual_seed(5)
    got = ours.trace(maxIter=30)
    np.testing.assert_allclose(got, ph, rtol=1e-4, atol=1e-5)


def test_model_mode_and_grads_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    with pytest.warns(UserWarning, match="PyHessian would call model.eval"):
        comp = hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    vals, _ = comp.eigenvalues()
    assert model.training  # PyHessian would have switched it to eval mode
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    vals_eval, _ = hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False).eigenvalues()
    assert vals != vals_eval  # batch statistics vs running statistics: another Hessian


def test_arguments_as_pyhessian():
    model, crit, x, y = _problem()
    with pytest.raises(ValueError, match="exactly one"):
        hessian(model, crit, cuda=False)
    with pytest.raises(ValueError, match="exactly one"):
        hessian(model, crit, data=(x, y), dataloader=[(x, y)], cuda=False)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda=False"):
            hessian(model, crit, data=(x, y))
