"""Closed-form loss rules against torch.func on the loss alone (float64), for every option."""

import functools

import pytest
import torch
import torch.nn.functional as F
from oracle import torch_loss
from torch import nn
from torch.func import grad, jvp, vmap

from hessfast.losses import FuncLoss, resolve

D = torch.float64
g = torch.Generator().manual_seed(0)


def r(*s):
    return torch.randn(*s, generator=g, dtype=D)


def ri(hi, *s):
    return torch.randint(0, hi, s, generator=g)


W5 = torch.rand(5, generator=g, dtype=D) + 0.5
Y_IGN = torch.tensor([0, -100, 3, 4, -100, 1])
Y_IGN7 = torch.tensor([0, 7, 3, 4, 7, 1])
SOFT = torch.softmax(r(6, 5), -1)

CASES = {
    "ce": (F.cross_entropy, r(6, 5), ri(5, 6)),
    "ce-sum": (functools.partial(F.cross_entropy, reduction="sum"), r(6, 5), ri(5, 6)),
    "ce-weight": (functools.partial(F.cross_entropy, weight=W5), r(6, 5), ri(5, 6)),
    "ce-ignore": (F.cross_entropy, r(6, 5), Y_IGN),
    "ce-ignore-custom": (functools.partial(F.cross_entropy, ignore_index=7), r(6, 5), Y_IGN7),
    "ce-smoothing": (functools.partial(F.cross_entropy, label_smoothing=0.2), r(6, 5), ri(5, 6)),
    "ce-all-options": (
        nn.CrossEntropyLoss(weight=W5, ignore_index=7, label_smoothing=0.1),
        r(6, 5),
        Y_IGN7,
    ),
    "ce-all-options-sum": (
        nn.CrossEntropyLoss(weight=W5, label_smoothing=0.1, reduction="sum"),
        r(6, 5),
        Y_IGN,
    ),
    "ce-soft": (F.cross_entropy, r(6, 5), SOFT),
    "ce-soft-weight-smoothing": (
        nn.CrossEntropyLoss(weight=W5, label_smoothing=0.3),
        r(6, 5),
        SOFT,
    ),
    "ce-sequence": (F.cross_entropy, r(2, 3, 5), ri(5, 2, 3)),
    "ce-torch-layout": (F.cross_entropy, r(2, 5, 3, 4), ri(5, 2, 3, 4)),
    "ce-unbatched": (F.cross_entropy, r(5), torch.tensor(2)),
    "nll": (F.nll_loss, torch.log_softmax(r(6, 5), -1), ri(5, 6)),
    "nll-weight-ignore-sum": (
        nn.NLLLoss(weight=W5, reduction="sum"),
        torch.log_softmax(r(6, 5), -1),
        Y_IGN,
    ),
    "nll-sequence": (F.nll_loss, torch.log_softmax(r(2, 3, 5), -1), ri(5, 2, 3)),
    "mse": (F.mse_loss, r(4, 3), r(4, 3)),
    "mse-sum": (nn.MSELoss(reduction="sum"), r(4, 3), r(4, 3)),
    "bce": (F.binary_cross_entropy_with_logits, r(4, 3), torch.rand(4, 3, generator=g, dtype=D)),
    "bce-weights": (
        nn.BCEWithLogitsLoss(weight=torch.rand(3, dtype=D), pos_weight=torch.rand(3, dtype=D) + 1),
        r(4, 3),
        torch.rand(4, 3, generator=g, dtype=D),
    ),
    "bce-sum": (
        functools.partial(F.binary_cross_entropy_with_logits, reduction="sum"),
        r(4, 3),
        (torch.rand(4, 3, generator=g) > 0.5).to(D),
    ),
}


def _double_backward(L, z, u):
    """``∇²L(z) u_k`` by double backward (torch.func trips on mse_loss's zero tensors)."""
    x = z.clone().requires_grad_(True)
    gx = torch.autograd.grad(L(x), x, create_graph=True)[0]
    return (
        torch.stack(
            [torch.autograd.grad(gx, x, uk, retain_graph=True, allow_unused=True)[0] for uk in u]
        )
        if gx.requires_grad
        else torch.zeros_like(u)
    )


@pytest.mark.parametrize("case", list(CASES))
def test_loss_rule_matches_torch_func(case):
    loss_fn, z, t = CASES[case]
    rule = resolve(loss_fn, t, tuple(z.shape))
    assert not isinstance(rule, FuncLoss), "expected a closed-form rule"
    f = torch_loss(loss_fn)

    def L(x):
        return f(x, t)

    u = r(3, *z.shape)
    loss, gz, gdz = rule.evaluate(z, u, "hvp")
    torch.testing.assert_close(loss, L(z), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gz, grad(L)(z), rtol=1e-12, atol=1e-12)
    ref = _double_backward(L, z, u)
    if gdz is None:
        assert torch.count_nonzero(ref) == 0
    else:
        torch.testing.assert_close(gdz, ref, rtol=1e-12, atol=1e-12)
    _, g2, gd2 = rule.evaluate(z, u, "ggn")
    assert g2 is None
    if gdz is not None:
        torch.testing.assert_close(gd2, gdz)


def test_unknown_callable_uses_autograd_loss():
    def my_loss(z, t):
        return ((z - t) ** 4).mean()

    z, t = r(3, 2), r(3, 2)
    rule = resolve(my_loss, t, (3, 2))
    assert isinstance(rule, FuncLoss)
    u = r(2, 3, 2)
    loss, gz, gdz = rule.evaluate(z, u, "hvp")
    ref = vmap(lambda w: jvp(grad(lambda x: my_loss(x, t)), (z,), (w,))[1])(u)
    torch.testing.assert_close(gdz, ref)


def test_reduction_none_is_refused():
    with pytest.raises(ValueError, match="scalar loss"):
        resolve(nn.CrossEntropyLoss(reduction="none"), ri(5, 6), (6, 5))


def test_ambiguous_sequence_layout_is_refused():
    rule = resolve(F.cross_entropy, ri(4, 2, 4), (2, 4, 4))
    with pytest.raises(ValueError, match="ambiguous"):
        rule.evaluate(r(2, 4, 4), None, "grad")


def test_broadcasting_mse_follows_torch_with_its_warning():
    from hessfast.losses import Broadcast

    t = r(4, 1)
    with pytest.warns(UserWarning, match="different to the input size"):
        rule = resolve(F.mse_loss, t, (4, 3))
    assert isinstance(rule, Broadcast)
    z, zdot = r(4, 3), r(2, 4, 3)
    with pytest.warns(UserWarning):
        f = torch_loss(F.mse_loss)
        want_g = grad(lambda x: f(x, t))(z)
        want_gd = torch.stack(
            [torch.autograd.functional.hvp(lambda x: f(x, t), z, u)[1] for u in zdot]
        )
    loss, gz, gd = rule.evaluate(z, zdot, "hvp")
    torch.testing.assert_close(loss, F.mse_loss(z, t.expand(4, 3)))
    torch.testing.assert_close(gz, want_g)
    torch.testing.assert_close(gd, want_gd)
