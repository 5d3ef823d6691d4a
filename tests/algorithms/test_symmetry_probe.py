"""The algorithms probe a model operator's symmetry by default (one two-column product) and refuse
an asymmetric one with the likely causes, instead of returning numbers."""

import pytest
import torch
import torch.nn.functional as F

import hessfast
from hessfast.algorithms import eigsh, newton_step, spectral_density

D = torch.float64


def _op(cls=hessfast.HessianOperator):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    x, y = torch.randn(8, 4, dtype=D), torch.randint(0, 3, (8,))
    return cls(model.to(D), F.cross_entropy, (x, y))


@pytest.fixture
def skewed(monkeypatch):
    """A model operator whose products are not symmetric (a stand-in for a broken model)."""
    op = _op()
    exact = op.matmat
    S = torch.randn(*op.shape, generator=torch.Generator().manual_seed(1), dtype=D).triu(1)
    monkeypatch.setattr(op, "matmat", lambda V: exact(V) + S @ V)
    return op


@pytest.mark.parametrize(
    "run",
    [
        lambda H: eigsh(H, k=2),
        lambda H: spectral_density(H, num_probes=2, lanczos_steps=5),
        lambda H: newton_step(H, torch.ones(H.shape[0], dtype=D)),
    ],
    ids=["eigsh", "spectral_density", "newton_step"],
)
def test_asymmetric_model_operator_is_refused_by_default(skewed, run):
    with pytest.raises(ValueError, match="not symmetric.*Likely causes.*check_symmetric=False"):
        run(skewed)


def test_probe_costs_one_two_column_product_and_can_be_skipped():
    H = _op()
    calls = []
    matmat = H.matmat
    H.matmat = lambda V: (calls.append(V.shape[1]), matmat(V))[1]
    newton_step(H, torch.ones(H.shape[0], dtype=D), max_iter=1)
    assert calls[0] == 2 and len(calls) == 2  # the probe, then one CG product
    calls.clear()
    newton_step(H, torch.ones(H.shape[0], dtype=D), max_iter=1, check_symmetric=False)
    assert calls == [1]


def test_dense_operators_are_not_probed_unless_asked():
    A = torch.randn(6, 6, dtype=D).triu()
    H = hessfast.DenseOperator(A)  # not symmetric: the caller's business unless asked
    eigsh(H, k=1)
    with pytest.raises(ValueError, match="not symmetric"):
        eigsh(H, k=1, check_symmetric=True)


def test_symmetric_model_operators_pass_in_float32():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 5))
    x, y = torch.randn(64, 16), torch.randint(0, 5, (64,))
    for cls in (hessfast.HessianOperator, hessfast.GGNOperator):
        eigsh(cls(model, F.cross_entropy, (x, y)), k=2)
