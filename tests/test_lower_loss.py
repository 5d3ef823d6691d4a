"""Custom loss callables that are a built-in loss on reshaped tensors run its closed-form rule."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

import hessfast
from hessfast.losses import CrossEntropyLoss, FuncLoss, MSELoss
from hessfast.lower_loss import Reshaped, lower

V = 7


def _ce_flat(z, t):
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), t.reshape(-1))


LOWERED = {
    "reshape": (_ce_flat, CrossEntropyLoss),
    "view-size": (
        lambda z, t: F.cross_entropy(z.view(-1, z.size(-1)), t.view(-1)),
        CrossEntropyLoss,
    ),
    "flatten-options": (
        lambda z, t: F.cross_entropy(
            z.flatten(0, 1), t.flatten(), ignore_index=2, label_smoothing=0.1, reduction="sum"
        ),
        CrossEntropyLoss,
    ),
    "module": (
        lambda z, t: nn.CrossEntropyLoss()(torch.flatten(z, 0, 1), t.flatten()),
        CrossEntropyLoss,
    ),
    "nll": (lambda z, t: F.nll_loss(z.reshape(-1, V).log_softmax(-1), t.reshape(-1)), None),
}

KEPT = {
    "scaled-input": lambda z, t: _ce_flat(z / 2, t),
    "scaled-loss": lambda z, t: _ce_flat(z, t) * 2,
    "shifted": lambda z, t: _ce_flat(z[:, :-1], t[:, 1:]),
    "weight-tensor": lambda z, t: F.cross_entropy(
        z.reshape(-1, V), t.reshape(-1), weight=torch.ones(V)
    ),
    "two-losses": lambda z, t: _ce_flat(z, t) + _ce_flat(z, t),
    "transpose": lambda z, t: F.cross_entropy(z.transpose(1, 2), t),
}


def _targets():
    return torch.randint(0, V, (2, 3), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["reshape", "view-size", "flatten-options", "module"])
def test_reshape_idioms_lower_to_cross_entropy(name):
    fn, cls = LOWERED[name]
    rule = lower(FuncLoss(fn, _targets()), torch.empty(2, 3, V))
    assert isinstance(rule, Reshaped) and isinstance(rule.inner, cls)
    assert rule.shape == (6, V)


def test_same_shape_needs_no_wrapper():
    y = torch.randn(4, 3)
    rule = lower(FuncLoss(lambda z, t: F.mse_loss(z.contiguous(), t), y), torch.empty(4, 3))
    assert isinstance(rule, MSELoss)


@pytest.mark.parametrize("name", list(KEPT))
def test_anything_else_keeps_the_callable(name):
    rule = FuncLoss(KEPT[name], _targets())
    assert lower(rule, torch.empty(2, 3, V)) is rule


def test_target_errors_raise_as_torch():
    bad = torch.full((2, 3), V)
    with pytest.raises(IndexError, match="out of bounds"):
        lower(FuncLoss(_ce_flat, bad), torch.empty(2, 3, V))


class _Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, 5)
        self.lin = nn.Linear(5, V)

    def forward(self, idx):
        return self.lin(torch.tanh(self.emb(idx)))


def _oracles(model, fn, x, y):
    """HVP and GGN-VP of ``fn(model(x), y)`` by ``torch.func``, the callable as it is (the shared
    oracle spells out the sequence layout, which these callables do themselves)."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def z(p):
        return functional_call(model, p, (x,))

    def hvp(v):
        g = grad(lambda p: fn(z(p), y))
        return vmap(lambda t: jvp(g, (params,), (t,))[1])(v)

    def ggn(v):
        out, pull = vjp(z, params)
        gl = grad(lambda o: fn(o, y))

        def one(t):
            hjv = jvp(gl, (out,), (jvp(z, (params,), (t,))[1],))[1]
            return pull(hjv)[0]

        return vmap(one)(v)

    return hvp, ggn


@pytest.mark.parametrize("name", list(LOWERED) + ["scaled-input", "shifted"])
def test_products_equal_the_oracle(name):
    fn = LOWERED[name][0] if name in LOWERED else KEPT[name]
    torch.manual_seed(0)
    model = _Seq().double()
    x, y = _targets(), _targets().flip(0)
    v = {n: torch.randn(2, *p.shape, dtype=p.dtype) for n, p in model.named_parameters()}
    oracle_hvp, oracle_ggn = _oracles(model, fn, x, y)
    for ours, oracle in ((hessfast.hvp, oracle_hvp), (hessfast.ggn_vp, oracle_ggn)):
        want = oracle(v)
        for _ in range(2):  # interpreted, then traced
            got = ours(model, fn, x, y, v)
            for n in want:
                torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12)
    g = hessfast.grad(model, fn, x, y)
    params = dict(model.named_parameters())
    want = torch.autograd.grad(fn(model(x), y), list(params.values()))
    for n, w in zip(params, want):
        torch.testing.assert_close(g[n], w, rtol=1e-10, atol=1e-12)


