"""The residual ``R = H − G`` of the Gauss-Newton decomposition in one engine pass
(``mode="residual"``, :class:`hessfast.ResidualOperator`), against the float64 oracles' difference
``H V − G V`` (``torch.func``, independent of hessfast)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from models import zoo
from oracle import ggn_vp as oracle_ggn
from oracle import hvp as oracle_hvp
from torch import nn

import hessfast
from hessfast import engine
from hessfast.operators import GGNOperator, HessianOperator, ResidualOperator

D = torch.float64

PROBLEMS = {
    "mlp": zoo.mlp,
    "cnn_bn_eval": zoo.cnn_bn,
    "cnn_bn_train": lambda: zoo.cnn_bn(train=True),
    "resnet": zoo.resnet,
    "gpt_tied": zoo.gpt,
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _flat(d: dict, names: list[str], k: int) -> torch.Tensor:
    return torch.cat([d[n].reshape(k, -1) for n in names], dim=1)


def _oracle_residual(model, loss_fn, inputs, targets, V: torch.Tensor) -> torch.Tensor:
    named = list(model.named_parameters())
    names = [n for n, _ in named]
    v, off = {}, 0
    for n, p in named:
        v[n] = V[off : off + p.numel()].T.reshape(V.shape[1], *p.shape)
        off += p.numel()
    h = _flat(oracle_hvp(model, loss_fn, inputs, targets, v), names, V.shape[1])
    g = _flat(oracle_ggn(model, loss_fn, inputs, targets, v), names, V.shape[1])
    return (h - g).T


@pytest.mark.parametrize("compile", [None, "interpret"])
@pytest.mark.parametrize("name", list(PROBLEMS))
def test_residual_matches_oracle_difference(name, compile, monkeypatch):
    """On the GPT's traced run the fused cross-entropy head is forced on: it mixes the loss
    Hessian's and the head's second-order terms in ``ġ``, so the residual pass must run the layer
    and the loss separately even then (its interpreted run keeps the default setting)."""
    if name == "gpt_tied" and compile is None:
        monkeypatch.setattr(engine, "FUSE_HEAD", True)
    model, loss_fn, inputs, targets = PROBLEMS[name]()
    R = ResidualOperator(model, loss_fn, (inputs, targets), compile=compile)
    V = torch.randn(R.shape[0], 3, dtype=D, generator=torch.Generator().manual_seed(1))
    want = _oracle_residual(model, loss_fn, inputs, targets, V)
    got = R.matmat(V)
    assert want.abs().max() > 1e-3  # the models have second-order terms: R is not zero
    assert rel_err(got, want) < 1e-10


def test_residual_is_h_minus_g_and_symmetric_k_batched_equals_loop():
    model, loss_fn, inputs, targets = zoo.mlp()
    data = (inputs, targets)
    H, G, R = (C(model, loss_fn, data) for C in (HessianOperator, GGNOperator, ResidualOperator))
    V = torch.randn(R.shape[0], 4, dtype=D, generator=torch.Generator().manual_seed(2))
    RV = R.matmat(V)
    assert rel_err(RV, H.matmat(V) - G.matmat(V)) < 1e-12
    loop = torch.stack([R.matvec(V[:, i]) for i in range(4)], dim=1)
    assert rel_err(RV, loop) < 1e-12
    assert torch.allclose(V.T @ RV, (V.T @ RV).T, atol=1e-12)


def test_linear_model_with_mse_has_zero_residual():
    """``z`` linear in θ: every second derivative of the output vanishes, so ``R = 0`` exactly."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(D)
    x, y = torch.randn(6, 4, dtype=D), torch.randn(6, 3, dtype=D)
    R = ResidualOperator(model, F.mse_loss, (x, y))
    V = torch.randn(R.shape[0], 2, dtype=D)
    assert R.matmat(V).abs().max() == 0


def test_residual_on_the_autograd_fallback_path():
    """A model torch.export cannot capture runs the whole-loss autograd path: there the residual
    is double backward with ∂L/∂z held constant."""

    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 5), nn.Linear(5, 2)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return self.b(h) if x.sum() > 0 else -self.b(h)

    torch.manual_seed(0)
    m = Dynamic().to(D)
    x, y = torch.rand(4, 3, dtype=D), torch.tensor([0, 1, 1, 0])
    R = ResidualOperator(m, F.cross_entropy, (x, y))
    V = torch.randn(R.shape[0], 2, dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = R.matmat(V)
    assert rel_err(got, _oracle_residual(m, F.cross_entropy, (x,), y, V)) < 1e-10


def test_residual_top_eigenvalues_match_dense():
    """The algorithms accept the operator: eigsh's extremes equal the dense H − G's."""
    from oracle import dense_hessian

    model, loss_fn, inputs, targets = zoo.mlp()
    Hd = dense_hessian(model, loss_fn, inputs, targets)
    G = GGNOperator(model, loss_fn, (inputs, targets))
    Gd = G.matmat(torch.eye(G.shape[0], dtype=D))
    want = torch.linalg.eigvalsh(Hd - Gd)
    R = ResidualOperator(model, loss_fn, (inputs, targets))
    lo = hessfast.eigsh(R, k=1, which="SA", tol=1e-10)[0]
    hi = hessfast.eigsh(R, k=1, which="LA", tol=1e-10)[0]
    assert abs(float(lo[0]) - float(want[0])) < 1e-8 * float(want.abs().max())
    assert abs(float(hi[0]) - float(want[-1])) < 1e-8 * float(want.abs().max())


@pytest.mark.parametrize("layout", ["dict", "dict K", "flat", "flat K"])
def test_residual_vp_matches_oracle_in_every_vector_layout(layout):
    model, loss_fn, inputs, targets = zoo.resnet()
    named = list(model.named_parameters())
    P = sum(p.numel() for _, p in named)
    V = torch.randn(P, 2, dtype=D, generator=torch.Generator().manual_seed(4))
    want = _oracle_residual(model, loss_fn, inputs, targets, V).T  # [K, P]
    batched = layout.endswith("K")
    flat = V.T if batched else V[:, 0]
    if layout.startswith("flat"):
        got = hessfast.residual_vp(model, loss_fn, *inputs, targets, flat)
        got = got if batched else got[None]
    else:
        v, off = {}, 0
        for n, p in named:
            piece = flat[..., off : off + p.numel()]
            v[n] = piece.reshape(*piece.shape[:-1], *p.shape)
            off += p.numel()
        out = hessfast.residual_vp(model, loss_fn, *inputs, targets, v)
        got = torch.cat([out[n].reshape(2 if batched else 1, -1) for n, _ in named], dim=1)
    assert rel_err(got, want if batched else want[:1]) < 1e-10
