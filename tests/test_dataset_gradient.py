"""``H.gradient_and_loss()`` / ``H.gradient()`` and ``num_data=`` on the model operators: float64
oracles on the concatenated data (``torch.func`` gradients and ``dense_hessian``). Over shards of
a data-parallel job: ``tests/test_distributed.py``."""

import functools

import pytest
import torch
import torch.nn.functional as F
from oracle import dense_hessian
from torch.func import functional_call, grad

import hessfast

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models


def mlp(seed=0, out=3):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, out))


def oracle_grad_loss(model, loss_fn, x, y):
    """Gradient (flat, ``named_parameters()`` order) and loss of ``loss_fn(model(x), y)``."""
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(p):
        return loss_fn(functional_call(model, p, (x,)), y)

    g = grad(loss)(params)
    return torch.cat([g[n].reshape(-1) for n in params]), loss(params)


def ragged_ce_data(gen, sizes=(7, 3, 1), classes=3):
    return [
        (
            torch.randn(n, 4, generator=gen, dtype=torch.float64),
            torch.randint(0, classes, (n,), generator=gen),
        )
        for n in sizes
    ]


def cat(data):
    return torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])


@pytest.mark.parametrize("cls", [hessfast.HessianOperator, hessfast.GGNOperator])
def test_ragged_cross_entropy_matches_the_concatenated_data(cls):
    model = mlp().double()
    data = ragged_ce_data(torch.Generator().manual_seed(1))
    H = cls(model, F.cross_entropy, data)
    g, loss = H.gradient_and_loss()
    g_ref, loss_ref = oracle_grad_loss(model, F.cross_entropy, *cat(data))
    assert g.dtype == torch.float64 and g.shape == (H.shape[0],)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(H.gradient(), g_ref, rtol=1e-12, atol=1e-14)


def test_ignore_index_and_class_weights_weight_batches_by_counted_terms():
    model = mlp().double()
    gen = torch.Generator().manual_seed(2)
    data = ragged_ce_data(gen, sizes=(6, 5, 4))
    data[0][1][:4] = -1  # batch 0 counts 2 targets, batch 2 none (skipped)
    data[2][1][:] = -1
    weight = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight, ignore_index=-1)
    H = hessfast.HessianOperator(model, loss_fn, data, max_batch_size=3)
    g, loss = H.gradient_and_loss()
    g_ref, loss_ref = oracle_grad_loss(model, loss_fn, *cat(data))
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-14)


def test_custom_mean_loss_is_weighted_by_its_rows():
    model = mlp(out=2).double()
    gen = torch.Generator().manual_seed(3)
    data = [
        (torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.randn(n, 2, generator=gen))
        for n in (5, 2)
    ]
    data = [(x, y.double()) for x, y in data]

    def loss_fn(z, t):
        return ((z - t) ** 2).mean()

    H = hessfast.GGNOperator(model, loss_fn, data)
    g, loss = H.gradient_and_loss()
    g_ref, loss_ref = oracle_grad_loss(model, loss_fn, *cat(data))
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-14)


def test_sum_loss_is_added_over_batches():
    model = mlp().double()
    data = ragged_ce_data(torch.Generator().manual_seed(4))
    loss_fn = functools.partial(F.cross_entropy, reduction="sum")
    g, loss = hessfast.HessianOperator(model, loss_fn, data).gradient_and_loss()
    g_ref, loss_ref = oracle_grad_loss(model, loss_fn, *cat(data))
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-13)


def test_num_data_divides_a_summed_loss_over_micro_batches():
    """A sum over micro-batches with ``num_data=N``: the mean over the N samples, for the
    products, the gradient and the loss alike."""
    model = mlp().double()
    data = ragged_ce_data(torch.Generator().manual_seed(5))
    N = sum(len(b[1]) for b in data)
    loss_sum = functools.partial(F.cross_entropy, reduction="sum")
    H = hessfast.HessianOperator(model, loss_sum, data, num_data=N)
    x, y = cat(data)
    dense = dense_hessian(model, F.cross_entropy, (x,), y)  # the mean over the N samples
    P = H.shape[0]
    eye = torch.eye(P, dtype=torch.float64)
    torch.testing.assert_close(H @ eye, dense, rtol=1e-10, atol=1e-12)
    g, loss = H.gradient_and_loss()
    g_ref, loss_ref = oracle_grad_loss(model, F.cross_entropy, x, y)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=1e-14)
    assert H.block("0.*").num_data == N


def test_num_data_replaces_the_divisor_of_a_mean_loss():
    """With a mean over samples, ``num_data`` equal to the number of samples changes nothing;
    any other ``N`` scales by (number of samples) / N."""
    model = mlp().double()
    data = ragged_ce_data(torch.Generator().manual_seed(6))
    N = sum(len(b[1]) for b in data)
    v = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64)
    ref = hessfast.HessianOperator(model, F.cross_entropy, data)
    same = hessfast.HessianOperator(model, F.cross_entropy, data, num_data=N)
    half = hessfast.HessianOperator(model, F.cross_entropy, data, num_data=2 * N)
    torch.testing.assert_close(same @ v, ref @ v, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(half @ v, (ref @ v) / 2, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(half.gradient(), ref.gradient() / 2, rtol=1e-12, atol=1e-14)


def test_num_data_with_a_custom_sum_loss_on_one_batch():
    """A custom loss's reduction matters once num_data divides the summed loss, even for one
    batch: a sum is divided by N as it is, not first multiplied by its elements."""
    model = mlp().double()
    x, y = cat(ragged_ce_data(torch.Generator().manual_seed(9)))

    def loss_sum(z, t):
        return F.cross_entropy(z, t, reduction="sum")

    H = hessfast.HessianOperator(model, loss_sum, (x, y), num_data=4)
    g, loss = H.gradient_and_loss()
    g_ref, loss_ref = oracle_grad_loss(model, loss_sum, x, y)
    torch.testing.assert_close(g, g_ref / 4, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss, loss_ref / 4, rtol=1e-12, atol=1e-14)
    dense = dense_hessian(model, loss_sum, (x,), y) / 4
    torch.testing.assert_close(H @ torch.eye(H.shape[0], dtype=torch.float64), dense)


def test_newton_step_with_the_operator_gradient_solves_the_dataset_system():
    model = mlp().double()
    data = ragged_ce_data(torch.Generator().manual_seed(7))
    G = hessfast.GGNOperator(model, F.cross_entropy, data)
    damping = 0.1
    s = hessfast.newton_step(G, G.gradient(), damping=damping, tol=1e-12).step
    x, y = cat(data)
    g_ref, _ = oracle_grad_loss(model, F.cross_entropy, x, y)
    dense = G @ torch.eye(G.shape[0], dtype=torch.float64)
    s_ref = -torch.linalg.solve(dense + damping * torch.eye(G.shape[0], dtype=torch.float64), g_ref)
    torch.testing.assert_close(s, s_ref, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_num_data_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="num_data must be a positive integer"):
        hessfast.HessianOperator(mlp(), F.cross_entropy, ragged_ce_data(None), num_data=bad)


def test_no_counted_target_is_an_error():
    data = [(torch.randn(3, 4), torch.full((3,), -100))]
    H = hessfast.HessianOperator(mlp(), F.cross_entropy, data * 2)
    with pytest.raises(ValueError, match="no batch has a target that counts"):
        H.gradient_and_loss()