SMOOTHING = {"eps": 0.0}


def _scheduled(z, t):
    return F.cross_entropy(
        z.flatten(0, 1), t.flatten(), label_smoothing=SMOOTHING["eps"]
    )  # an option read from outside, changed between products


def test_an_option_the_callable_reads_from_outside_is_read_at_every_product():
    torch.manual_seed(0)
    model = _Seq().double()
    x, y = _targets(), _targets().flip(0)
    v = {n: torch.randn(1, *p.shape, dtype=p.dtype) for n, p in model.named_parameters()}
    for eps in (0.0, 0.0, 0.3, 0.3):  # traced on the second product, then the option changes
        SMOOTHING["eps"] = eps
        got = hessfast.hvp(model, _scheduled, x, y, v)
        want = _oracles(model, _scheduled, x, y)[0](v)
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12)


TEMPERATURE = {"t": 1.0}
CLASS_WEIGHT = {"w": torch.ones(V, dtype=torch.float64)}


def _tempered(z, t):  # not a reshape-and-built-in: stays a torch.func loss, traced with its state
    return F.cross_entropy(z.flatten(0, 1) / TEMPERATURE["t"], t.flatten())


def _weighted(z, t):  # holds a tensor of its own, on the CPU: cannot be recorded on meta tensors
    return F.cross_entropy(z.flatten(0, 1), t.flatten(), weight=CLASS_WEIGHT["w"])


@pytest.mark.parametrize(
    "fn, change",
    [
        (_tempered, lambda: TEMPERATURE.update(t=3.0)),
        (_weighted, lambda: CLASS_WEIGHT["w"].mul_(2.0).add_(torch.arange(V) / V)),
    ],
    ids=["python-scalar", "held-tensor-in-place"],
)
def test_custom_loss_state_changed_between_products_is_never_replayed_stale(fn, change):
    TEMPERATURE.update(t=1.0)
    CLASS_WEIGHT["w"] = torch.ones(V, dtype=torch.float64)
    torch.manual_seed(0)
    model = _Seq().double()
    x, y = _targets(), _targets().flip(0)
    v = {n: torch.randn(1, *p.shape, dtype=p.dtype) for n, p in model.named_parameters()}
    for step in range(
        4
    ):  # traced (where it can be) on the second product, changed before the third
        if step == 2:
            change()
        got = hessfast.hvp(model, fn, x, y, v)
        want = _oracles(model, fn, x, y)[0](v)
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12)


def test_a_custom_loss_that_cannot_be_recorded_refuses_compile():
    model = _Seq().double()
    x, y = _targets(), _targets().flip(0)
    v = {n: torch.randn(1, *p.shape, dtype=p.dtype) for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="cannot be recorded"):
        hessfast.hvp(model, _weighted, x, y, v, compile="inductor")


def test_a_loss_recorded_again_gets_a_fresh_result_of_the_shape_its_options_give():
    """The meta result of a built-in loss is remembered per argument metadata (its Python
    decomposition is not rerun on every product): a second recording gets a new tensor of the
    same shape, and a different option or shape gets its own."""
    from hessfast.lower_loss import _Record

    z, t = torch.empty(6, V, device="meta"), torch.empty(6, dtype=torch.long, device="meta")
    outs = []
    for reduction, rows in [("mean", 6), ("mean", 6), ("none", 6), ("none", 4), ("sum", 4)]:
        with _Record() as rec:
            outs.append(F.cross_entropy(z[:rows], t[:rows], reduction=reduction))
        assert rec.calls[-1][3] is outs[-1]
    assert [tuple(o.shape) for o in outs] == [(), (), (6,), (4,), ()]
    assert outs[0] is not outs[1] and all(o.device.type == "meta" for o in outs)
    with (
        pytest.raises((RuntimeError, ValueError)),
        _Record(),
    ):  # an error is not remembered as a result
        F.cross_entropy(z, t[:4])
    with pytest.raises((RuntimeError, ValueError)), _Record():
        F.cross_entropy(z, t[:4])


def test_a_lowered_loss_follows_an_option_changed_between_products():
    """The remembered meta results do not hide a changed option: a global reduction switch gives
    the sum's rule after the mean's."""
    opts = {"reduction": "mean"}

    def loss(z, t):
        return F.cross_entropy(z.flatten(0, 1), t.flatten(), **opts)

    z = torch.randn(2, 3, V)
    t = torch.randint(0, V, (2, 3))
    first = lower(FuncLoss(loss, t), z)
    opts["reduction"] = "sum"
    second = lower(FuncLoss(loss, t), z)
    assert first.inner.reduction == "mean" and second.inner.reduction == "sum"
