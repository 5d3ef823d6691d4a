"""Inputs and outputs the way users hold them (issue 15.6): dict / ``UserDict`` inputs passed as
``model(**inputs)``, and models returning a dict, tuple or ``ModelOutput`` read through ``output=``
— each checked against autograd double backward in float64."""

import collections

import pytest
import torch
import torch.nn.functional as F
from oracle import rel_err

import hessfast

D = torch.float64


class Net(torch.nn.Module):
    def __init__(self, returns="tensor"):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)
        self.returns = returns

    def forward(self, x, mask=None):
        z = torch.tanh(self.lin(x))
        if mask is not None:
            z = z * mask
        if self.returns == "tuple1":
            return (z,)
        if self.returns == "dict2":
            return {"logits": z, "hidden": 2 * z}
        if self.returns == "list2":
            return [z, z.sin()]
        return z


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 4, generator=g, dtype=D)
    mask = torch.ones(6, 3, dtype=D)
    mask[0] = 0
    return x, mask, torch.randint(0, 3, (6,), generator=g)


def _v(model, k=2):
    g = torch.Generator().manual_seed(1)
    return {n: torch.randn(k, *p.shape, generator=g, dtype=D) for n, p in model.named_parameters()}


def _double_backward(model, full_loss, v):
    """``∇⟨∇L, v_i⟩`` for ``L = full_loss()``, one vector at a time."""
    ps = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    g = torch.autograd.grad(full_loss(), ps, create_graph=True)
    k = next(iter(v.values())).shape[0]
    out = {n: [] for n in names}
    for i in range(k):
        hv = torch.autograd.grad(g, ps, [v[n][i] for n in names], retain_graph=True)
        for n, h in zip(names, hv):
            out[n].append(h)
    return {n: torch.stack(t) for n, t in out.items()}


CASES = {
    # returns, loss_fn, how the loss reads the returned value in torch, output=
    "tuple-custom-indexes": ("tuple1", lambda o, t: F.cross_entropy(o[0], t), lambda o: o, None),
    "tuple-closed-form": ("tuple1", F.cross_entropy, lambda o: o[0], None),
    "dict-default-logits": ("dict2", F.cross_entropy, lambda o: o["logits"], None),
    "dict-output-key": (
        "dict2",
        lambda z, t: F.cross_entropy(z, t),
        lambda o: o["hidden"],
        "hidden",
    ),
    "list-output-index": ("list2", F.cross_entropy, lambda o: o[1], 1),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("compile", [None, "interpret"])
def test_container_outputs(case, compile):
    returns, loss_fn, read, output = CASES[case]
    torch.manual_seed(0)
    model = Net(returns).to(D)
    x, _, y = _data()
    v = _v(model)
    got = hessfast.hvp(model, loss_fn, x, y, v, output=output, compile=compile)
    want = _double_backward(model, lambda: loss_fn(read(model(x)), y), v)
    assert rel_err(got, want) < 1e-10
    g = hessfast.grad(model, loss_fn, x, y, output=output, compile=compile)
    ps = dict(model.named_parameters())
    ref = torch.autograd.grad(loss_fn(read(model(x)), y), list(ps.values()))
    assert rel_err({n: g[n][None] for n in g}, {n: r[None] for n, r in zip(ps, ref)}) < 1e-10


def test_custom_loss_over_several_outputs_must_choose():
    model = Net("dict2").to(D)
    x, _, y = _data()
    with pytest.raises(ValueError, match="pass output="):
        hessfast.hvp(model, lambda o, t: F.cross_entropy(o["logits"], t), x, y, _v(model))
    with pytest.raises(ValueError, match="output='nope'.*entries"):
        hessfast.grad(model, F.cross_entropy, x, y, output="nope")


@pytest.mark.parametrize("wrap", [dict, collections.UserDict])
def test_dict_inputs_are_keyword_arguments(wrap):
    torch.manual_seed(0)
    model = Net().to(D)
    x, mask, y = _data()
    v = _v(model)
    got = hessfast.hvp(model, F.cross_entropy, wrap(x=x, mask=mask), y, v)
    want = _double_backward(model, lambda: F.cross_entropy(model(x, mask=mask), y), v)
    assert rel_err(got, want) < 1e-10
    # the same graph, a batch whose keys come in another order
    got2 = hessfast.hvp(model, F.cross_entropy, wrap(mask=mask, x=x), y, v)
    assert rel_err(got2, want) < 1e-10


def test_operator_over_dict_batches_with_micro_batches():
    torch.manual_seed(0)
    model = Net().to(D)
    x, mask, y = _data()
    data = [({"x": x[:4], "mask": mask[:4]}, y[:4]), ({"x": x[4:], "mask": mask[4:]}, y[4:])]
    H = hessfast.HessianOperator(model, F.cross_entropy, data, max_batch_size=3)
    v = _v(model, 1)
    flat = torch.cat([t[0].reshape(-1) for t in v.values()])
    want = _double_backward(model, lambda: F.cross_entropy(model(x, mask=mask), y), v)
    want = torch.cat([t[0].reshape(-1) for t in want.values()])
    assert torch.allclose(H @ flat, want, rtol=1e-10, atol=1e-12)


def test_hugging_face_model_output_and_batch_encoding():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(
        vocab_size=13, n_positions=8, n_embd=8, n_layer=1, n_head=2, use_cache=False
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).to(D).eval()
    ids = torch.randint(0, 13, (2, 5))
    att = torch.ones(2, 5, dtype=torch.long)
    att[1, :2] = 0
    enc = transformers.BatchEncoding({"input_ids": ids, "attention_mask": att})

    def loss_fn(z, t):
        return F.cross_entropy(z.flatten(0, 1), t.flatten())

    g = torch.Generator().manual_seed(1)
    v = {
        n: torch.randn(1, *p.shape, generator=g, dtype=D)
        for n, p in model.named_parameters()
        if n.startswith("transformer.h.0.attn")
    }
    got = hessfast.hvp(
        model, loss_fn, enc, ids, v, params="transformer.h.0.attn.*", output="logits"
    )
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        ps = [p for n, p in model.named_parameters() if n in v]
        L = loss_fn(model(**enc).logits, ids)
        gr = torch.autograd.grad(L, ps, create_graph=True)
        hv = torch.autograd.grad(gr, ps, [v[n][0] for n in v])
    assert rel_err(got, {n: h[None] for n, h in zip(v, hv)}) < 1e-8
