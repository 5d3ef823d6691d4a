"""Operator arithmetic: every composite against dense float64 H and G of a small MLP, the
algorithms on composites, the collection rules, the one-pass residual and the errors."""

import numpy as np
import oracle
import pytest
import torch
from models import zoo

import hessfast
from hessfast import operator_algebra as oa

D = torch.float64


def _dense(fn, model, lf, inputs, y):
    """The dense matrix of ``fn`` (an oracle product) over all parameters, column by column."""
    named = list(model.named_parameters())
    P = sum(p.numel() for _, p in named)
    eye, v, off = torch.eye(P, dtype=D), {}, 0
    for n, p in named:
        v[n] = eye[:, off : off + p.numel()].reshape(P, *p.shape)
        off += p.numel()
    out = fn(model, lf, inputs, y, v)
    return torch.cat([out[n].reshape(P, -1) for n, _ in named], 1).T


@pytest.fixture(scope="module")
def problem():
    """H and G over two batches of the zoo's MLP, and their dense oracles."""
    model, lf, (x,), y = zoo.mlp()
    data = [((x[:5],), y[:5]), ((x[5:],), y[5:])]
    H = hessfast.HessianOperator(model, lf, data)
    G = hessfast.GGNOperator(model, lf, data)
    Hd = oracle.dense_hessian(model, lf, (x,), y)
    Gd = _dense(oracle.ggn_vp, model, lf, (x,), y)
    return model, lf, data, H, G, Hd, Gd


def _V(P, K=3, seed=0):
    return torch.randn(P, K, generator=torch.Generator().manual_seed(seed), dtype=D)


