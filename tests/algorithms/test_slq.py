"""Stochastic Lanczos quadrature: exact moments, normalisation, outliers, breakdown, bad input."""

import json
import math
import sys

import numpy as np
import pytest
import torch

import hessfast
from hessfast.algorithms.recurrences import batched_lanczos
from hessfast.algorithms.slq import spectral_density

D = torch.float64


def rotated(lam, seed=0):
    """``Q diag(λ) Qᵀ`` with a random orthogonal ``Q`` (float64)."""
    lam = torch.as_tensor(lam, dtype=D)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=g, dtype=D))
    A = Q @ torch.diag(lam) @ Q.T
    return (A + A.T) / 2


def uniform(P):
    return torch.linspace(-1.0, 1.0, P, dtype=D)


def clustered(P):  # a bulk near 0 and a few outliers, scaled into [-1, 1]
    g = torch.Generator().manual_seed(1)
    bulk = torch.rand(P - 3, generator=g, dtype=D) * 0.05
    return torch.cat([bulk, torch.tensor([-0.4, 0.5, 1.0], dtype=D)])


def repeated(P):  # few distinct eigenvalues: breakdown before the last step
    return torch.tensor([-1.0, 0.25, 0.5, 1.0], dtype=D).repeat_interleave(P // 4)


SPECTRA = {"uniform": uniform, "clustered": clustered, "repeated": repeated}
MOMENT_CASES = [  # (spectrum, P, steps)
    ("uniform", 60, 8),
    ("uniform", 40, 60),  # steps > P: breakdown
    ("clustered", 80, 12),
    ("repeated", 40, 10),
]


@pytest.mark.parametrize("name,P,steps", MOMENT_CASES)
def test_quadrature_moments_are_exact_up_to_the_lanczos_degree(name, P, steps):
    lam = SPECTRA[name](P)
    A = rotated(lam)
    g = torch.Generator().manual_seed(2)
    V = torch.randn(P, 3, generator=g, dtype=D)
    out = batched_lanczos(hessfast.DenseOperator(A), V, steps)
    nodes, weights = out.quadrature()
    assert np.isfinite(nodes).all() and np.isfinite(weights).all()
    for i in range(3):
        n = int(out.num_steps[i])
        assert 1 <= n <= min(steps, P)
        v = V[:, i] / V[:, i].norm()
        w = v.clone()
        for m in range(2 * n):  # w = A^m v
            quad = float(np.sum(weights[i] * nodes[i] ** m))
            assert quad == pytest.approx(float(v @ w), abs=1e-10), (i, m)
            w = A @ w


@pytest.mark.parametrize("name,P,steps", [("uniform", 64, 10), ("clustered", 50, 7)])
def test_spectral_density_moments_of_a_diagonal_operator(name, P, steps):
    # Rademacher probes have v_i² = 1/P, so for a diagonal A every probe's v^T A^m v = tr(A^m)/P
    lam = SPECTRA[name](P)
    d = spectral_density(torch.diag(lam), num_probes=5, lanczos_steps=steps, seed=3)
    assert d.nodes.shape == (5, steps) and d.weights.shape == (5, steps)
    assert (d.num_steps == steps).all()
    for m in range(2 * steps):
        per_probe = np.sum(d.weights * d.nodes**m, axis=1)
        np.testing.assert_allclose(per_probe, float((lam**m).mean()), rtol=0, atol=1e-10)


DENSITY_CASES = [  # (spectrum, P, kwargs)
    ("uniform", 100, {}),
    ("clustered", 200, {}),
    ("clustered", 200, {"sigma": 1e-3, "num_points": 4000}),
    ("repeated", 40, {"distribution": "gaussian"}),
]


@pytest.mark.parametrize("name,P,kwargs", DENSITY_CASES)
def test_density_integrates_to_one(name, P, kwargs):
    d = spectral_density(rotated(SPECTRA[name](P)), num_probes=6, lanczos_steps=20, **kwargs)
    assert isinstance(d.values, np.ndarray) and d.values.dtype == np.float64
    assert d.grid.shape == d.values.shape == (kwargs.get("num_points", 1000),)
    assert (d.values >= 0).all() and np.isfinite(d.values).all()
    assert np.trapezoid(d.values, d.grid) == pytest.approx(1.0, abs=1e-12)
    assert d.grid[0] < d.lambda_min <= d.lambda_max < d.grid[-1]
    np.testing.assert_allclose(d.weights.sum(1), 1.0, atol=1e-12)
    if "sigma" not in kwargs:
        assert d.sigma == pytest.approx(0.01 * (d.lambda_max - d.lambda_min))


def test_density_on_a_grid_of_your_own_is_not_renormalised():
    A = torch.diag(uniform(50))
    d = spectral_density(A, num_probes=4, lanczos_steps=50, sigma=0.05)
    half = spectral_density(
        A, num_probes=4, lanczos_steps=50, sigma=0.05, grid=np.linspace(-2, 0, 2001)
    )
    # half of the (symmetric) spectrum lies in [-2, 0]
    assert np.trapezoid(half.values, half.grid) == pytest.approx(0.5, abs=0.02)
    np.testing.assert_allclose(half.values, d.evaluate(half.grid), rtol=1e-12)


OUTLIER_CASES = [  # (bulk size, outliers, bulk range)
    (400, [5.0, 10.0, 30.0], (0.0, 1.0)),
    (300, [-4.0, 12.0], (-0.5, 1.0)),
    (500, [50.0], (0.0, 0.2)),
]


@pytest.mark.parametrize("n_bulk,outliers,bulk", OUTLIER_CASES)
def test_outliers_are_found_at_the_right_locations(n_bulk, outliers, bulk):
    g = torch.Generator().manual_seed(4)
    lo, hi = bulk
    lam = torch.cat(
        [lo + (hi - lo) * torch.rand(n_bulk, generator=g, dtype=D), torch.tensor(outliers, dtype=D)]
    )
    d = spectral_density(rotated(lam, seed=5), num_probes=8, lanczos_steps=40, seed=1)
    found = [o.value for o in d.outliers]
    assert found == pytest.approx(sorted(outliers, reverse=True), abs=1e-8)
    for o in d.outliers:
        assert o.probes == 8  # a converged eigenvalue shows up in every probe
        assert 0 < o.weight < 0.05 and o.count == pytest.approx(o.weight * d.size)
    assert d.lambda_max == pytest.approx(max(outliers + [hi]), abs=1e-8)


def test_no_outliers_in_a_plain_bulk():
    d = spectral_density(rotated(uniform(200)), num_probes=8, lanczos_steps=40)
    assert d.outliers == []


@pytest.mark.parametrize("rank,P,steps", [(1, 30, 10), (3, 50, 20), (5, 20, 80)])
def test_breakdown_on_a_low_rank_operator_is_finite_and_exact(rank, P, steps):
    g = torch.Generator().manual_seed(6)
    U, _ = torch.linalg.qr(torch.randn(P, rank, generator=g, dtype=D))
    lam = torch.arange(1.0, rank + 1.0, dtype=D)
    H = hessfast.DenseOperator(U @ torch.diag(lam) @ U.T)
    d = spectral_density(H, num_probes=4, lanczos_steps=steps, seed=0)
    assert (d.num_steps <= rank + 1).all()
    assert (
        np.isfinite(d.nodes).all() and np.isfinite(d.weights).all() and np.isfinite(d.values).all()
    )
    assert np.trapezoid(d.values, d.grid) == pytest.approx(1.0, abs=1e-12)
    # products: a probe that broke down drops out of later products
    assert H.products == int(d.num_steps.sum())
    assert d.lambda_max == pytest.approx(float(rank), abs=1e-10)
    assert d.lambda_min == pytest.approx(0.0, abs=1e-10)
    # padding: weight 0 beyond each probe's steps
    for i, n in enumerate(d.num_steps):
        assert (d.weights[i, n:] == 0).all()
    # the eigenvalue 0 carries the weight of the null space: ~1 - rank/P
    assert d.moment(0) == pytest.approx(1.0, abs=1e-12)


def test_zero_operator_and_one_by_one():
    d = spectral_density(torch.zeros(7, 7, dtype=D), num_probes=3, lanczos_steps=5)
    assert (d.num_steps == 1).all() and np.isfinite(d.values).all()
    assert d.lambda_max == 0.0 and d.sigma > 0
    d1 = spectral_density(torch.tensor([[2.5]], dtype=D), num_probes=2, lanczos_steps=3)
    assert d1.nodes[:, 0].tolist() == [2.5, 2.5] and (d1.num_steps == 1).all()


def test_reproducible_with_seed_and_independent_of_max_columns():
    A = rotated(clustered(60))
    a = spectral_density(A, num_probes=5, lanczos_steps=15, seed=7)
    b = spectral_density(A, num_probes=5, lanczos_steps=15, seed=7)
    c = spectral_density(A, num_probes=5, lanczos_steps=15, seed=8)
    np.testing.assert_array_equal(a.nodes, b.nodes)
    np.testing.assert_array_equal(a.values, b.values)
    assert not np.array_equal(a.nodes, c.nodes)
    H = hessfast.DenseOperator(A)
    calls = []
    orig = H.matmat
    H.matmat = lambda V: calls.append(V.shape[1]) or orig(V)
    e = spectral_density(H, num_probes=5, lanczos_steps=15, seed=7, max_columns=2)
    np.testing.assert_allclose(e.nodes, a.nodes, atol=1e-12)
    assert calls == [2, 2, 1] * 15
    f = spectral_density(A, num_probes=5, lanczos_steps=15, seed=7, offload=True)
    np.testing.assert_allclose(f.nodes, a.nodes, atol=1e-12)


def test_one_product_with_all_probes_per_step():
    H = hessfast.DenseOperator(rotated(uniform(100)))
    calls = []
    orig = H.matmat
    H.matmat = lambda V: calls.append(V.shape[1]) or orig(V)
    spectral_density(H, num_probes=6, lanczos_steps=12)
    assert calls == [6] * 12


def test_float32_operator_and_basis_dtype():
    A = rotated(clustered(80))
    ref = spectral_density(A, num_probes=4, lanczos_steps=20, seed=0)
    lo = spectral_density(A.float(), num_probes=4, lanczos_steps=20, seed=0)
    assert lo.nodes.dtype == np.float64
    assert abs(lo.lambda_max - ref.lambda_max) < 1e-5
    mixed = spectral_density(A, num_probes=4, lanczos_steps=20, seed=0, basis_dtype=torch.float32)
    assert abs(mixed.lambda_max - ref.lambda_max) < 1e-5


def test_to_dict_is_json():
    d = spectral_density(rotated(clustered(50)), num_probes=3, lanczos_steps=10, num_points=50)
    out = json.loads(json.dumps(d.to_dict()))
    assert len(out["values"]) == 50 and len(out["nodes"]) == 3
    assert out["outliers"] and set(out["outliers"][0]) == {
        "value",
        "weight",
        "count",
        "probes",
        "spread",
    }


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    d = spectral_density(rotated(clustered(50)), num_probes=3, lanczos_steps=10)
    for log in (True, False):
        path = d.plot(str(tmp_path / f"density_{log}.png"), log=log)
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    d = spectral_density(torch.eye(3, dtype=D), num_probes=1, lanczos_steps=2)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        d.plot(str(tmp_path / "x.png"))


class _FakeCudaOperator:
    """Claims a CUDA device; the memory check must refuse before anything touches it."""

    def __init__(self, P):
        self.shape, self.dtype, self.device = (P, P), torch.float32, torch.device("cuda", 0)

    def matmat(self, V):  # pragma: no cover - never reached
        raise AssertionError("no product expected")


def test_memory_error_says_how_many_bytes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10_000, 20_000))
    P, probes, steps = 1000, 4, 30
    with pytest.raises(MemoryError) as e:
        spectral_density(_FakeCudaOperator(P), num_probes=probes, lanczos_steps=steps)
    need = steps * P * probes * 4
    assert f"{need:,} bytes" in str(e.value) and "offload=True" in str(e.value)


