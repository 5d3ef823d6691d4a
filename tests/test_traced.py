"""Traced products (hessfast/traced.py): the replayed graph equals the interpreter and the oracles,
is reused only where it is valid, and never bakes a data value in."""

import functools

import pytest
import torch
import torch.nn.functional as F
from models import zoo
from oracle import double_backward_hvp, ggn_vp, rel_err

import hessfast
from hessfast import capture, traced

MODELS = list(zoo.MODELS)


def _vectors(model, k, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(k, *p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()
    }


def _traces(model, inputs):
    """What :func:`traced.explain` says of the program captured for ``model`` at ``inputs``."""
    return traced.explain(capture.capture(model, tuple(inputs)))


@pytest.mark.parametrize("name", zoo.params(MODELS))
def test_traced_equals_interpreter_on_the_zoo(name, zoo_problem):
    if name.startswith("hf_"):
        pytest.importorskip("transformers")
    model, loss_fn, inputs, targets = zoo_problem(name)
    v = _vectors(model, 2)
    for fn in (hessfast.hvp, hessfast.ggn_vp):
        got = fn(model, loss_fn, inputs, targets, v)
        ref = fn(model, loss_fn, inputs, targets, v, compile="interpret")
        assert rel_err(got, ref) < 1e-10
    g = hessfast.grad(model, loss_fn, inputs, targets)
    g_ref = hessfast.grad(model, loss_fn, inputs, targets, compile="interpret")
    assert rel_err(g, g_ref) < 1e-10
    # every product of the zoo is traced: none silently runs the interpreter
    assert {(t["mode"], t["traced"]) for t in _traces(model, inputs)} == {
        ("hvp", True),
        ("ggn", True),
        ("grad", True),
    }


def _sequence_model():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(7, 5)
    return torch.nn.Sequential(emb, torch.nn.Tanh(), torch.nn.Linear(5, 7)).double()


def test_one_graph_serves_batches_with_different_ignored_counts():
    """The mean's denominator (tokens not ignored) is a tensor in the graph, not a constant."""
    model = _sequence_model()
    loss_fn = functools.partial(F.cross_entropy, ignore_index=-100)
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randint(0, 7, (2, 6), generator=g), torch.randint(0, 7, (2, 6), generator=g)
    y1, y2 = torch.randint(0, 7, (2, 6), generator=g), torch.randint(0, 7, (2, 6), generator=g)
    y1[0, :1] = -100
    y2[:, :4] = -100  # 4 of 12 counted instead of 11
    v = _vectors(model, 2)
    hessfast.hvp(model, loss_fn, x1, y1, v)
    before = traced.TRACE_COUNT
    got = hessfast.hvp(model, loss_fn, x2, y2, v)
    assert traced.TRACE_COUNT == before  # replayed, not retraced
    assert rel_err(got, double_backward_hvp(model, loss_fn, (x2,), y2, v)) < 1e-10
    gv = hessfast.ggn_vp(model, loss_fn, x1, y1, v)
    gv2 = hessfast.ggn_vp(model, loss_fn, x2, y2, v)
    assert rel_err(gv, ggn_vp(model, loss_fn, (x1,), y1, v)) < 1e-10
    assert rel_err(gv2, ggn_vp(model, loss_fn, (x2,), y2, v)) < 1e-10


def test_new_parameter_values_and_inputs_are_graph_inputs():
    model, loss_fn, (x,), y = zoo.mlp()
    v = _vectors(model, 1)
    hessfast.hvp(model, loss_fn, x, y, v)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    x2 = torch.randn_like(x)
    before = traced.TRACE_COUNT
    got = hessfast.hvp(model, loss_fn, x2, y, v)
    assert traced.TRACE_COUNT == before
    assert rel_err(got, double_backward_hvp(model, loss_fn, (x2,), y, v)) < 1e-10


def test_signature_changes_retrace():
    model, loss_fn, (x,), y = zoo.mlp()
    hessfast.hvp(model, loss_fn, x, y, _vectors(model, 1))
    n = traced.TRACE_COUNT
    hessfast.hvp(model, loss_fn, x, y, _vectors(model, 3))  # another K
    sub = {n: t for n, t in _vectors(model, 1).items() if n.startswith("0.")}
    hessfast.hvp(model, loss_fn, x, y, sub, params="0.*")  # another subset
    hessfast.hvp(
        model, F.mse_loss, x, torch.randn(x.shape[0], 4, dtype=x.dtype), _vectors(model, 1)
    )
    hessfast.hvp(model, loss_fn, x[:3], y[:3], _vectors(model, 1))  # another shape
    assert traced.TRACE_COUNT == n + 4
    hessfast.hvp(model, loss_fn, x, y, _vectors(model, 3))
    assert traced.TRACE_COUNT == n + 4


def test_host_read_in_a_loss_runs_the_interpreter_with_the_reason():
    """A loss that branches on a data value can be neither recorded on meta tensors nor traced
    on fake tensors: the product is interpreted (exact), nothing is traced, and
    ``compile='inductor'`` refuses with the reason."""
    model, _, (x,), y = zoo.mlp()

    def loss_fn(z, t):
        scale = 2.0 if bool((t == 0).any()) else 1.0
        return scale * F.cross_entropy(z, t)

    v = _vectors(model, 2)
    got = hessfast.hvp(model, loss_fn, x, y, v)
    assert rel_err(got, double_backward_hvp(model, loss_fn, (x,), y, v)) < 1e-10
    assert not [t for t in _traces(model, (x,)) if t["traced"]]
    with pytest.raises(RuntimeError, match="cannot be recorded"):
        hessfast.hvp(model, loss_fn, x, y, v, compile="inductor")


def test_custom_callable_loss_is_traced_with_its_targets_as_inputs():
    model, _, (x,), y = zoo.mlp()

    def loss_fn(z, t):
        return F.cross_entropy(z, t) + 0.1 * (z**2).mean()

    v = _vectors(model, 2)
    hessfast.hvp(model, loss_fn, x, y, v)
    y2 = torch.roll(y, 1)
    got = hessfast.hvp(model, loss_fn, x, y2, v)
    assert rel_err(got, double_backward_hvp(model, loss_fn, (x,), y2, v)) < 1e-10
    assert all(t["traced"] for t in _traces(model, (x,)))


def test_compile_argument_is_checked():
    model, loss_fn, (x,), y = zoo.mlp()
    with pytest.raises(ValueError, match="compile='jit'"):
        hessfast.grad(model, loss_fn, x, y, compile="jit")
    with pytest.raises(ValueError, match="CUDA device"):
        hessfast.grad(model, loss_fn, x, y, compile="cudagraphs")


@pytest.mark.slow  # compiles the graphs with Inductor
def test_inductor_equals_interpreter(monkeypatch):
    """A small MLP and a small conv net with eval-mode BatchNorm through Inductor, compiled with
    :data:`traced.INDUCTOR_OPTIONS` (compiling costs tens of seconds on the CPU)."""
    options = []
    compile_ = torch.compile

    def spy(*args, **kwargs):
        options.append(kwargs.get("options"))
        return compile_(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    torch.manual_seed(0)
    nn = torch.nn
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    conv = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 2)
    ).double()
    conv[1].running_mean.uniform_(-1, 1)
    conv[1].running_var.uniform_(0.5, 2)
    conv.eval()
    y = torch.tensor([0, 1, 1, 0, 1])
    for model, x in ((mlp, torch.randn(5, 3)), (conv, torch.randn(5, 2, 4, 4))):
        x = x.double()
        v = _vectors(model, 2)
        got = hessfast.hvp(model, F.cross_entropy, x, y, v, compile="inductor")
        ref = hessfast.hvp(model, F.cross_entropy, x, y, v, compile="interpret")
        assert rel_err(got, ref) < 1e-10
        [info] = [t for t in _traces(model, (x,)) if t["compile"] == "inductor"]
        assert info["compile_seconds"] > 0 and info["calls"] == 1
    assert options == [traced.INDUCTOR_OPTIONS] * 2


