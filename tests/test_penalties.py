"""hessfast.penalties: the trace and λ_max penalties and their gradients, in float64 against the
exact Hessian of a small model (torch.func.hessian) and central differences of it."""

import math

import pytest
import torch
import torch.nn.functional as F

from hessfast import DropoutError
from hessfast.penalties import LambdaMax, hessian_trace


def _model(seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    return m.double()


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(10, 3, generator=g, dtype=torch.float64), torch.randint(
        0, 2, (10,), generator=g
    )


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _hessian_at(model, x, y, flat):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def f(theta):
        params, off = {}, 0
        for n, s in zip(names, shapes):
            k = math.prod(s)
            params[n] = theta[off : off + k].view(s)
            off += k
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    return torch.func.hessian(f)(flat)


def _fd_grad(fn, flat, h=1e-5):
    out = torch.empty_like(flat)
    for j in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[j] = h
        out[j] = (fn(flat + e) - fn(flat - e)) / (2 * h)
    return out


_CACHE = {}


def _exact_trace_grad(model, x, y, flat):
    # ∇tr(H) by central differences of the exact trace, computed once per module run
    if "trace" not in _CACHE:
        _CACHE["trace"] = _fd_grad(lambda t: _hessian_at(model, x, y, t).diagonal().sum(), flat)
    return _CACHE["trace"]


def _grad_of(model, pen):
    model.zero_grad()
    pen.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("method,rtol", [("autograd", 1e-7), ("fd", 1e-5), ("fd2", 1e-4)])
def test_exact_trace_and_its_gradient(method, rtol):
    # probes √P·e_i make the estimate the exact trace: its gradient must be ∇tr(H), checked
    # against central differences of the exact trace
    model, (x, y) = _model(), _data()
    flat = _flat(model)
    P = flat.numel()
    probes = math.sqrt(P) * torch.eye(P, dtype=torch.float64)
    pen = hessian_trace(model, F.cross_entropy, x, y, method=method, probes=probes)
    exact = _hessian_at(model, x, y, flat).diagonal().sum()
    assert abs(float(pen.detach()) - float(exact)) <= rtol * abs(float(exact))
    got = _grad_of(model, pen)
    want = _exact_trace_grad(model, x, y, flat)
    assert want.norm() > 1e-3  # the check can fail
    assert (got - want).norm() <= rtol * 10 * want.norm(), (got - want).norm() / want.norm()


def test_gradient_of_the_estimate_with_fixed_probes():
    # the estimator with fixed Rademacher probes, as a function of θ: backward = its differences
    model, (x, y) = _model(), _data()
    flat = _flat(model)
    pen = hessian_trace(model, F.cross_entropy, x, y, num_probes=3, seed=5)
    got = _grad_of(model, pen)
    g = torch.Generator().manual_seed(5)
    V = (torch.randint(0, 2, (3, flat.numel()), generator=g) * 2 - 1).double()

    def est(t):
        H = _hessian_at(model, x, y, t)
        return torch.einsum("kp,pq,kq->", V, H, V) / 3

    assert abs(float(pen.detach()) - float(est(flat))) < 1e-10 * abs(float(pen.detach()))
    want = _fd_grad(est, flat)
    assert (got - want).norm() <= 1e-7 * want.norm()


def test_seeds_are_reproducible_and_parameters_untouched():
    model, (x, y) = _model(), _data()
    before = [p.detach().clone() for p in model.parameters()]
    a = hessian_trace(model, F.cross_entropy, x, y, num_probes=2, seed=3, method="fd")
    ga = _grad_of(model, a)
    b = hessian_trace(model, F.cross_entropy, x, y, num_probes=2, seed=3, method="fd")
    gb = _grad_of(model, b)
    c = hessian_trace(model, F.cross_entropy, x, y, num_probes=2, seed=4, method="fd")
    assert float(a.detach()) == float(b.detach()) and torch.equal(ga, gb)
    assert float(a.detach()) != float(c.detach())
    torch.manual_seed(7)
    d = hessian_trace(model, F.cross_entropy, x, y, num_probes=2)
    torch.manual_seed(7)
    e = hessian_trace(model, F.cross_entropy, x, y, num_probes=2)
    assert float(d.detach()) == float(e.detach())
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p.detach(), q)


