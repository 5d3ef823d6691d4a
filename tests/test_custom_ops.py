"""Custom ops on the parameter path: one registered with a twice-differentiable autograd formula
goes through the fallback exactly (by autograd: torch.func's forward mode gives such an op a zero
tangent without a word); one whose backward has no formula gets an error naming it."""

import pytest
import torch
import torch.nn.functional as F
from oracle import double_backward_hvp, rel_err

import hessfast

D = torch.float64


@torch.library.custom_op("hessfast_test::cube", mutates_args=())
def cube(x: torch.Tensor) -> torch.Tensor:
    return x * x * x


@cube.register_fake
def _(x):
    return torch.empty_like(x)


def _cube_backward(ctx, g):
    (x,) = ctx.saved_tensors
    return 3 * x * x * g  # plain torch ops: differentiable again


def _save(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


cube.register_autograd(_cube_backward, setup_context=_save)


@torch.library.custom_op("hessfast_test::square_once", mutates_args=())
def square_once(x: torch.Tensor) -> torch.Tensor:
    return x * x


@square_once.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("hessfast_test::square_once_backward", mutates_args=())
def _square_once_backward(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return 2 * x * g


@_square_once_backward.register_fake
def _(x, g):
    return torch.empty_like(x)


square_once.register_autograd(
    lambda ctx, g: _square_once_backward(ctx.saved_tensors[0], g),
    setup_context=_save,
)


class Net(torch.nn.Module):
    def __init__(self, op):
        super().__init__()
        self.a, self.b, self.op = torch.nn.Linear(4, 5), torch.nn.Linear(5, 3), op

    def forward(self, x):
        return self.b(self.op(self.a(x)))


def _setup(op):
    torch.manual_seed(0)
    model = Net(op).to(D)
    x, y = torch.randn(6, 4, dtype=D), torch.randint(0, 3, (6,))
    v = {n: torch.randn(2, *p.shape, dtype=D) for n, p in model.named_parameters()}
    return model, x, y, v


def test_twice_differentiable_custom_op_goes_through_the_fallback():
    model, x, y, v = _setup(cube)
    got = hessfast.hvp(model, F.cross_entropy, x, y, v)
    assert rel_err(got, double_backward_hvp(model, F.cross_entropy, (x,), y, v)) < 1e-10


def test_custom_op_without_a_second_derivative_is_named():
    model, x, y, v = _setup(square_once)
    with pytest.raises(hessfast.UnsupportedOpError, match="square_once.*register_autograd"):
        hessfast.hvp(model, F.cross_entropy, x, y, v, compile="interpret")
    # the GGN needs the op's forward tangent, which without a jvp formula autograd gets only by
    # differentiating the registered backward: refused the same way, never a zero tangent
    with pytest.raises(hessfast.UnsupportedOpError, match="square_once.*register_autograd"):
        hessfast.ggn_vp(model, F.cross_entropy, x, y, v, compile="interpret")
