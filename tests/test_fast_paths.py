"""The caches that make a repeated product cheap, and the guards that keep them exact.

A product repeated on the same model, loss, parameters and ``v`` layout reuses what the previous
call prepared (the model's fingerprint, the trace, the parameter selection); every guarded thing
is still checked on every call. Each test changes one guarded thing between two calls and
compares the second call with the float64 double-backward oracle (or the interpreter).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import double_backward_hvp, rel_err
from torch import nn

import hessfast
from hessfast import capture

D = torch.float64
TOL = 1e-10


class Net(nn.Module):
    """A BatchNorm (training flag, running statistics), a plain tensor attribute (a constant
    export lifts) and a mutable list attribute forward reads."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 3)
        self.scale = torch.linspace(0.5, 1.5, 6, dtype=D)
        self.powers = [1.0]

    def forward(self, x):
        h = self.bn(self.fc1(x)) * self.scale
        return self.fc2(torch.tanh(h) * self.powers[0])


def _setup(seed=0):
    torch.manual_seed(seed)
    model = Net().double().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(8, 4, dtype=D)
    y = torch.randint(0, 3, (8,))
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    return model, x, y, v


def _check(model, x, y, v, loss_fn=F.cross_entropy):
    """Two products (the second a replay where the signature traced) against the oracle."""
    want = double_backward_hvp(model, loss_fn, (x,), y, {n: t[None] for n, t in v.items()})
    for _ in range(3):
        got = hessfast.hvp(model, loss_fn, x, y, v)
        assert sorted(got) == sorted(want)
        assert rel_err(got, {n: t[0] for n, t in want.items()}) < TOL


def _warm(model, x, y, v):
    for _ in range(3):
        hessfast.hvp(model, F.cross_entropy, x, y, v)


# --- the fingerprint's snapshot (capture._Snapshot) ---------------------------------------------


@pytest.fixture(params=["tags", "comparison"])
def snapshot_by(request, monkeypatch):
    """Both ways a snapshot proves nothing changed: CPython's dict modification tags, and the
    comparison of lengths, keys and entries (where the tags cannot be read)."""
    if request.param == "tags":
        if capture._dict_version is None:
            pytest.skip("dict modification tags cannot be read on this Python")
    else:
        monkeypatch.setattr(capture, "_dict_version", None)
    return request.param


def test_dict_tags_that_do_not_behave_are_not_used(monkeypatch):
    """A tag reader that does not change on a change (a future CPython, a changed torch) is
    refused at import; the snapshot then compares the dicts themselves."""
    import torch._C._dynamo.guards as guards

    monkeypatch.setattr(guards, "dict_version", lambda d: 0, raising=False)
    assert capture._dict_version_reader() is None
    monkeypatch.delattr(guards, "dict_version", raising=False)
    assert capture._dict_version_reader() is None


def test_fingerprint_is_reused_while_nothing_changes(snapshot_by):
    model, *_ = _setup()
    a = capture.fingerprint(model)
    assert capture.fingerprint(model) is a
    model.train()
    b = capture.fingerprint(model)
    assert b is not a and b != a
    model.eval()
    c = capture.fingerprint(model)
    assert c == a and c is not a  # the same state as two calls ago, found by a full walk
    assert capture.fingerprint(model) is c


def test_fingerprint_sees_each_guarded_change(snapshot_by):
    model, *_ = _setup()
    changes = [
        lambda m: m.bn.train(),
        lambda m: setattr(m.fc1, "weight", nn.Parameter(m.fc1.weight.detach().clone())),
        lambda m: m.scale.mul_(2.0),  # an in-place edit of a tensor constant: its _version
        lambda m: setattr(m, "scale", m.scale.clone()),  # rebound, equal values
        lambda m: m.powers.append(2.0),  # a mutable attribute's contents
        lambda m: m.fc2.register_forward_hook(lambda mod, i, o: o * 2),
        lambda m: m.fc1.register_forward_pre_hook(lambda mod, i: None),
        lambda m: setattr(m, "extra", 3),  # a new attribute
        lambda m: setattr(m, "fc2", nn.Linear(6, 3).double()),  # a submodule replaced
        lambda m: m.fc1.register_buffer("w2", m.fc1._parameters.pop("weight").detach()),
        lambda m: delattr(m.bn, "momentum"),  # an attribute deleted
    ]
    for change in changes:
        model, *_ = _setup()
        before = capture.fingerprint(model)
        assert capture.fingerprint(model) is before
        change(model)
        after = capture.fingerprint(model)
        assert after is not before and after != before
        assert capture.fingerprint(model) is after


def test_fingerprint_global_hook(snapshot_by):
    model, *_ = _setup()
    before = capture.fingerprint(model)
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert capture.fingerprint(model) != before
    finally:
        handle.remove()
    assert capture.fingerprint(model) == before