def test_gamma_scales_and_methods_agree_on_rademacher_probes():
    model, (x, y) = _model(), _data()
    vals = {
        m: float(
            hessian_trace(model, F.cross_entropy, x, y, num_probes=4, seed=0, method=m).detach()
        )
        for m in ("autograd", "fd", "fd2")
    }
    assert vals["fd"] == pytest.approx(vals["autograd"], rel=1e-6)
    assert vals["fd2"] == pytest.approx(vals["autograd"], rel=1e-5)
    half = hessian_trace(model, F.cross_entropy, x, y, num_probes=4, seed=0, gamma=0.5)
    assert float(half.detach()) == pytest.approx(0.5 * vals["autograd"], rel=1e-12)


def test_hutchinson_is_unbiased():
    # many probes: the estimate within 4 standard errors of the exact trace
    model, (x, y) = _model(), _data()
    H = _hessian_at(model, x, y, _flat(model))
    exact = float(H.diagonal().sum())
    K = 32
    est = float(
        hessian_trace(model, F.cross_entropy, x, y, num_probes=K, seed=0, method="fd2").detach()
    )
    sd = math.sqrt(2 * (float((H * H).sum()) - float((H.diagonal() ** 2).sum())) / K)
    assert abs(est - exact) < 4 * sd


def test_buffers_restored_and_dropout_refused_for_differences():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(), torch.nn.Linear(4, 2)
    ).double()
    x, y = _data()
    stats = [b.clone() for b in model.buffers()]
    # (autograd's batch_norm has no third derivative: method="autograd" refuses BatchNorm)
    for method in ("fd", "fd2"):
        hessian_trace(model, F.cross_entropy, x, y, seed=0, method=method).backward()
        for b, s in zip(model.buffers(), stats):
            assert torch.equal(b, s), method
    drop = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.5), torch.nn.Linear(4, 2))
    with pytest.raises(DropoutError):
        hessian_trace(drop, F.cross_entropy, x.float(), y, method="fd")
    with pytest.raises(ValueError, match="method"):
        hessian_trace(model, F.cross_entropy, x, y, method="exact")


@pytest.mark.parametrize("method", ["autograd", "fd"])
def test_lambda_max_gradient_is_that_of_the_top_eigenvalue(method):
    # at the top eigenvector the penalty's gradient is ∇λ_max (central differences of eigvalsh)
    model, (x, y) = _model(2), _data(3)
    flat = _flat(model)
    evals, evecs = torch.linalg.eigh(_hessian_at(model, x, y, flat))
    pen = LambdaMax(model, F.cross_entropy, seed=0, method=method, gamma=2.0)
    pen.vector = evecs[:, -1].clone()
    val = pen(x, y)
    assert float(val.detach()) == pytest.approx(2 * float(evals[-1]), rel=1e-7)
    assert pen.value == pytest.approx(float(evals[-1]), rel=1e-7)
    got = _grad_of(model, val) / 2
    want = _fd_grad(lambda t: torch.linalg.eigvalsh(_hessian_at(model, x, y, t))[-1], flat)
    assert want.norm() > 1e-3
    assert (got - want).norm() <= 1e-5 * want.norm()


def test_lambda_max_carries_its_power_iteration():
    model, (x, y) = _model(2), _data(3)
    H = _hessian_at(model, x, y, _flat(model))
    evals = torch.linalg.eigvalsh(H)
    assert evals[-1] > 2 * abs(evals[0])  # power iteration finds λ_max here
    pen = LambdaMax(model, F.cross_entropy, seed=0)
    v = None
    for _ in range(3):  # each call: Rayleigh quotient of the carried v, then v <- Hv / |Hv|
        val = pen(x, y)
        if v is not None:
            assert float(val.detach()) == pytest.approx(float(v @ H @ v), rel=1e-10)
        v = pen.vector
    g = torch.Generator().manual_seed(0)
    v0 = torch.randn(H.shape[0], generator=g, dtype=torch.float64)
    v0 = v0 / v0.norm()
    for _ in range(3):
        v0 = H @ v0
        v0 = v0 / v0.norm()
    assert torch.allclose(pen.vector, v0, rtol=0, atol=1e-12)


def test_attention_model_with_sequence_targets():
    # a GPT (F.scaled_dot_product_attention, logits [B, T, C], targets [B, T]): the penalty reads
    # the loss as hessfast does (the mean over tokens) and differentiates attention on the math
    # backend (torch's fused kernels have no second derivative); the exact value against the
    # first-order loss differences, which run the fused kernel
    from hessfast import zoo

    model, loss_fn, (idx,), y = zoo.gpt()
    pen = hessian_trace(model, loss_fn, idx, y, num_probes=2, seed=0)
    fd2 = hessian_trace(model, loss_fn, idx, y, num_probes=2, seed=0, method="fd2")
    assert float(pen.detach()) == pytest.approx(float(fd2.detach()), rel=1e-5)
    pen.backward()  # third order through the math attention
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
