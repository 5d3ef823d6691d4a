"""The RMSNorm fusion pass (``hessfast/fusion.py``): what it rewrites, what it leaves alone, and
that products through the rewritten graph still equal the float64 oracles."""

import pytest
import torch
from models import zoo
from oracle import ggn_vp, hvp, rel_err
from torch import nn

import hessfast
from hessfast.capture import capture
from hessfast.fusion import fuse_rms_norm

aten = torch.ops.aten
D = torch.float64
CHAIN = {aten.pow.Tensor_Scalar, aten.mean.dim, aten.rsqrt.default}


class Written(nn.Module):
    """RMSNorm written out (``square="pow"`` as Llama, ``"mul"`` as ``x * x``); ``extra`` names an
    intermediate of the chain that is also added to the output (a second user of it)."""

    def __init__(self, d=6, eps=1e-5, weight=True, square="pow", extra=None):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(d, dtype=D)) if weight else None
        self.eps, self.square, self.extra = eps, square, extra

    def forward(self, h):
        sq = h.pow(2) if self.square == "pow" else h * h
        var = sq.mean(-1, keepdim=True)
        shifted = var + self.eps
        rs = torch.rsqrt(shifted)
        scaled = h * rs
        out = scaled if self.weight is None else self.weight * scaled
        if self.extra is None:
            return out
        return (
            out + {"sq": sq, "var": var, "shifted": shifted, "rs": rs, "scaled": scaled}[self.extra]
        )


class Net(nn.Module):
    """Linear → norm → tanh → Linear: parameters before and after the norm."""

    def __init__(self, norm, d=6):
        super().__init__()
        self.inp, self.norm, self.out = nn.Linear(4, d), norm, nn.Linear(d, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))))


def _net(norm, seed=0):
    torch.manual_seed(seed)
    model = Net(norm).to(D)
    x, y = torch.randn(2, 5, 4, dtype=D), torch.randint(0, 3, (2, 5))
    return model, x, y


def _calls(model, x):
    return [n for n in capture(model, (x,)).graph_module.graph.nodes if n.op == "call_function"]


def _targets(nodes):
    return [n.target for n in nodes]


def _vectors(model, k=2):
    g = torch.Generator().manual_seed(1)
    return {n: torch.randn(k, *p.shape, generator=g, dtype=D) for n, p in model.named_parameters()}


def _check_products(model, x, y, tol=1e-10):
    loss = torch.nn.functional.cross_entropy
    v = _vectors(model)
    assert rel_err(hessfast.hvp(model, loss, x, y, v), hvp(model, loss, (x,), y, v)) < tol
    assert rel_err(hessfast.ggn_vp(model, loss, x, y, v), ggn_vp(model, loss, (x,), y, v)) < tol


@pytest.mark.parametrize("square", ["pow", "mul"])
def test_written_rms_norm_becomes_one_node_with_weight(square):
    model, x, y = _net(Written(eps=1e-3, square=square))
    nodes = _calls(model, x)
    fused = [n for n in nodes if n.target is aten.rms_norm.default]
    assert len(fused) == 1
    h, shape, weight, eps = fused[0].args
    assert h.target is aten.linear.default and shape == [6] and eps == 1e-3
    assert weight.op == "placeholder" and "norm_weight" in weight.name
    targets = _targets(nodes)
    assert not CHAIN & set(targets) and aten.mul.Tensor not in targets
    # eps = 1e-3 against rows of ~1e-2: a wrong eps would change every product
    with torch.no_grad():
        model.inp.weight.mul_(0.02)
        model.inp.bias.mul_(0.02)
    _check_products(model, x, y)