def test_fingerprint_equal_rebinding_is_not_a_change(snapshot_by):
    """An attribute rebound to an equal value is no proof for the snapshot; the full walk finds
    the state unchanged and returns the same object (the caches compare it by identity)."""
    model, *_ = _setup()
    model.fc1.n = 1000
    before = capture.fingerprint(model)
    model.fc1.n = int("1000")  # an equal int, another object
    assert capture.fingerprint(model) is before


def test_fingerprint_same_object_written_back_is_proven_by_comparison(snapshot_by):
    """A dict written to and then given its old entry back has a new tag but the state the
    snapshot saw: the comparison proves it (no walk) and the tags are refreshed."""
    model, *_ = _setup()
    model.fc1.n = n = 1000
    before = capture.fingerprint(model)
    model.fc1.n = 7
    model.fc1.n = n
    snap = capture._SNAPSHOTS[model]
    assert snap.unchanged(model)
    assert capture.fingerprint(model) is before
    if snapshot_by == "tags":
        assert snap.tags == tuple(map(capture._dict_version, snap.dicts))


def test_capture_cache_holds_the_current_fingerprint_object():
    """After an export (which runs forward) the fingerprint the capture cache matches is the
    model's current one, so the guard compares by identity."""
    model, x, y, v = _setup()
    hessfast.hvp(model, F.cross_entropy, x, y, v)
    fp = capture.fingerprint(model)
    prog = capture.capture(model, (x,), fp=fp)
    assert prog.fingerprint is fp


def test_snapshot_does_not_keep_the_model_alive():
    import gc
    import weakref

    model, *_ = _setup()
    capture.fingerprint(model)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


# --- products across a change of each guarded thing ---------------------------------------------


def test_replaced_parameter_object():
    model, x, y, v = _setup()
    _warm(model, x, y, v)
    model.fc1.weight = nn.Parameter(torch.randn_like(model.fc1.weight))
    _check(model, x, y, v)


def test_parameter_values_changed_in_place():
    model, x, y, v = _setup()
    _warm(model, x, y, v)
    with torch.no_grad():
        model.fc2.weight.mul_(-1.5)
    model.fc1.bias.data = torch.randn_like(model.fc1.bias)
    _check(model, x, y, v)


def test_buffer_edited_in_place():
    model, x, y, v = _setup()
    _warm(model, x, y, v)
    with torch.no_grad():
        model.bn.running_mean.add_(0.7)
        model.bn.running_var.data.mul_(3.0)  # through .data: no version bump
    _check(model, x, y, v)


def test_tensor_constant_edited_in_place():
    model, x, y, v = _setup()
    _warm(model, x, y, v)
    model.scale.mul_(-2.0)
    _check(model, x, y, v)


