"""Hutchinson and Hutch++ trace estimates: unbiased within their stated error, exact cases, batching."""

import json
import math

import numpy as np
import pytest
import torch

import hessfast
from hessfast.algorithms.trace import TraceEstimate, trace

D = torch.float64


def rotated(lam, seed=0):
    lam = torch.as_tensor(lam, dtype=D)
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(lam.numel(), lam.numel(), generator=g, dtype=D))
    A = Q @ torch.diag(lam) @ Q.T
    return (A + A.T) / 2


def low_rank(P, rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(P, rank, generator=g, dtype=D))
    lam = torch.linspace(-2.0, 5.0, rank, dtype=D)
    return U @ torch.diag(lam) @ U.T


SPECTRA = {  # P = 60
    "indefinite": torch.linspace(-1.0, 2.0, 60, dtype=D),
    "decaying": 10.0 / torch.arange(1, 61, dtype=D) ** 1.5,  # Hutch++ territory
    "outliers": torch.cat(
        [
            torch.rand(57, generator=torch.Generator().manual_seed(3), dtype=D),
            torch.tensor([20.0, 30.0, -15.0], dtype=D),
        ]
    ),
}


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
@pytest.mark.parametrize("name", list(SPECTRA))
def test_unbiased_within_the_stated_error(name, method):
    lam = SPECTRA[name]
    A = rotated(lam)
    true = float(lam.sum())
    runs = [trace(A, num_matvecs=24, method=method, seed=s) for s in range(300)]
    est = np.array([r.estimate for r in runs])
    stderr = np.array([r.stderr for r in runs])
    assert all(r.num_matvecs == 24 and r.method == method for r in runs)
    # the average over seeds is within 4 standard errors (of that average) of the true trace
    assert abs(est.mean() - true) < 4 * est.std(ddof=1) / math.sqrt(len(est))
    # and each run's stated stderr describes the spread of its estimates
    assert 0.7 < np.sqrt(np.mean(stderr**2)) / est.std(ddof=1) < 1.4


def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum():
    A = rotated(SPECTRA["decaying"])
    true = float(SPECTRA["decaying"].sum())
    err = {}
    for method in ("hutchinson", "hutch++"):
        e = [trace(A, num_matvecs=30, method=method, seed=s).estimate - true for s in range(100)]
        err[method] = math.sqrt(np.mean(np.square(e)))
    assert err["hutch++"] < 0.5 * err["hutchinson"]


@pytest.mark.parametrize("P,rank,m", [(80, 5, 15), (80, 10, 30), (50, 1, 4), (120, 20, 61)])
def test_hutchpp_is_exact_on_low_rank(P, rank, m):
    A = low_rank(P, rank)
    H = hessfast.DenseOperator(A)
    est = trace(H, num_matvecs=m, method="hutch++", seed=1)
    assert est.estimate == pytest.approx(float(A.trace()), abs=1e-10)
    assert est.stderr < 1e-10
    assert H.products == m == est.num_matvecs


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
@pytest.mark.parametrize("P,m", [(10, 10), (10, 100), (1, 1), (37, 40)])
def test_exact_trace_when_num_matvecs_reaches_P(method, P, m):
    A = rotated(torch.linspace(-3.0, 4.0, P, dtype=D), seed=P)
    H = hessfast.DenseOperator(A)
    est = trace(H, num_matvecs=m, method=method)
    assert est.method == "exact" and est.stderr == 0.0 and est.num_matvecs == P == H.products
    assert est.estimate == pytest.approx(float(A.trace()), abs=1e-12)


def test_exact_trace_in_batches():
    A = rotated(torch.linspace(0.0, 1.0, 25, dtype=D))
    H = hessfast.DenseOperator(A)
    calls = []
    orig = H.matmat
    H.matmat = lambda V: calls.append(V.shape[1]) or orig(V)
    est = trace(H, num_matvecs=25, batch_size=10)
    assert calls == [10, 10, 5]
    assert est.estimate == pytest.approx(float(A.trace()), abs=1e-12)


@pytest.mark.parametrize(
    "method,calls_all,calls_7", [("hutchinson", [20], [7, 7, 6]), ("hutch++", [6, 14], [6, 7, 7])]
)
def test_batches_and_seed(method, calls_all, calls_7):
    A = rotated(SPECTRA["outliers"])

    def run(batch_size, seed=0):
        H = hessfast.DenseOperator(A)
        calls = []
        orig = H.matmat
        H.matmat = lambda V: calls.append(V.shape[1]) or orig(V)
        return trace(H, num_matvecs=20, method=method, seed=seed, batch_size=batch_size), calls

    a, ca = run(None)
    b, cb = run(7)
    assert ca == calls_all and cb == calls_7
    assert b.estimate == pytest.approx(a.estimate, rel=1e-12) and b.stderr == pytest.approx(
        a.stderr, rel=1e-9
    )
    assert run(None)[0].estimate == a.estimate  # reproducible
    assert run(None, seed=1)[0].estimate != a.estimate


def test_few_matvecs():
    A = rotated(SPECTRA["indefinite"])
    one = trace(A, num_matvecs=1, method="hutchinson")
    assert math.isfinite(one.estimate) and one.stderr == math.inf
    two = trace(A, num_matvecs=2, method="hutch++")  # fewer than 3: plain Hutchinson
    assert math.isfinite(two.stderr) and two.num_matvecs == 2


def test_float32_and_result_object():
    lam = SPECTRA["outliers"]
    est = trace(rotated(lam).float(), num_matvecs=59, method="hutch++")
    assert isinstance(est, TraceEstimate)
    assert abs(est.estimate - float(lam.sum())) < 4 * est.stderr + 1e-3
    assert float(est) == est.estimate
    assert json.loads(json.dumps(est.to_dict()))["method"] == "hutch++"


class _NaNOperator(hessfast.DenseOperator):
    def matmat(self, V):
        out = super().matmat(V)
        out[-1, -1] = math.nan
        return out


BAD = [
    (dict(num_matvecs=0), ValueError, "num_matvecs"),
    (dict(num_matvecs=-3), ValueError, "num_matvecs"),
    (dict(method="hutch+++"), ValueError, "method"),
    (dict(batch_size=0), ValueError, "batch_size"),
]


@pytest.mark.parametrize("kwargs,exc,match", BAD)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        trace(torch.eye(5, dtype=D), **kwargs)


def test_bad_operators():
    with pytest.raises(ValueError, match="square"):
        trace(torch.zeros(4, 5, dtype=D))
    for method in ("hutchinson", "hutch++"):
        with pytest.raises(hessfast.NonFiniteError, match="NaN"):
            trace(_NaNOperator(torch.eye(30, dtype=D)), num_matvecs=9, method=method)


class _SmallMemoryOperator(hessfast.DenseOperator):
    """Runs out of (pretend) CUDA memory on products with more than 4 columns."""

    def matmat(self, V):
        if V.shape[1] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().matmat(V)


def test_products_are_halved_on_out_of_memory():
    A = rotated(SPECTRA["outliers"])
    ref = trace(A, num_matvecs=20, method="hutch++", seed=2)
    est = trace(_SmallMemoryOperator(A), num_matvecs=20, method="hutch++", seed=2)
    assert est.estimate == pytest.approx(ref.estimate, rel=1e-12)
    with pytest.raises(torch.OutOfMemoryError):  # an explicit batch_size is respected
        trace(_SmallMemoryOperator(A), num_matvecs=20, batch_size=8)