def test_operators_take_compile():
    model, loss_fn, (x,), y = zoo.mlp()
    data = [(x[:6], y[:6]), (x[6:], y[6:])]
    P = sum(p.numel() for p in model.parameters())
    V = torch.randn(P, 3, dtype=torch.float64)
    a = hessfast.HessianOperator(model, loss_fn, data) @ V
    b = hessfast.HessianOperator(model, loss_fn, data, compile="interpret") @ V
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="compile="):
        hessfast.GGNOperator(model, loss_fn, data, compile="fast")


def test_broadcast_loss_targets_are_graph_inputs():
    """A loss rule inside another (MSE with broadcasting targets) keeps its targets as graph
    inputs: a second batch replays the graph and gets its own answer."""
    model, _, (x,), _ = zoo.mlp()
    v = _vectors(model, 1)
    t1 = torch.randn(x.shape[0], 1, dtype=x.dtype)
    t2 = torch.randn(x.shape[0], 1, dtype=x.dtype)
    with pytest.warns(UserWarning, match="target size"):
        hessfast.hvp(model, F.mse_loss, x, t1, v)
    before = traced.TRACE_COUNT
    with pytest.warns(UserWarning, match="target size"):
        got = hessfast.hvp(model, F.mse_loss, x, t2, v)
    assert traced.TRACE_COUNT == before
    assert rel_err(got, double_backward_hvp(model, F.mse_loss, (x,), t2, v)) < 1e-10


def test_trace_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(traced, "MAX_TRACES", 2)
    model, loss_fn, (x,), y = zoo.mlp()
    for k in (1, 2, 3):
        hessfast.hvp(model, loss_fn, x, y, _vectors(model, k))
    assert len(_traces(model, (x,))) == 2