def test_dense_oracles_are_independent_and_differ(problem):
    *_, H, G, Hd, Gd = problem
    V = _V(H.shape[0])
    torch.testing.assert_close(H @ V, Hd @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(G @ V, Gd @ V, rtol=1e-10, atol=1e-12)
    assert float((Hd - Gd).norm()) > 1e-3 * float(Hd.norm())  # R is not negligible here


CASES = {
    "H - G": (lambda H, G, I: H - G, lambda h, g, i: h - g),
    "H + G": (lambda H, G, I: H + G, lambda h, g, i: h + g),
    "-G + H": (lambda H, G, I: -G + H, lambda h, g, i: h - g),
    "G - H": (lambda H, G, I: G - H, lambda h, g, i: g - h),
    "2.5 * H": (lambda H, G, I: 2.5 * H, lambda h, g, i: 2.5 * h),
    "H * 2.5": (lambda H, G, I: H * 2.5, lambda h, g, i: 2.5 * h),
    "-H": (lambda H, G, I: -H, lambda h, g, i: -h),
    "H / 4": (lambda H, G, I: H / 4, lambda h, g, i: h / 4),
    "H + 0.3 I": (lambda H, G, I: H + 0.3 * I, lambda h, g, i: h + 0.3 * i),
    "H.shift(0.3)": (lambda H, G, I: H.shift(0.3), lambda h, g, i: h + 0.3 * i),
    "2 (H - G) + G / 2": (lambda H, G, I: 2 * (H - G) + G / 2, lambda h, g, i: 2 * h - 1.5 * g),
    "H @ G": (lambda H, G, I: H @ G, lambda h, g, i: h @ g),
    "(H @ G).T": (lambda H, G, I: (H @ G).T, lambda h, g, i: g @ h),
    "(H - G).adjoint()": (lambda H, G, I: (H - G).adjoint(), lambda h, g, i: h - g),
    "H @ (G + I) @ H": (lambda H, G, I: H @ (G + I) @ H, lambda h, g, i: h @ (g + i) @ h),
    "sum([H, G, I])": (lambda H, G, I: sum([H, G, I]), lambda h, g, i: h + g + i),
    "(2 H) @ (3 G)": (lambda H, G, I: (2 * H) @ (3 * G), lambda h, g, i: 6 * h @ g),
    "H @ I": (lambda H, G, I: H @ I, lambda h, g, i: h),
}


@pytest.mark.parametrize("name", list(CASES))
def test_composites_match_dense_algebra(problem, name):
    *_, H, G, Hd, Gd = problem
    build, dense = CASES[name]
    P = H.shape[0]
    op = build(H, G, hessfast.IdentityOperator(P, dtype=D))
    M = dense(Hd, Gd, torch.eye(P, dtype=D))
    assert isinstance(op, hessfast.CurvatureOperator)
    assert op.shape == (P, P) and op.dtype == D and op.device == torch.device("cpu")
    V = _V(P, K=4)
    torch.testing.assert_close(op @ V, M @ V, rtol=1e-9, atol=1e-11)  # K-batched
    torch.testing.assert_close(op @ V[:, 0], M @ V[:, 0], rtol=1e-9, atol=1e-11)
    assert op.symmetric == bool(torch.allclose(M, M.T, rtol=1e-9, atol=1e-11))
    assert op.names == H.names and op.sizes == H.sizes or op is H


def test_to_scipy_products_and_adjoint(problem):
    *_, H, G, Hd, Gd = problem
    x = np.random.default_rng(0).standard_normal(H.shape[0])
    for op, M in [(H - G, Hd - Gd), (H @ G, Hd @ Gd)]:
        L = op.to_scipy()
        np.testing.assert_allclose(
            L.matvec(x), (M @ torch.from_numpy(x)).numpy(), rtol=1e-9, atol=1e-12
        )
        np.testing.assert_allclose(
            L.rmatvec(x), (M.T @ torch.from_numpy(x)).numpy(), rtol=1e-9, atol=1e-12
        )
        X = np.stack([x, 2 * x], 1)
        np.testing.assert_allclose(
            L.matmat(X), (M @ torch.from_numpy(X)).numpy(), rtol=1e-9, atol=1e-12
        )
    from scipy.sparse.linalg import eigsh

    top = eigsh((H - G).to_scipy(), k=3, which="LA", return_eigenvectors=False)
    ref = torch.linalg.eigvalsh(Hd - Gd)[-3:].numpy()
    np.testing.assert_allclose(np.sort(top), ref, rtol=1e-8, atol=1e-10)


def test_algorithms_accept_composites(problem):
    *_, H, G, Hd, Gd = problem
    R, Rd = H - G, Hd - Gd
    ref = torch.linalg.eigvalsh(Rd)
    evals, evecs, info = hessfast.eigsh(R, k=3, which="BE", return_info=True)
    torch.testing.assert_close(evals, torch.cat([ref[:1], ref[-2:]]), rtol=1e-7, atol=1e-9)
    assert info.symmetry_probe == "passed"  # the one-pass residual is a model operator
    resid = Rd @ evecs - evecs * evals
    assert float(resid.norm()) < 1e-5 * float(ref.abs().max())

    shifted = H.shift(1.0)
    c = hessfast.condition_number(shifted)
    lam = torch.linalg.eigvalsh(Hd) + 1.0
    assert lam.min() > 0
    assert c.value == pytest.approx(float(lam.max() / lam.min()), rel=1e-6)

    tr = hessfast.trace(R, num_matvecs=R.shape[0])
    assert tr.method == "exact" and tr.estimate == pytest.approx(float(Rd.trace()), rel=1e-10)

    d = hessfast.spectral_density(R, num_probes=3, lanczos_steps=12, seed=0)
    # moment 1 per probe is zᵀ R z / P exactly: the mean of the three quadratic forms
    g = torch.Generator().manual_seed(0)
    Z = torch.stack(
        [
            torch.randint(0, 2, (R.shape[0],), generator=g, dtype=torch.int8).double() * 2 - 1
            for _ in range(3)
        ],
        1,
    )
    forms = (Z * (Rd @ Z)).sum(0) / R.shape[0]
    assert d.moment(1) == pytest.approx(float(forms.mean()), rel=1e-8)

    grad = torch.randn(H.shape[0], generator=torch.Generator().manual_seed(1), dtype=D)
    A = G.shift(0.5)
    step = hessfast.newton_step(A, grad, method="cg", damping=0.0, tol=1e-12)
    ref_step = -torch.linalg.solve(Gd + 0.5 * torch.eye(H.shape[0], dtype=D), grad)
    torch.testing.assert_close(step.step, ref_step, rtol=1e-7, atol=1e-9)

    blocks = hessfast.layerwise(R, groups="module", lanczos_steps=80, num_trace_probes=80)
    off = 0
    for res in blocks.values():
        n = res.size
        blk = Rd[off : off + n, off : off + n]
        off += n
        assert res.lambda_max == pytest.approx(float(torch.linalg.eigvalsh(blk)[-1]), abs=1e-9)
        assert res.trace == pytest.approx(float(blk.trace()), abs=1e-9)
    assert off == R.shape[0]


def test_layerwise_without_parameter_groups_says_what_to_pass():
    A = hessfast.DenseOperator(torch.eye(4, dtype=D))
    with pytest.raises(ValueError, match=r"needs an operator with \.groups\(\)"):
        hessfast.layerwise(A - 0.5 * A.shift(1.0) @ A, groups="module")


def test_a_product_of_different_operators_is_probed_and_refused(problem):
    *_, H, G, Hd, Gd = problem
    assert not (H @ G).symmetric and (H @ G @ H).symmetric and (H @ H).symmetric
    with pytest.raises(ValueError, match="product of different operators"):
        hessfast.eigsh(H @ G, k=2)
    A = hessfast.DenseOperator(torch.diag(torch.arange(1.0, 6.0, dtype=D)))
    B = hessfast.DenseOperator(torch.ones(5, 5, dtype=D))
    with pytest.raises(ValueError, match="product of different operators"):
        hessfast.eigsh(A @ B, k=1)  # no model operator, but not known symmetric: probed
    # H @ H is symmetric: its eigenvalues are those of H squared
    top = hessfast.eigsh(H @ H, k=2, which="LA")[0]
    ref = torch.sort(torch.linalg.eigvalsh(Hd) ** 2).values[-2:]
    torch.testing.assert_close(top, ref, rtol=1e-7, atol=1e-9)


def test_collection_rules_save_products():
    A = hessfast.DenseOperator(torch.diag(torch.arange(1.0, 5.0, dtype=D)))
    B = hessfast.DenseOperator(torch.ones(4, 4, dtype=D))
    I = hessfast.IdentityOperator(4, dtype=D)
    two = A + A
    assert isinstance(two, oa.ScaledOperator) and two.alpha == 2.0 and two.op is A
    assert (A + I + 0.5 * I).terms[1][0] == 1.5  # identities merged
    assert 1 * A is A and +A is A and A - 0 is A and sum([A]) is A
    s = 3 * (A - B)
    assert isinstance(s, oa.SumOperator) and [c for c, _ in s.terms] == [3.0, -3.0]
    p = (2 * A) @ (3 * B)
    assert isinstance(p, oa.ScaledOperator) and p.alpha == 6.0 and p.op.factors == [A, B]
    assert A @ I is A and isinstance(I @ I, hessfast.IdentityOperator)
    assert isinstance(np.float64(2.0) * A, oa.ScaledOperator)
    A.products = 0
    (A + A + B) @ torch.ones(4, 3, dtype=D)
    assert A.products == 3  # one product of A for 2·A
    assert (A - A).alpha == 0.0
    assert (A - B).kind == "DenseOperator - DenseOperator"
    assert (2 * (A @ B) + I).kind == "2·(DenseOperator @ DenseOperator) + I"


def test_bad_arithmetic_says_what_to_do(problem):
    model, lf, data, H, G, _, _ = problem
    P = H.shape[0]
    with pytest.raises(TypeError, match="shift"):
        H + 0.5
    with pytest.raises(TypeError, match="A @ B"):
        H * G
    with pytest.raises(ZeroDivisionError):
        H / 0
    with pytest.raises(ValueError, match="finite"):
        H * float("nan")
    with pytest.raises(TypeError, match="real number"):
        H * torch.ones(P)
    with pytest.raises(ValueError, match="shapes"):
        H + hessfast.IdentityOperator(P + 1, dtype=D)
    with pytest.raises(ValueError, match="dtypes"):
        H - hessfast.IdentityOperator(P, dtype=torch.float32)
    other, lf2, _, _ = zoo.mlp(seed=1)
    H2 = hessfast.HessianOperator(other, lf2, data)
    with pytest.raises(ValueError, match="different models"):
        H - H2
    with pytest.raises(ValueError, match="different models"):
        H @ (H2 + hessfast.IdentityOperator(P, dtype=D))
    Gq = hessfast.GGNOperator(model, lf, data, params=["2.weight"])
    Hq = hessfast.HessianOperator(model, lf, data, params=["0.weight", "0.bias", "2.bias"])
    assert Hq.shape == Gq.shape == (64, 64)
    with pytest.raises(ValueError, match="different parameters"):
        Hq - Gq
    with pytest.raises(ValueError, match="IdentityOperator"):
        hessfast.IdentityOperator(0)


def test_h_minus_g_is_the_one_pass_residual_when_settings_agree(problem, monkeypatch):
    model, lf, data, H, G, Hd, Gd = problem
    V = _V(H.shape[0])
    I = hessfast.IdentityOperator(H.shape[0], dtype=D)
    H @ V, G @ V  # both have run their determinism checks
    R = H - G
    assert type(R) is hessfast.ResidualOperator and R.mode == "residual"
    assert R.names == H.names and R.max_batch_size is None and R.deterministic == "passed"
    assert type(-G + H) is hessfast.ResidualOperator
    torch.testing.assert_close(R @ V, (Hd - Gd) @ V, rtol=1e-9, atol=1e-11)
    for op, M in [
        (G - H, Gd - Hd),
        (2 * H - 2 * G, 2 * (Hd - Gd)),
        (H + I - G, Hd + torch.eye(H.shape[0], dtype=D) - Gd),
    ]:
        leaves = [op.op] if isinstance(op, oa.ScaledOperator) else [t for _, t in op.terms]
        assert any(type(t) is hessfast.ResidualOperator for t in leaves), op
        assert not any(type(t) in (hessfast.HessianOperator, hessfast.GGNOperator) for t in leaves)
        torch.testing.assert_close(op @ V, M @ V, rtol=1e-9, atol=1e-11)
    # one engine pass per product: R's matmat calls the engine once per batch, H - G twice
    calls = []
    compute = hessfast.api.compute

    def counting(*args, **kwargs):
        calls.append(args[6])  # the engine mode
        return compute(*args, **kwargs)

    monkeypatch.setattr(hessfast.api, "compute", counting)
    R @ V
    assert calls == ["residual"] * len(data)


def test_other_settings_give_the_lazy_difference(problem):
    model, lf, data, H, G, Hd, Gd = problem
    V = _V(H.shape[0])
    G_mb = hessfast.GGNOperator(model, lf, data, max_batch_size=3)
    assert not oa.residual_pair(H, G_mb)
    lazy = H - G_mb
    assert isinstance(lazy, oa.SumOperator) and lazy.model_operators == [H, G_mb]
    torch.testing.assert_close(lazy @ V, (Hd - Gd) @ V, rtol=1e-9, atol=1e-11)
    G_other_loss = hessfast.GGNOperator(model, lambda z, t: lf(z, t), data)
    assert isinstance(H - G_other_loss, oa.SumOperator)
    # a lazy composite of model operators is probed for symmetry by default, as they are
    info = hessfast.eigsh(lazy, k=1, return_info=True)[2]
    assert info.symmetry_probe == "passed"
    info = hessfast.eigsh(H + G, k=1, return_info=True)[2]
    assert info.symmetry_probe == "passed"
