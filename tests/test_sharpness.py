"""hessfast.sharpness: λ_max, λ_max·‖θ‖² and SAM's ρ-ball sharpness against exact float64 values."""

import math

import pytest
import torch
import torch.nn.functional as F

import hessfast
from hessfast.landscape import _same_bits


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _trust_region_max(g, H, rho):
    """max_{‖δ‖ = ρ} gᵀδ + ½ δᵀHδ (the boundary maximum; secular equation by bisection)."""
    lam, Q = torch.linalg.eigh(H)
    c = Q.T @ g

    def norm(mu):  # δ(μ) = (μI − H)⁻¹ g, ‖δ‖ decreasing in μ > λ_max
        return float((c / (mu - lam)).norm())

    lo, hi = float(lam[-1]) + 1e-12, float(lam[-1]) + float(g.norm()) / rho + 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if norm(mid) > rho else (lo, mid)
    d = Q @ (c / (hi - lam))
    return float(g @ d + 0.5 * d @ H @ d)


def test_measures_against_exact_values_on_a_quadratic_loss():
    # linear regression: L is exactly quadratic, so the ρ-ball maximum is a trust-region problem
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = torch.randn(40, 2, generator=g, dtype=torch.float64)
    data = [(x[:25], y[:25]), (x[25:], y[25:])]
    before = [(p, p.detach().clone()) for p in model.parameters()]
    s = hessfast.sharpness(model, F.mse_loss, data, rho=0.3, ascent_steps=40)
    theta = _flat(model)

    def loss(t):
        w, b = t[:8].view(2, 4), t[8:]
        return F.mse_loss(x @ w.T + b, y)

    H = torch.func.hessian(loss)(theta)
    grad = torch.func.grad(loss)(theta)
    lam = float(torch.linalg.eigvalsh(H)[-1])
    assert s.lambda_max == pytest.approx(lam, rel=1e-8)
    assert s.param_norm_sq == pytest.approx(float(theta @ theta), rel=1e-12)
    assert s.relative_flatness == pytest.approx(lam * float(theta @ theta), rel=1e-8)
    assert s.loss == pytest.approx(float(loss(theta)), rel=1e-12)
    assert s.grad_norm == pytest.approx(float(grad.norm()), rel=1e-10)
    # SAM's first step, exactly
    first = float(loss(theta + 0.3 * grad / grad.norm()) - loss(theta))
    assert s.sam_first_step == pytest.approx(first, rel=1e-10)
    # the ascent reaches the exact worst case of the ball, and never exceeds it
    best = _trust_region_max(grad, H, 0.3)
    assert s.sam <= best * (1 + 1e-10)
    assert s.sam == pytest.approx(best, rel=1e-3)
    assert s.sam > s.sam_first_step
    assert s.sam <= s.quadratic_bound
    assert s.passes == 41 and len(s.sam_trace) == 40
    for p, c in before:
        assert _same_bits(p.detach(), c)
    assert set(s.invariance) == {"lambda_max", "relative_flatness", "sam"}
    assert "not invariant" in s.invariance["lambda_max"]


def test_reproducible_and_parameters_untouched():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    x, y = torch.randn(32, 3), torch.randint(0, 2, (32,))
    snap = [(p, p.detach().clone()) for p in model.parameters()]
    a = hessfast.sharpness(model, F.cross_entropy, (x, y), rho=0.1, ascent_steps=3, seed=1)
    b = hessfast.sharpness(
        model, F.cross_entropy, (x, y), rho=0.1, ascent_steps=3, lambda_max=a.lambda_max
    )
    assert a.sam_trace == b.sam_trace and a.relative_flatness == b.relative_flatness
    assert math.isfinite(a.sam) and a.sam >= a.sam_first_step > 0
    for p, c in snap:
        assert _same_bits(p.detach(), c)
    with pytest.raises(ValueError, match="rho"):
        hessfast.sharpness(model, F.cross_entropy, (x, y), rho=0.0)
    with pytest.raises(ValueError, match="ascent_steps"):
        hessfast.sharpness(model, F.cross_entropy, (x, y), ascent_steps=0)