class _NaNOperator(hessfast.DenseOperator):
    def matmat(self, V):
        out = super().matmat(V)
        if self.products > 2 * V.shape[1]:
            out[0] = math.nan
        return out


BAD = [
    (dict(num_probes=0), ValueError, "num_probes"),
    (dict(lanczos_steps=0), ValueError, "lanczos_steps"),
    (dict(num_probes=2.5), ValueError, "num_probes"),
    (dict(distribution="uniform"), ValueError, "distribution"),
    (dict(sigma=-1.0), ValueError, "sigma"),
    (dict(basis_dtype=torch.float16), ValueError, "basis_dtype"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        spectral_density(torch.eye(4, dtype=D), **kwargs)


def test_bad_operators():
    with pytest.raises(ValueError, match="square"):
        spectral_density(torch.zeros(3, 4, dtype=D))
    with pytest.raises(TypeError, match="matmat"):
        spectral_density(object())
    with pytest.raises(FloatingPointError, match="NaN"):
        spectral_density(_NaNOperator(rotated(uniform(20))), num_probes=2, lanczos_steps=10)
    with pytest.raises(hessfast.NonFiniteError):
        spectral_density(_NaNOperator(rotated(uniform(20))), num_probes=2, lanczos_steps=10)
    with pytest.raises(ValueError, match="start"):
        batched_lanczos(
            hessfast.DenseOperator(torch.eye(3, dtype=D)), torch.zeros(3, 1, dtype=D), 2
        )


def test_vectorised_probes_agree_with_the_per_segment_recurrence():
    # the SLQ path (all probes as one batch) and the per-segment engine behind layerwise
    from hessfast.algorithms import recurrences
    from hessfast.algorithms.krylov import Products

    A = rotated(clustered(70))
    op = hessfast.DenseOperator(A)
    S = torch.randn(70, 4, generator=torch.Generator().manual_seed(9), dtype=D)
    kw = dict(tol=None, work_dtype=D, offload=False)
    fast = recurrences.lanczos_probes(op, 4, lambda i: S[:, i], 25, products=Products(op), **kw)
    loop, _ = recurrences.lanczos_runs(
        op,
        [slice(None)] * 4,
        [S[:, i : i + 1] for i in range(4)],
        25,
        restart=False,
        generator=torch.Generator(),
        products=Products(op),
        **kw,
    )
    for a, b in zip(fast, loop):
        assert a.steps == b.steps == 25
        np.testing.assert_allclose(a.matrix(), b.matrix(), atol=1e-12)
