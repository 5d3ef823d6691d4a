"""``hessfast.diagonal`` (Hutchinson, XDiag, exact), ``hessfast.frobenius_norm`` and
``hessfast.layerwise_diagonal``: float64 dense oracles for the exact paths, the XDiag formula
against its leave-one-out definition, and fixed-seed statistical tests with stated bounds."""

import math

import pytest
import torch
import torch.nn.functional as F
from oracle import dense_hessian, param_offsets

import hessfast
from hessfast.algorithms import krylov
from hessfast.algorithms.krylov import rademacher

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


def sym(P, seed=0, rank=None, noise=0.0):
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        A = torch.randn(P, P, generator=g, dtype=torch.float64)
        return (A + A.T) / 2
    U = torch.randn(P, rank, generator=g, dtype=torch.float64)
    lam = torch.linspace(10.0, 1.0, rank, dtype=torch.float64)
    return U @ torch.diag(lam) @ U.T + noise * torch.eye(P, dtype=torch.float64)


def model_and_data():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)
    ).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=g)
    return model, x, y


@pytest.mark.parametrize("block_size", [None, 7])
def test_exact_diagonal_of_a_model_hessian(block_size):
    model, x, y = model_and_data()
    H = hessfast.HessianOperator(model, F.cross_entropy, (x, y))
    pr = krylov.Products(H)
    est = hessfast.diagonal(pr, method="exact", block_size=block_size)
    dense = dense_hessian(model, F.cross_entropy, (x,), y)
    torch.testing.assert_close(est.diagonal, dense.diagonal(), rtol=1e-10, atol=1e-12)
    P = H.shape[0]
    assert est.method == "exact" and est.num_matvecs == P and pr.products == P
    assert pr.calls == (1 if block_size is None else math.ceil(P / block_size))
    assert bool((est.stderr == 0).all())


@pytest.mark.parametrize("method", ["xdiag", "hutchinson"])
def test_enough_matvecs_give_the_exact_diagonal(method):
    A = sym(12)
    est = hessfast.diagonal(A, num_matvecs=12, method=method)
    assert est.method == "exact"
    torch.testing.assert_close(est.diagonal, A.diagonal(), rtol=0, atol=1e-14)


def test_hutchinson_within_its_hoeffding_bound_and_stderr_matches_its_variance():
    """Entry ``i`` of the Hutchinson mean is ``A_ii + (1/n) Σ_k Σ_{j≠i} A_ij z_ki z_kj``, a mean
    of ``n`` independent bounded terms of variance ``σ_i² = Σ_{j≠i} A_ij²``: by Hoeffding,
    ``|error_i| > 5 σ_i / √n`` has probability below ``2 exp(-12.5) < 1e-5``."""
    A = sym(500, seed=3)
    n = 400
    op = hessfast.DenseOperator(A)
    est = hessfast.diagonal(op, num_matvecs=n, method="hutchinson", seed=0)
    assert op.products == n and est.num_matvecs == n
    sigma = ((A**2).sum(1) - A.diagonal() ** 2).sqrt() / math.sqrt(n)
    err = (est.diagonal - A.diagonal()).abs()
    assert bool((err <= 5 * sigma).all()), float((err / sigma).max())
    # the sample standard error estimates σ_i/√n (relative spread of a 400-sample std ≈ 4%)
    ratio = est.stderr / sigma
    assert 0.8 < float(ratio.min()) and float(ratio.max()) < 1.2


def xdiag_by_definition(A, m, seed):
    """The mean over the ``s = m/2`` probes of ``diag(Q₋ᵢQ₋ᵢᵀ A) + ω_i ⊙ (I − Q₋ᵢQ₋ᵢᵀ) A ω_i``,
    ``Q₋ᵢ`` an orthonormal basis of ``A Ω`` without column ``i`` (the probes drawn as hessfast
    draws them)."""
    P, s = A.shape[0], m // 2
    g = torch.Generator().manual_seed(seed)
    Om = torch.stack([rademacher(P, g) for _ in range(s)], 1)
    Y = A @ Om
    out = torch.zeros(P, dtype=torch.float64)
    for i in range(s):
        Qi, _ = torch.linalg.qr(torch.cat([Y[:, :i], Y[:, i + 1 :]], 1))
        w = Om[:, i]
        low = (Qi * (A @ Qi)).sum(1)
        rest = A @ w - Qi @ (Qi.T @ (A @ w))
        out += low + w * rest
    return out / s


@pytest.mark.parametrize("m", [2, 8, 13])
def test_xdiag_equals_its_leave_one_out_definition(m):
    A = sym(25, seed=4)
    op = hessfast.DenseOperator(A)
    est = hessfast.diagonal(op, num_matvecs=m, method="xdiag", seed=5)
    m_even = m - m % 2
    assert est.num_matvecs == m_even and op.products == m_even and est.stderr is None
    torch.testing.assert_close(
        est.diagonal, xdiag_by_definition(A, m_even, 5), rtol=1e-9, atol=1e-10
    )


def test_xdiag_is_exact_below_its_sketch_rank():
    A = sym(40, seed=6, rank=3)
    op = hessfast.DenseOperator(A)
    est = hessfast.diagonal(op, num_matvecs=10, method="xdiag", seed=0)
    torch.testing.assert_close(est.diagonal, A.diagonal(), rtol=1e-10, atol=1e-10)
    assert op.products == est.num_matvecs <= 10


