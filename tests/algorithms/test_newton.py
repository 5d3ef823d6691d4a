"""newton_step: conjugate gradient and saddle-free steps against dense float64 formulas."""

import pytest
import torch
import torch.nn.functional as F

import hessfast
from hessfast.algorithms import eigsh, newton_step

D = torch.float64


def dense(lam, seed=1):
    lam = torch.as_tensor(lam, dtype=D)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=g, dtype=D))
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2, Q


def grad(P, seed=7):
    return torch.randn(P, generator=torch.Generator().manual_seed(seed), dtype=D)


# name: (spectrum, damping)
SPD_CASES = {
    "well_conditioned": (torch.linspace(1, 10, 80, dtype=D), 0.0),
    "ill_conditioned": (torch.logspace(-3, 2, 120, dtype=D), 1e-3),
    "psd_with_damping": (
        torch.cat([torch.zeros(20, dtype=D), torch.linspace(0.1, 5, 60, dtype=D)]),
        0.1,
    ),
    "clustered": (
        torch.cat([torch.full((50,), 2.0, dtype=D), torch.full((30,), 7.0, dtype=D)]),
        0.0,
    ),
}


@pytest.mark.parametrize("name", list(SPD_CASES))
def test_cg_matches_dense_solve(name):
    lam, damping = SPD_CASES[name]
    A, _ = dense(lam)
    P = A.shape[0]
    g = grad(P)
    H = hessfast.DenseOperator(A)
    r = newton_step(H, g, method="cg", damping=damping, tol=1e-10, max_iter=10 * P)
    assert r.converged and not r.negative_curvature and r.direction is None
    assert r.residual <= 1e-10 and r.products == r.iterations == H.products
    M = A + damping * torch.eye(P, dtype=D)
    true_res = (M @ r.step + g).norm() / g.norm()
    assert true_res <= 1e-9
    ref = torch.linalg.solve(M, -g)
    cond = float(torch.linalg.cond(M))
    torch.testing.assert_close(r.step, ref, rtol=0, atol=1e-9 * cond * float(ref.norm()))


def test_cg_tol_iterations_and_x0():
    A, _ = dense(torch.logspace(0, 2, 100, dtype=D))
    g = grad(100)
    loose = newton_step(hessfast.DenseOperator(A), g, tol=1e-3)
    tight = newton_step(hessfast.DenseOperator(A), g, tol=1e-10)
    assert loose.converged and loose.residual <= 1e-3 and loose.iterations < tight.iterations
    warm = newton_step(hessfast.DenseOperator(A), g, tol=1e-10, x0=loose.step)
    assert warm.converged and warm.iterations < tight.iterations
    assert warm.products == warm.iterations + 1  # x0 costs one product
    capped = newton_step(hessfast.DenseOperator(A), g, tol=1e-12, max_iter=3)
    assert not capped.converged and capped.iterations == 3 and capped.products == 3
    zero = newton_step(hessfast.DenseOperator(A), torch.zeros(100, dtype=D))
    assert (
        zero.converged and zero.products == 0 and torch.equal(zero.step, torch.zeros(100, dtype=D))
    )


def test_cg_detects_negative_curvature():
    lam = torch.cat([torch.linspace(0.5, 4, 40, dtype=D), torch.tensor([-2.0, -1.0], dtype=D)])
    A, Q = dense(lam)
    g = grad(42)
    r = newton_step(hessfast.DenseOperator(A), g, damping=0.1, tol=1e-10, max_iter=200)
    assert r.negative_curvature and not r.converged
    p = r.direction
    assert float(p @ (A @ p) + 0.1 * p @ p) <= 0 and r.curvature <= 0
    assert float(p @ (A @ r.step + 0.1 * r.step + g)) < 0  # the model decreases along p
    assert torch.isfinite(r.step).all()
    # enough damping makes the system positive definite again
    r = newton_step(hessfast.DenseOperator(A), g, damping=2.5, tol=1e-10, max_iter=200)
    assert not r.negative_curvature and r.converged
    # g along a negative eigenvector: negative curvature at the very first iteration
    r = newton_step(hessfast.DenseOperator(A), Q[:, -2], damping=0.0)
    assert r.negative_curvature and r.iterations == 1
    assert torch.equal(r.step, torch.zeros(42, dtype=D))