class ScaledNet(nn.Module):
    """A one-element tensor attribute that forward reads (a constant export bakes in)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.temperature = torch.tensor(0.3, dtype=D)

    def forward(self, x):
        return self.fc(x) * self.temperature.to(x.dtype)


def test_tensor_constant_rebound_to_an_equal_value_of_another_dtype():
    """``0.3`` in float32 equals ``0.3`` in float64 under ``==`` only up to rounding; rebinding
    a tensor constant to another dtype (or shape, or device) re-captures."""
    torch.manual_seed(0)
    model = ScaledNet().double()
    x, y = torch.randn(8, 4, dtype=D), torch.randint(0, 3, (8,))
    v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    before = capture.fingerprint(model)
    model.temperature = torch.tensor(0.3, dtype=D)  # same dtype, shape, value: no change
    assert capture.fingerprint(model) == before
    _warm(model, x, y, v)
    model.temperature = torch.tensor(0.25, dtype=torch.float32)
    assert capture.fingerprint(model) != before
    _check(model, x, y, v)
    model.temperature = torch.tensor([0.25], dtype=torch.float32)  # equal value, another shape
    fp = capture.fingerprint(model)
    model.temperature = torch.tensor(0.25, dtype=torch.float32)
    assert capture.fingerprint(model) != fp
    fp = capture.fingerprint(model)
    model.temperature = torch.tensor(0.25, dtype=D)  # equal value, another dtype
    assert capture.fingerprint(model) != fp


def test_train_eval_toggle():
    model, x, y, v = _setup()
    _warm(model, x, y, v)
    model.train()
    _check(model, x, y, v)
    model.eval()
    _check(model, x, y, v)


def test_hook_added_and_removed():
    model, x, y, v = _setup()
    _warm(model, x, y, v)
    h = model.fc1.register_forward_hook(lambda m, i, o: o * 0.5)
    _check(model, x, y, v)
    h.remove()
    _check(model, x, y, v)


def test_mutable_attribute_changed():
    model, x, y, v = _setup()
    _warm(model, x, y, v)
    model.powers[0] = 0.25
    _check(model, x, y, v)


def test_new_input_object_same_metadata():
    model, x, y, v = _setup()
    _warm(model, x, y, v)
    x2 = torch.randn_like(x)
    y2 = (y + 1) % 3
    _check(model, x2, y2, v)
    v2 = {n: torch.randn_like(t) for n, t in v.items()}
    _check(model, x2, y2, v2)


# --- the loss rule's state without pytree (traced._split_loss) ----------------------------------


def _rules():
    from hessfast import losses, lower_loss

    z = torch.randn(6, 4, dtype=D)
    y = torch.randint(0, 4, (6,))
    w = torch.rand(4, dtype=D)
    yield losses.resolve(F.cross_entropy, y, (6, 4))
    yield losses.resolve(nn.CrossEntropyLoss(weight=w, ignore_index=2, label_smoothing=0.1), y)
    yield losses.resolve(nn.NLLLoss(reduction="sum"), y, (6, 4))
    yield losses.resolve(F.mse_loss, torch.randn(6, 4, dtype=D), (6, 4))
    yield losses.resolve(nn.HuberLoss(delta=0.5), torch.randn(6, 4, dtype=D), (6, 4))
    yield losses.resolve(nn.BCEWithLogitsLoss(pos_weight=w), torch.rand(6, 4, dtype=D), (6, 4))
    yield losses.resolve(F.mse_loss, torch.randn(1, 4, dtype=D), (6, 4))  # Broadcast
    seq = lower_loss.lower(  # Reshaped: a tuple attribute
        losses.FuncLoss(lambda a, t: F.cross_entropy(a.flatten(0, 1), t.flatten()), y.view(2, 3)),
        z.view(2, 3, 4),
    )
    yield seq
    yield lower_loss.lower(losses.FuncLoss(lambda a, t: (a.sin() * t).sum(), z), z)


def test_split_loss_walk_matches_pytree():
    import warnings

    from torch.utils import _pytree as pytree

    from hessfast import traced

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the broadcasting loss warns as torch does
        rules = list(_rules())
    walked = 0
    for rule in rules:
        leaves, structure, tensors = traced._split_loss(rule)
        want, spec = pytree.tree_flatten(traced._state(rule))
        assert len(leaves) == len(want)
        assert all(a is b or a == b for a, b in zip(leaves, want)), type(rule).__name__
        assert tensors == [i for i, x in enumerate(want) if isinstance(x, torch.Tensor)]
        assert traced._spec(rule, structure) == spec
        walked += structure[0] == "walked"
        again = traced._split_loss(rule)
        assert again[1] == structure
    assert walked >= 6  # the closed-form rules (and Reshaped) take the walk


# --- inputs that change between replays ------------------------------------------------------------


def test_ignored_targets_counted_per_call():
    """Same shapes, a different number of ignored targets: the count is a graph value, never
    baked in."""
    model, x, y, v = _setup()
    loss = nn.CrossEntropyLoss(ignore_index=1)
    for _ in range(3):
        hessfast.hvp(model, loss, x, y, v)
    for k in range(4):
        y2 = y.clone()
        y2[: 2 * k] = 1
        _check(model, x, y2, v, loss)


def test_target_range_checked_on_every_replay():
    import pytest

    model, x, y, v = _setup()
    _warm(model, x, y, v)
    bad = y.clone()
    bad[3] = 3
    with pytest.raises(IndexError, match="out of bounds"):
        hessfast.hvp(model, F.cross_entropy, x, bad, v)
    _check(model, x, y, v)


def test_v_layouts_between_replays():
    """dict, flat, batched dict and batched flat v, and a non-finite v, one after the other on
    the same model: each parsed afresh."""
    import pytest

    model, x, y, v = _setup()
    _warm(model, x, y, v)
    want = double_backward_hvp(model, F.cross_entropy, (x,), y, {n: t[None] for n, t in v.items()})
    flat = torch.cat([t.flatten() for t in v.values()])
    wflat = torch.cat([t[0].flatten() for t in want.values()])
    for _ in range(2):
        got = hessfast.hvp(model, F.cross_entropy, x, y, flat)
        assert rel_err({"": got}, {"": wflat}) < TOL
        got = hessfast.hvp(model, F.cross_entropy, x, y, flat[None].expand(2, -1))
        assert got.shape == (2, flat.numel())
        assert rel_err({"": got[1]}, {"": wflat}) < TOL
        got = hessfast.hvp(model, F.cross_entropy, x, y, {n: t[None] for n, t in v.items()})
        assert rel_err({n: t[0] for n, t in got.items()}, {n: t[0] for n, t in want.items()}) < TOL
        got = hessfast.hvp(model, F.cross_entropy, x, y, v)
        assert rel_err(got, {n: t[0] for n, t in want.items()}) < TOL
    bad = dict(v)
    bad["fc1.bias"] = bad["fc1.bias"].clone()
    bad["fc1.bias"][0] = float("nan")
    with pytest.raises(ValueError, match="fc1.bias"):
        hessfast.hvp(model, F.cross_entropy, x, y, bad)
    bad_flat = flat.clone()
    bad_flat[-1] = float("inf")
    with pytest.raises(ValueError, match="fc2.bias"):
        hessfast.hvp(model, F.cross_entropy, x, y, bad_flat)
    _check(model, x, y, v)
