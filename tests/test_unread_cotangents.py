"""Primal cotangents nobody reads (hessfast/engine.py, ``Call.unread``): an HVP that returns no
gradient, or a residual product, tells the rules that the parameters' ``ḡ`` is unread, and the
stacked rules (convolution, embedding) and linear skip it. Only parameter placeholders are
marked: a weight computed from a parameter still carries its ``ḡ`` upstream."""

import pytest
import torch
import torch.nn.functional as F
from oracle import hvp as oracle_hvp
from oracle import rel_err

import hessfast
from hessfast.rules import conv

D = torch.float64


class Net(torch.nn.Module):
    """A convolution on a parameter weight, one on a weight computed from a parameter (an
    activation: its ``ḡ`` is read by the ``tanh`` upstream, whose second-order term needs it), an
    embedding mixed into the features, and a linear head."""

    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.w2 = torch.nn.Parameter(torch.randn(4, 3, 3, 3) / 5)
        self.b2 = torch.nn.Parameter(torch.randn(4))
        self.emb = torch.nn.Embedding(5, 4)
        self.register_buffer("rows", torch.tensor([1, 3, 3]))
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.tanh(F.conv2d(h, torch.tanh(self.w2), self.b2, padding=1))
        h = h.mean(dim=(2, 3)) * self.emb(self.rows).sum(0)
        return self.head(h)


def _problem(seed=0):
    torch.manual_seed(seed)
    model = Net().to(D)
    x, y = torch.randn(4, 2, 5, 5, dtype=D), torch.randint(0, 3, (4,))
    v = {n: torch.randn(2, *p.shape, dtype=D) for n, p in model.named_parameters()}  # K = 2
    return model, x, y, v


@pytest.mark.parametrize("compile", [None, "interpret"])
def test_an_hvp_without_its_gradient_is_exact(compile):
    model, x, y, v = _problem()
    want = oracle_hvp(model, F.cross_entropy, (x,), y, v)
    for _ in range(3):  # interpreted, traced, replayed
        got = hessfast.hvp(model, F.cross_entropy, x, y, v, compile=compile)
        assert rel_err(got, want) < 1e-10
        both, grads = hessfast.hvp(
            model, F.cross_entropy, x, y, v, compile=compile, return_grad=True
        )
        assert rel_err(both, want) < 1e-10
        assert rel_err(got, both) < 1e-12
        assert set(grads) == set(v)


@pytest.fixture
def unread_seen(monkeypatch):
    """The ``unread`` sets the convolution rule is called with, per weight shape."""
    seen: dict = {}
    fwd = conv.Conv.fwd_jvp

    def spy(self, call):
        seen.setdefault(tuple(call.args[1].shape), set()).add(call.unread)
        return fwd(self, call)

    monkeypatch.setattr(conv.Conv, "fwd_jvp", spy)
    return seen


@pytest.mark.parametrize(
    ("product", "marked"),
    [
        ("hvp", True),
        ("hvp-grad", False),
        ("residual", True),
        ("ggn", False),
        ("grad", False),
    ],
)
def test_only_parameters_whose_gradient_nobody_returns_are_marked(product, marked, unread_seen):
    model, x, y, v = _problem()
    run = {
        "hvp": lambda: hessfast.hvp(model, F.cross_entropy, x, y, v, compile="interpret"),
        "hvp-grad": lambda: hessfast.hvp(
            model, F.cross_entropy, x, y, v, compile="interpret", return_grad=True
        ),
        "residual": lambda: hessfast.residual_vp(
            model, F.cross_entropy, x, y, v, compile="interpret"
        ),
        "ggn": lambda: hessfast.ggn_vp(model, F.cross_entropy, x, y, v, compile="interpret"),
        "grad": lambda: hessfast.grad(model, F.cross_entropy, x, y, compile="interpret"),
    }[product]
    run()
    # c1: weight and bias are parameters; the second convolution's weight is tanh(w2), an
    # activation whose ḡ the tanh reads, and its bias is b2
    assert unread_seen[(3, 2, 3, 3)] == {frozenset({1, 2}) if marked else frozenset()}
    assert unread_seen[(4, 3, 3, 3)] == {frozenset({2}) if marked else frozenset()}