def test_a_signature_is_traced_on_its_second_product_by_default(monkeypatch):
    monkeypatch.setattr(traced, "TRACE_AFTER", 1)
    model, loss_fn, (x,), y = zoo.mlp()
    v = _vectors(model, 2)
    before = traced.TRACE_COUNT
    first = hessfast.hvp(model, loss_fn, x, y, v)
    assert traced.TRACE_COUNT == before and _traces(model, (x,)) == []  # interpreted
    second = hessfast.hvp(model, loss_fn, x, y, v)
    assert traced.TRACE_COUNT == before + 1
    third = hessfast.hvp(model, loss_fn, x, y, v)
    [info] = _traces(model, (x,))
    assert info["traced"] and info["calls"] == 2
    assert rel_err(first, second) < 1e-12 and rel_err(second, third) < 1e-12


def test_direct_calls_equal_the_graph_module(zoo_problem):
    """The replayed code calls every op through its C++ entry point and gives the graph
    module's results bitwise (on the GPT the zoo test above traces too: K = 2, its signature)."""
    model, loss_fn, inputs, targets = zoo_problem("gpt")
    v = _vectors(model, 2)
    for _ in range(2):
        hessfast.hvp(model, loss_fn, inputs, targets, v)
    prog = capture.capture(model, tuple(inputs))
    found = [t for t in prog.__dict__["_traces"].values() if getattr(t, "fn", None)]
    assert found
    for trace in found:
        assert isinstance(trace.fn, traced.Direct)
        assert "torch.ops." not in trace.fn.code and "_hessfast_op" in trace.fn.code
    seen = []

    def spy(real):
        def run(*args):
            seen.append((real, args))
            return real(*args)

        return run

    reals = [trace.fn for trace in found]
    for trace, real in zip(found, reals):
        trace.fn = spy(real)
    try:
        hessfast.hvp(model, loss_fn, inputs, targets, v)
    finally:
        for trace, real in zip(found, reals):
            trace.fn = real
    [(real, args)] = seen  # the HVP's one replay
    for a, b in zip(real(*args), real.gm(*args)):
        assert (a is None and b is None) or torch.equal(a, b)


def test_hvp_without_the_gradient_prunes_its_graph_and_agrees_with_double_backward():
    """An HVP whose caller does not read the gradient is its own trace, without the parameters'
    primal cotangents (fewer nodes) and with BatchNorm's backward asked for the input cotangent
    only; its result still equals double backward, and the HVP that returns the gradient too
    keeps both outputs right."""
    model, loss_fn, inputs, targets = zoo.cnn_bn()
    v = _vectors(model, 2)
    for _ in range(2):  # interpreted, then traced and checked against the interpreter
        hv = hessfast.hvp(model, loss_fn, *inputs, targets, v)
        hv2, g = hessfast.hvp(model, loss_fn, *inputs, targets, v, return_grad=True)
    want = double_backward_hvp(model, loss_fn, inputs, targets, v)
    assert rel_err(hv, want) < 1e-10 and rel_err(hv2, want) < 1e-10
    g_ref = hessfast.grad(model, loss_fn, *inputs, targets, compile="interpret")
    assert rel_err(g, g_ref) < 1e-12
    prog = capture.capture(model, tuple(inputs))
    info = {t["grads"]: t for t in traced.explain(prog) if t["mode"] == "hvp"}
    assert info[False]["traced"] and info[True]["traced"]
    assert info[False]["nodes"] < info[True]["nodes"]
    lean = next(t for t in traced.traces(prog) if t.layout[0] is None)
    masks = [
        list(n.args[-1])
        for n in lean.fn.graph.nodes
        if n.target is torch.ops.aten.native_batch_norm_backward.default
    ]
    assert masks and all(m[1:] == [False, False] for m in masks)


def test_a_replay_reads_the_parameters_as_they_are_and_records_no_autograd_graph(monkeypatch):
    """Replays run on the parameters themselves (not detached copies) under no_grad: the results
    hold no autograd graph, also for inputs that require grad, and a later in-place update of
    the parameters is read by the next replay."""
    monkeypatch.setattr(traced, "TRACE_AFTER", 1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model = model.double()
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 3, (6,))
    v = _vectors(model, 2)
    for _ in range(3):
        hv, g = hessfast.hvp(model, F.cross_entropy, x, y, v, return_grad=True)
    assert [t["calls"] for t in _traces(model, (x,))] == [2]
    assert not any(t.requires_grad or t.grad_fn is not None for t in [*hv.values(), *g.values()])
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    got, _ = hessfast.hvp(model, F.cross_entropy, x, y, v, return_grad=True)
    assert rel_err(got, double_backward_hvp(model, F.cross_entropy, (x.detach(),), y, v)) < 1e-10
    assert [t["calls"] for t in _traces(model, (x,))] == [3]  # a replay