def test_xdiag_is_unbiased_and_beats_hutchinson_on_a_decaying_spectrum():
    """Over 200 independent seeds the mean of the estimates is within 5 standard errors of the
    mean (the spread over the seeds / √200) of ``diag(A)`` for every entry (CLT: a false
    failure has probability < 1e-5 per entry); on a rank-6-plus-noise matrix XDiag with 16
    products has less than a tenth of Hutchinson's mean squared error with 16 products."""
    A = sym(30, seed=7, rank=6, noise=0.05) + 0.02 * sym(30, seed=8)
    runs = 200
    xd = torch.stack(
        [hessfast.diagonal(A, num_matvecs=16, method="xdiag", seed=s).diagonal for s in range(runs)]
    )
    hu = torch.stack(
        [
            hessfast.diagonal(A, num_matvecs=16, method="hutchinson", seed=s).diagonal
            for s in range(runs)
        ]
    )
    se = xd.std(0) / math.sqrt(runs)
    assert bool(((xd.mean(0) - A.diagonal()).abs() <= 5 * se + 1e-12).all())
    mse_x = float(((xd - A.diagonal()) ** 2).mean())
    mse_h = float(((hu - A.diagonal()) ** 2).mean())
    assert mse_x < mse_h / 10, (mse_x, mse_h)


def test_estimates_are_reproducible_and_independent_of_block_size():
    A = sym(40, seed=9)
    for method in ("hutchinson", "xdiag"):
        a = hessfast.diagonal(A, num_matvecs=12, method=method, seed=3).diagonal
        b = hessfast.diagonal(A, num_matvecs=12, method=method, seed=3, block_size=5).diagonal
        c = hessfast.diagonal(A, num_matvecs=12, method=method, seed=4).diagonal
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(a, c)
    f1 = hessfast.frobenius_norm(A, num_matvecs=12, seed=3)
    f2 = hessfast.frobenius_norm(A, num_matvecs=12, seed=3, block_size=5)
    assert f1.squared == pytest.approx(f2.squared, rel=1e-12)


def test_frobenius_norm_exact_on_a_model_hessian():
    model, x, y = model_and_data()
    H = hessfast.GGNOperator(model, F.cross_entropy, (x, y))
    est = hessfast.frobenius_norm(H, num_matvecs=10**6, block_size=9)
    dense = hessfast.GGNOperator(model, F.cross_entropy, (x, y)) @ torch.eye(
        H.shape[0], dtype=torch.float64
    )
    assert est.method == "exact" and est.num_matvecs == H.shape[0] and est.stderr == 0
    assert est.estimate == pytest.approx(float(torch.linalg.norm(dense)), rel=1e-12)


def test_frobenius_norm_estimate_within_its_variance_bound():
    """``‖A z‖²`` for Rademacher ``z`` has mean ``‖A‖_F²`` and variance
    ``2 (‖A²‖_F² − Σ_i (A²)_ii²)``; over 300 probes the mean is within 5 of its standard
    deviations (CLT; a false failure has probability < 1e-6), and the reported standard error
    estimates that deviation within 20%."""
    A = sym(400, seed=10)
    n = 300
    est = hessfast.frobenius_norm(A, num_matvecs=n, seed=1)
    A2 = A @ A
    sd = math.sqrt(2 * (float((A2**2).sum()) - float((A2.diagonal() ** 2).sum())) / n)
    exact = float((A**2).sum())
    assert abs(est.squared - exact) <= 5 * sd
    assert 0.8 < est.stderr / sd < 1.2
    assert est.estimate == pytest.approx(math.sqrt(est.squared))


def test_layerwise_diagonal_splits_the_diagonal_by_module():
    model, x, y = model_and_data()
    H = hessfast.HessianOperator(model, F.cross_entropy, (x, y))
    out = hessfast.layerwise_diagonal(H, method="exact")
    dense = dense_hessian(model, F.cross_entropy, (x,), y).diagonal()
    offs = param_offsets(model)
    assert list(out) == ["0", "2"]
    for mod in out:
        idx = torch.cat([torch.arange(*offs[f"{mod}.{p}"]) for p in ("weight", "bias")])
        torch.testing.assert_close(out[mod], dense[idx], rtol=1e-10, atol=1e-12)
    per_param = hessfast.layerwise_diagonal(H, groups="parameter", method="exact")
    torch.testing.assert_close(
        per_param["0.weight"], dense[torch.arange(*offs["0.weight"])], rtol=1e-10, atol=1e-12
    )


def test_bad_arguments_are_refused():
    A = sym(10)
    with pytest.raises(ValueError, match="method must be one of"):
        hessfast.diagonal(A, method="hutch++")
    with pytest.raises(ValueError, match="num_matvecs must be a positive integer"):
        hessfast.diagonal(A, num_matvecs=0)
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        hessfast.frobenius_norm(A, block_size=0)
    with pytest.raises(ValueError, match="square"):
        hessfast.diagonal(torch.zeros(3, 4))


def test_memory_is_checked_before_allocating(monkeypatch):
    monkeypatch.setattr(krylov, "free_bytes", lambda device: 10_000)
    A = sym(200)
    with pytest.raises(MemoryError, match=r"the exact diagonal .* needs 640,000 bytes"):
        hessfast.diagonal(A, method="exact")
    with pytest.raises(MemoryError, match="XDiag with num_matvecs=100 .* pass a smaller"):
        hessfast.diagonal(A, num_matvecs=100, method="xdiag")
    assert hessfast.diagonal(A, method="exact", block_size=2).num_matvecs == 200