def test_saddle_free_full_rank_equals_dense_formula():
    lam = torch.cat([torch.linspace(-3, -0.2, 15, dtype=D), torch.linspace(0.1, 5, 25, dtype=D)])
    A, _ = dense(lam)
    P = A.shape[0]
    g = grad(P)
    damping = 0.05
    r = newton_step(
        hessfast.DenseOperator(A), g, method="saddle_free", damping=damping, k=P, tol=1e-12
    )
    w, U = torch.linalg.eigh(A)
    ref = -U @ ((U.T @ g) / (w.abs() + damping))
    torch.testing.assert_close(r.step, ref, rtol=0, atol=1e-10 * float(ref.norm()))
    assert r.converged and r.eigenvalues.shape == (P,) and r.products > 0
    r0 = newton_step(
        hessfast.DenseOperator(A), g, method="saddle_free", damping=0.0, k=P, tol=1e-12
    )
    torch.testing.assert_close(r0.step, -U @ ((U.T @ g) / w.abs()), rtol=1e-9, atol=0)


def test_saddle_free_top_k_formula_and_reuse():
    lam = torch.cat(
        [torch.tensor([-8.0, -6.0, 9.0, 7.0, 5.0], dtype=D), torch.linspace(-0.3, 0.3, 95, dtype=D)]
    )
    A, _ = dense(lam)
    P, k, damping = A.shape[0], 5, 0.5
    g = grad(P)
    H = hessfast.DenseOperator(A)
    r = newton_step(H, g, method="saddle_free", damping=damping, k=k, tol=1e-10)
    assert r.products == H.products and r.residual <= 1e-10
    w, U = torch.linalg.eigh(A)
    top = torch.argsort(w.abs(), descending=True)[:k]
    V, lv = U[:, top], w[top]
    c = V.T @ g
    ref = -(V @ (c / (lv.abs() + damping)) + (g - V @ c) / damping)
    torch.testing.assert_close(r.step, ref, rtol=0, atol=1e-8 * float(ref.norm()))
    torch.testing.assert_close(r.eigenvalues, torch.sort(lv).values, rtol=1e-10, atol=0)

    pairs = eigsh(hessfast.DenseOperator(A), k=k, which="LM", tol=1e-10)
    H2 = hessfast.DenseOperator(A)
    again = newton_step(H2, g, method="saddle_free", damping=damping, eigenpairs=pairs)
    assert again.products == H2.products == 0
    torch.testing.assert_close(again.step, ref, rtol=0, atol=1e-8 * float(ref.norm()))


def test_dict_gradient_with_a_model_operator():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).to(D)
    x, y = torch.randn(16, 3, dtype=D), torch.randint(0, 2, (16,))
    H = hessfast.HessianOperator(model, F.cross_entropy, (x, y))
    gd = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    flat = torch.cat([gd[n].reshape(-1) for n in H.names])
    rd = newton_step(H, gd, damping=1.0, tol=1e-12)
    rf = newton_step(H, flat, damping=1.0, tol=1e-12)
    assert list(rd.step) == H.names
    assert all(rd.step[n].shape == gd[n].shape for n in H.names)
    torch.testing.assert_close(torch.cat([rd.step[n].reshape(-1) for n in H.names]), rf.step)
    with pytest.raises(ValueError, match="keys differ"):
        newton_step(H, {"0.weight": gd["0.weight"]})


def test_errors():
    A, _ = dense(torch.linspace(1, 2, 10, dtype=D))
    H = hessfast.DenseOperator(A)
    with pytest.raises(ValueError, match="method"):
        newton_step(H, grad(10), method="lbfgs")
    with pytest.raises(ValueError, match=r"flat \[P\]"):
        newton_step(H, grad(11))
    with pytest.raises(ValueError, match="damping > 0"):
        newton_step(H, grad(10), method="saddle_free", damping=0.0, k=3)
    with pytest.raises(ValueError, match="damping must be"):
        newton_step(H, grad(10), damping=-1.0)
    with pytest.raises(ValueError, match="NaN"):
        newton_step(H, torch.full((10,), float("nan"), dtype=D))
    with pytest.raises(ValueError, match="no parameter names"):
        newton_step(H, {"w": grad(10)})
    bad = A.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(hessfast.NonFiniteError):
        newton_step(hessfast.DenseOperator(bad), grad(10))
