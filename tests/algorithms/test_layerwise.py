"""Per-group λ_max, λ_min and trace of the diagonal blocks, all groups in the same products."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from oracle import dense_hessian

import hessfast
from hessfast.algorithms.layerwise import BlockSpectrum, layerwise

D = torch.float64


def rotated(lam, seed):
    lam = torch.as_tensor(lam, dtype=D)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=g, dtype=D))
    return Q @ torch.diag(lam) @ Q.T


def bulk(n, top=(), bottom=(), seed=0):
    """``n`` eigenvalues: a bulk in [0, 1] and the given extreme ones (well separated)."""
    g = torch.Generator().manual_seed(seed)
    inner = torch.rand(n - len(top) - len(bottom), generator=g, dtype=D)
    return torch.cat([torch.tensor(list(bottom), dtype=D), inner, torch.tensor(list(top), dtype=D)])


def indices(ranges):
    return torch.cat([torch.arange(a, b) for a, b in ranges])


def block_matrix(N, groups, spectra, seed=0):
    """A symmetric ``N × N`` matrix whose diagonal block on each group has the given spectrum and
    whose every other entry (couplings between groups, ungrouped rows) is random."""
    g = torch.Generator().manual_seed(seed)
    A = 0.3 * torch.randn(N, N, generator=g, dtype=D)
    A = A + A.T
    for i, (label, ranges) in enumerate(groups.items()):
        idx = indices(ranges)
        A[idx[:, None], idx[None, :]] = rotated(spectra[label], seed=100 + i)
    return (A + A.T) / 2


class Counting(hessfast.DenseOperator):
    def __init__(self, matrix):
        super().__init__(matrix)
        self.calls = []

    def matmat(self, V):
        self.calls.append(V.shape[1])
        return super().matmat(V)


GROUPS = {"a": [(0, 60), (130, 190)], "b": [(60, 130), (190, 210)], "c": [(210, 220)]}  # N = 230
CASES = [  # (name, k, steps, spectra)
    (
        "k1",
        1,
        20,
        {
            "a": bulk(120, top=[3.0], bottom=[-2.0]),
            "b": bulk(90, top=[5.0], bottom=[-1.0], seed=1),
            "c": bulk(10, seed=2),
        },
    ),
    (
        "k2-repeated",
        2,
        15,
        {
            "a": bulk(120, top=[7.0, 7.0], bottom=[-3.0, -3.0]),
            "b": bulk(90, top=[4.0, 6.0], bottom=[-2.0, -1.5], seed=1),
            "c": bulk(10, seed=2),
        },
    ),
    (
        "k3",
        3,
        12,
        {
            "a": bulk(120, top=[2.0, 3.0, 4.0], bottom=[-1.0, -2.0, -3.0]),
            "b": bulk(90, top=[4.0, 5.0, 6.0], bottom=[-4.0, -5.0, -6.0], seed=1),
            "c": bulk(10, seed=2),
        },
    ),
]


@pytest.mark.parametrize("name,k,steps,spectra", CASES, ids=[c[0] for c in CASES])
def test_blocks_match_dense_eigvalsh_and_trace(name, k, steps, spectra):
    A = block_matrix(230, GROUPS, spectra)
    H = Counting(A)
    out = layerwise(H, groups=GROUPS, k=k, lanczos_steps=steps, num_trace_probes=128)
    assert list(out) == list(GROUPS)
    for label, ranges in GROUPS.items():
        idx = indices(ranges)
        block = A[idx][:, idx]
        ev = torch.linalg.eigvalsh(block)
        r = out[label]
        assert isinstance(r, BlockSpectrum) and r.size == idx.numel()
        assert r.method == ("dense" if idx.numel() <= steps * k else "lanczos")
        assert r.top == pytest.approx(ev.flip(0)[:k].tolist(), abs=1e-8)
        assert r.bottom == pytest.approx(ev[:k].tolist(), abs=1e-8)
        assert r.lambda_max == r.top[0] and r.lambda_min == r.bottom[0]
        assert r.residual_max < 1e-6 and r.residual_min < 1e-6
        assert r.trace == pytest.approx(float(block.trace()), abs=1e-10) and r.trace_stderr == 0.0
        # a Ritz value has an eigenvalue within its residual
        for theta, res in zip(r.top + r.bottom, r.residuals_top + r.residuals_bottom):
            assert float((ev - theta).abs().min()) <= res + 1e-10
    # the Lanczos part: exactly lanczos_steps products, each with every Lanczos group's k columns;
    # the first also carries the unit columns for the traces (a: 120, b: 90) and the dense block c
    assert len(H.calls) == steps
    assert H.calls[0] == 2 * k + 120 + 90 + 10
    assert H.calls[1:] == [2 * k] * (steps - 1)


def test_max_columns_splits_products_and_changes_nothing():
    spectra = CASES[1][3]
    A = block_matrix(230, GROUPS, spectra)
    ref = layerwise(A, groups=GROUPS, k=2, lanczos_steps=15, num_trace_probes=16, seed=3)
    H = Counting(A)
    out = layerwise(
        H, groups=GROUPS, k=2, lanczos_steps=15, num_trace_probes=16, seed=3, max_columns=3
    )
    assert max(H.calls) <= 3
    first = 4 + 16 + 10  # Lanczos, shared Hutchinson probes of a and b, dense c
    assert sum(H.calls) == first + 4 * 14
    for label in GROUPS:
        assert out[label].top == pytest.approx(ref[label].top, abs=1e-10)
        assert out[label].trace == pytest.approx(ref[label].trace, abs=1e-10)


@pytest.mark.parametrize("trace_probes", ["shared", "block"])
def test_hutchinson_traces_within_their_error(trace_probes):
    spectra = CASES[0][3]
    A = block_matrix(230, GROUPS, spectra)
    for seed in range(3):
        out = layerwise(
            A,
            groups=GROUPS,
            which=("trace",),
            num_trace_probes=40,
            seed=seed,
            trace_probes=trace_probes,
        )
        for label in ("a", "b"):
            idx = indices(GROUPS[label])
            r = out[label]
            assert r.method == "hutchinson" and r.lambda_max is None and r.top == []
            assert 0 < r.trace_stderr < math.inf
            assert abs(r.trace - float(A[idx, idx].sum())) < 4 * r.trace_stderr
        assert out["c"].trace == pytest.approx(float(A[210:220, 210:220].trace()), abs=1e-12)


def test_which_selects_the_work():
    A = block_matrix(230, GROUPS, CASES[0][3])
    H = Counting(A)
    out = layerwise(H, groups=GROUPS, which=("trace",), num_trace_probes=8)
    assert H.calls == [8]  # shared probes; c (10 > 8) by Hutchinson too
    H = Counting(A)
    out = layerwise(H, groups=GROUPS, which=("trace",), num_trace_probes=8, trace_probes="block")
    assert H.calls == [8 + 8 + 8]
    H = Counting(A)
    out = layerwise(H, groups=GROUPS, which=("trace",), num_trace_probes=10)
    assert H.calls == [10 + 10]  # c exact from its 10 unit columns
    assert out["c"].trace_method == "exact" and out["a"].trace_method == "hutchinson"
    H = Counting(A)
    out = layerwise(H, groups=GROUPS, which="lambda_max", lanczos_steps=20)
    assert len(H.calls) == 20 and H.calls[0] == 2 + 10
    assert out["a"].lambda_max == pytest.approx(3.0, abs=1e-8)
    assert out["a"].lambda_min is None and out["a"].trace is None


@pytest.mark.parametrize("k", [1, 2])
def test_low_rank_blocks_restart_and_stay_finite(k):
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(100, 2, generator=g, dtype=D))
    A = torch.zeros(150, 150, dtype=D)
    A[:100, :100] = U @ torch.diag(torch.tensor([-1.0, 4.0], dtype=D)) @ U.T
    H = Counting(A)
    out = layerwise(H, groups={"low": [(0, 100)], "zero": [(100, 150)]}, k=k, lanczos_steps=20)
    assert len(H.calls) == 20
    for r in out.values():
        assert all(
            math.isfinite(x) for x in r.top + r.bottom + r.residuals_top + r.residuals_bottom
        )
    assert out["low"].lambda_max == pytest.approx(4.0, abs=1e-10)
    assert out["low"].lambda_min == pytest.approx(-1.0, abs=1e-10)
    assert out["zero"].lambda_max == pytest.approx(0.0, abs=1e-12)
    assert out["zero"].lambda_min == pytest.approx(0.0, abs=1e-12)


def test_mlp_blocks_match_the_dense_hessian():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(D)
    x, y = torch.randn(32, 4, dtype=D), torch.randint(0, 3, (32,))
    H = hessfast.HessianOperator(model, F.cross_entropy, (x, y))
    dense = dense_hessian(model, F.cross_entropy, (x,), y)
    for by in ("module", "parameter"):
        groups = H.groups(by)
        out = layerwise(H, groups=by, k=2, lanczos_steps=13, num_trace_probes=64)
        assert list(out) == list(groups)
        for label, ranges in groups.items():
            idx = indices(ranges)
            block = dense[idx][:, idx]
            ev = torch.linalg.eigvalsh(block)
            r = out[label]
            assert r.size == idx.numel()
            assert r.lambda_max == pytest.approx(float(ev[-1]), abs=1e-8)
            assert r.lambda_min == pytest.approx(float(ev[0]), abs=1e-8)
            assert r.trace == pytest.approx(float(block.trace()), abs=1e-10)
        assert out[next(iter(groups))].method == "lanczos"  # "0" (40) and "0.weight" (32) > 26


def test_to_dict_is_json():
    out = layerwise(
        torch.diag(torch.arange(1.0, 41.0, dtype=D)), groups={"x": [(0, 40)]}, lanczos_steps=5
    )
    d = json.loads(json.dumps(out["x"].to_dict()))
    assert d["size"] == 40 and d["steps"] == 5 and d["method"] == "lanczos"
    assert 1.0 < d["lambda_min"] < d["lambda_max"] < 40.0  # Ritz values are inner bounds


class _NaNOperator(hessfast.DenseOperator):
    def matmat(self, V):
        out = super().matmat(V)
        if self.products > 40:
            out[3] = math.nan
        return out


BAD = [
    (dict(k=0), "k"),
    (dict(lanczos_steps=0), "lanczos_steps"),
    (dict(num_trace_probes=0), "num_trace_probes"),
    (dict(which=("lambda_max", "spectrum")), "which"),
    (dict(which=()), "which"),
    (dict(groups={"a": []}), "empty"),
    (dict(groups={"a": [(3, 3)]}), "empty"),
    (dict(groups={}), "empty"),
    (dict(groups={"a": [(0, 5), (4, 8)]}), "overlap"),
    (dict(groups={"a": [(0, 50)]}), "outside"),
    (dict(groups={"a": [(0, 1, 2)]}), "pair"),
    (dict(groups="module"), "dict"),
    (dict(trace_probes="all"), "trace_probes"),
]


@pytest.mark.parametrize("kwargs,match", BAD)
def test_bad_input(kwargs, match):
    kwargs = {"groups": {"a": [(0, 10)]}, **kwargs}
    with pytest.raises(ValueError, match=match):
        layerwise(torch.eye(20, dtype=D), **kwargs)


def test_bad_operators():
    with pytest.raises(ValueError, match="square"):
        layerwise(torch.zeros(4, 5, dtype=D), groups={"a": [(0, 2)]})
    A = block_matrix(230, GROUPS, CASES[0][3])
    with pytest.raises(hessfast.NonFiniteError, match="NaN"):
        layerwise(_NaNOperator(A), groups=GROUPS, lanczos_steps=10)


@pytest.mark.parametrize("trace_probes", ["shared", "block"])
def test_trace_estimators_are_unbiased_even_for_overlapping_groups(trace_probes):
    A = block_matrix(230, GROUPS, CASES[0][3], seed=4)
    groups = {"x": [(0, 50), (100, 140)], "y": [(30, 120)], "z": [(200, 230)]}
    runs = [
        layerwise(
            A, groups=groups, which="trace", num_trace_probes=12, seed=s, trace_probes=trace_probes
        )
        for s in range(200)
    ]
    for label, ranges in groups.items():
        idx = indices(ranges)
        est = torch.tensor([r[label].trace for r in runs], dtype=D)
        assert abs(float(est.mean()) - float(A[idx, idx].sum())) < 4 * float(est.std()) / math.sqrt(
            200
        )
        stderr = torch.tensor([r[label].trace_stderr for r in runs], dtype=D)
        assert 0.7 < float(stderr.square().mean().sqrt() / est.std()) < 1.4