def test_without_weight_and_same_values_as_the_chain():
    """The rewritten graph computes what the model computes (eps included)."""
    torch.manual_seed(0)
    model = Written(weight=False, eps=0.5).to(D)
    x = 0.5 * torch.randn(3, 6, dtype=D)
    ep = torch.export.export(model, (x,), strict=False)
    assert fuse_rms_norm(ep.graph_module) == 1
    targets = _targets(n for n in ep.graph_module.graph.nodes if n.op == "call_function")
    assert targets == [aten.rms_norm.default]
    fused = next(n for n in ep.graph_module.graph.nodes if n.op == "call_function")
    assert fused.args[2] is None and fused.args[3] == 0.5
    torch.testing.assert_close(ep.graph_module(x)[0], model(x), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("extra", ["sq", "var", "shifted", "rs"])
def test_extra_user_of_an_intermediate_blocks_the_rewrite(extra):
    model, x, y = _net(Written(extra=extra))
    targets = _targets(_calls(model, x))
    assert aten.rms_norm.default not in targets
    assert CHAIN <= set(targets)
    _check_products(model, x, y)


def test_extra_user_of_the_normalised_value_keeps_the_weight_multiply():
    """``x · rsqrt(·)`` read twice: the chain is fused, the weight multiply stays separate."""
    model, x, y = _net(Written(extra="scaled"))
    nodes = _calls(model, x)
    (fused,) = [n for n in nodes if n.target is aten.rms_norm.default]
    assert fused.args[2] is None and len(fused.users) == 2
    assert not CHAIN & set(_targets(nodes))
    _check_products(model, x, y)


def test_weight_with_another_shape_is_not_absorbed():
    """A weight that broadcasts from [1, D] stays a separate multiply after the fused node."""
    norm = Written()
    norm.weight = nn.Parameter(1 + 0.1 * torch.randn(1, 6, dtype=D))
    model, x, y = _net(norm)
    nodes = _calls(model, x)
    fused = [n for n in nodes if n.target is aten.rms_norm.default]
    assert len(fused) == 1 and fused[0].args[2] is None
    (mul,) = fused[0].users
    assert mul.target is aten.mul.Tensor
    _check_products(model, x, y)


@pytest.mark.slow  # a transformers model, traced: tens of seconds on two cores
def test_hf_llama_is_fused_and_matches_oracle():
    """zoo's hf_llama (LlamaRMSNorm in the model dtype): 2 layers × 2 norms + the final norm,
    each one aten.rms_norm with its weight and eps 1e-6; HVP and GGN-VP equal the oracles."""
    pytest.importorskip("transformers")
    model, loss_fn, inputs, targets = zoo.hf_llama()
    nodes = [n for n in capture(model, inputs).graph_module.graph.nodes if n.op == "call_function"]
    fused = [n for n in nodes if n.target is aten.rms_norm.default]
    assert len(fused) == 5
    assert all(n.args[1] == [8] and n.args[2].op == "placeholder" for n in fused)
    assert all(n.args[3] == 1e-6 for n in fused)
    assert not CHAIN & set(_targets(nodes))
    v = _vectors(model, 3)
    got = hessfast.hvp(model, loss_fn, inputs, targets, v)
    assert rel_err(got, hvp(model, loss_fn, inputs, targets, v)) < 1e-10
    got = hessfast.ggn_vp(model, loss_fn, inputs, targets, v)
    assert rel_err(got, ggn_vp(model, loss_fn, inputs, targets, v)) < 1e-10


def test_hf_rms_norm_keeps_its_casts():
    """Hugging Face's LlamaRMSNorm upcasts to float32 and casts back before the weight: the
    chain on the float32 value is fused, the casts and the weight multiply stay."""
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(6, eps=1e-5)
    norm.weight.data = 1 + 0.1 * torch.randn(6)
    model, x, y = _net(norm)
    nodes = _calls(model, x)
    (fused,) = [n for n in nodes if n.target is aten.rms_norm.default]
    up = fused.args[0]
    assert up.target is aten.to.dtype and up.args[1] == torch.float32
    assert fused.args[2] is None and fused.args[3] == 1e-5
    (down,) = [u for u in fused.users if u.target is aten.to.dtype]
    assert down.args[1] == torch.float64
    (mul,) = down.users
    assert mul.target is aten.mul.Tensor and "norm_weight" in mul.args[0].name
    # the float32 section caps the agreement with the float64 oracle
    _check_products(model, x, y, tol=1e-5)
