"""What a captured program must mean (docs/architecture.md §2.3), against float64 double-backward oracles.

- in-place ops on the parameter path are functionalised (``relu_``, ``silu_``, ``hardswish_``,
  ``out += identity``), never refused, never skipped;
- a tensor mutated inside ``forward`` and read later keeps its mutated value (a constant or a mask
  built in place, a parameter-dependent tensor written through a view, a buffer written and read)
  while buffers, parameters and inputs are never written;
- what autograd treats as constant gets no tangent either: ``Embedding(padding_idx=...)``,
  ``torch.no_grad()`` regions and ``.detach()``, so H and the GGN stay symmetric;
- ``Embedding(max_norm=...)`` computes on the renormalised rows without writing them back;
- the whole-model autograd fallback runs attention on SDPA's math backend;
- a captured graph is re-captured when what it specialised on changes (Python attributes, hooks,
  a submodule's settings), and the guard is cheap.
"""

from __future__ import annotations

import copy
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from oracle import dense_hessian, double_backward_hvp, rel_err
from torch import nn

import hessfast
from hessfast import capture

D = torch.float64
TOL = 1e-10


def _dense(model, loss_fn, inputs, targets, mode="hvp"):
    """hessfast's dense H (or GGN), one identity column per parameter entry."""
    p = sum(q.numel() for q in model.parameters())
    eye = torch.eye(p, dtype=D)
    fn = hessfast.hvp if mode == "hvp" else hessfast.ggn_vp
    return fn(model, loss_fn, inputs, targets, eye)


def _snapshot(model):
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def _unchanged(model, snap):
    now = dict([*model.named_parameters(), *model.named_buffers()])
    return all(torch.equal(now[n], t) for n, t in snap.items())


def _asym(h):
    return float((h - h.T).norm() / h.norm())


def _check_dense(model, loss_fn, inputs, targets):
    """H against the dense double-backward Hessian, symmetry, and no side effects."""
    model = model.double()
    snap = _snapshot(model)
    h = _dense(model, loss_fn, inputs, targets)
    assert _unchanged(model, snap), "a product changed the model's parameters or buffers"
    ref = dense_hessian(model, loss_fn, inputs, targets)
    assert float((h - ref).norm() / ref.norm()) < TOL
    assert _asym(h) < TOL
    return h


X = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), dtype=D)
Y = torch.tensor([0, 2, 1, 1, 0, 2])


# --- 1. in-place ops on the parameter path -------------------------------------------------------


class Residual(nn.Module):
    """``out += identity`` then an in-place ReLU, as torchvision's BasicBlock writes it."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        identity = x
        out = self.b(torch.tanh(self.a(x)))
        out += identity
        return self.head(F.relu(out, inplace=True))


class ConvBlock(nn.Module):
    """Conv, BatchNorm, an in-place add and an in-place ReLU (ResNet/MobileNet style)."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.act, self.head = nn.ReLU(inplace=True), nn.Linear(3, 3)

    def forward(self, x):
        out = self.bn(self.conv(x))
        out += 1.0
        return self.head(self.act(out).mean((2, 3)))


INPLACE = {
    "relu_": lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)),
    "silu_": lambda: nn.Sequential(nn.Linear(4, 8), nn.SiLU(inplace=True), nn.Linear(8, 3)),
    "hardswish_": lambda: nn.Sequential(
        nn.Linear(4, 8), nn.Hardswish(inplace=True), nn.Linear(8, 3)
    ),
    "residual-add_": Residual,
}


@pytest.mark.parametrize("name", list(INPLACE))
def test_inplace_ops_on_the_parameter_path_are_functionalised(name):
    torch.manual_seed(0)
    _check_dense(INPLACE[name](), F.cross_entropy, (X,), Y)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_inplace_ops_with_batch_norm_keep_buffers(train):
    torch.manual_seed(0)
    model = ConvBlock().train(train)
    x = torch.randn(4, 2, 5, 5, dtype=D)
    y = torch.tensor([0, 1, 2, 1])
    _check_dense(model, F.cross_entropy, (x,), y)
    # the batch-norm op stays whole (its rule, not a decomposition) after functionalisation
    prog = capture.capture(model, (x,))
    ops = {str(s.op) for s in prog.steps}
    assert "aten.batch_norm.default" in ops and not any("relu_" in o for o in ops)


def test_inplace_error_message_names_in_place():
    from hessfast.capture import Step
    from hessfast.engine import _unsupported

    node = torch.fx.Graph().create_node("call_function", torch.ops.aten.relu_.default, ())
    step = Step(node, torch.ops.aten.relu_.default, (), True, "block (ReLU)")
    msg = str(_unsupported(step, RuntimeError("boom")))
    assert "in-place" in msg and "relu()" in msg and "differentiated twice" not in msg


# --- 3. tensors mutated inside forward -----------------------------------------------------------


class ConstInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        w = torch.ones(x.shape[0], 1)
        w[0] = 0
        return torch.tanh(self.lin(x)) * w


class MaskInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x)
        m = torch.zeros_like(h)
        m[:, 1] = float("-inf")
        m[2:, :1] = -1.0
        return h + m.clamp(min=-5)


class ActiveViewWrite(nn.Module):
    """A parameter-dependent tensor written through views (``copy_`` of a select, ``mul_``)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        h = self.lin(x)
        h[:, 0] = 0.5
        h[1] *= 2
        return torch.tanh(h)


class BufferWrittenAndRead(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x):
        self.scale.mul_(2.0)
        return self.lin(x) * self.scale


MUTATED = {
    "constant": ConstInPlace,
    "mask": MaskInPlace,
    "active-view": ActiveViewWrite,
}


@pytest.mark.parametrize("name", list(MUTATED))
def test_tensor_mutated_in_forward_keeps_its_mutated_value(name):
    torch.manual_seed(0)
    model = MUTATED[name]().double()
    h = _check_dense(model, F.cross_entropy, (X,), Y)
    assert h.abs().sum() > 0
    with torch.enable_grad():
        loss = F.cross_entropy(model(X), Y)
        ref = torch.autograd.grad(loss, list(model.parameters()))
    got = hessfast.grad(model, F.cross_entropy, X, Y)
    names = [n for n, _ in model.named_parameters()]
    assert rel_err(got, dict(zip(names, ref))) < TOL


def test_buffer_written_and_read_in_forward_is_read_mutated_and_never_written():
    torch.manual_seed(0)
    model = BufferWrittenAndRead().double()
    v = {n: torch.randn(2, *p.shape, dtype=D) for n, p in model.named_parameters()}
    got = hessfast.hvp(model, F.cross_entropy, X, Y, v)
    assert torch.equal(model.scale, torch.ones(3, dtype=D))  # never written by a product
    ref_model = copy.deepcopy(model)
    ref = double_backward_hvp(ref_model, F.cross_entropy, (X,), Y, v)  # reads scale = 2
    assert rel_err(got, ref) < TOL
    assert rel_err(hessfast.hvp(model, F.cross_entropy, X, Y, v), ref) < TOL  # stays the same


def test_user_input_mutated_in_forward_is_not_written():
    class AddInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            x.mul_(2.0)
            return self.lin(x)

    model = AddInput().double()
    x = X.clone()
    got = hessfast.grad(model, F.cross_entropy, x, Y)
    assert torch.equal(x, X)
    with torch.enable_grad():
        loss = F.cross_entropy(model(X.clone()), Y)
        ref = dict(zip(["lin.weight", "lin.bias"], torch.autograd.grad(loss, model.parameters())))
    assert rel_err(got, ref) < TOL


# --- 2, 6. constants on both sides: padding rows, no_grad, detach --------------------------------


class Emb(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.e = nn.Embedding(7, 4, **kw)
        self.h = nn.Linear(4, 3)

    def forward(self, i):
        return self.h(torch.tanh(self.e(i)).mean(1))


IDX = torch.tensor([[0, 1, 2], [3, 0, 0], [4, 5, 1]])
YE = torch.tensor([0, 2, 1])


def test_embedding_padding_row_is_constant_on_both_sides():
    torch.manual_seed(0)
    model = Emb(padding_idx=0)
    h = _check_dense(model, F.cross_entropy, (IDX,), YE)
    pad = slice(0, 4)  # e.weight[0] is the first four entries of the flat vector
    assert h[pad].abs().max() == 0 and h[:, pad].abs().max() == 0
    g = _dense(model, F.cross_entropy, (IDX,), YE, mode="ggn")
    assert g[pad].abs().max() == 0 and g[:, pad].abs().max() == 0
    assert _asym(g) < TOL
    # the GGN against Jᵀ H_L J with J by reverse mode (which treats the row as torch does)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    names = [(n, p.shape, p.numel()) for n, p in model.named_parameters()]

    def out(t):
        ps, off = {}, 0
        for n, shape, k in names:
            ps[n] = t[off : off + k].view(shape)
            off += k
        return torch.func.functional_call(model, ps, (IDX,)).reshape(-1)

    jac = torch.autograd.functional.jacobian(out, theta)
    z = out(theta).detach()
    hl = torch.autograd.functional.hessian(lambda z: F.cross_entropy(z.view(len(YE), -1), YE), z)
    ref = jac.T @ hl @ jac
    assert float((g - ref).norm() / ref.norm()) < TOL


class NoGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        with torch.no_grad():
            c = self.b(h)
        return self.b(h) * c


class Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h) * self.b(h).detach()


class NoGradInPlace(nn.Module):
    """A no-grad region that also mutates (functionalisation inlines it: still constant)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        with torch.no_grad():
            c = self.b(h)
            c.relu_()
        return self.b(h) * (c + 1)


@pytest.mark.parametrize("cls", [NoGrad, Detached, NoGradInPlace])
def test_no_grad_and_detach_in_forward_are_constant_on_both_sides(cls):
    torch.manual_seed(0)
    model = cls().double()
    _check_dense(model, F.cross_entropy, (X,), Y)
    u = {n: torch.randn(1, *p.shape, dtype=D) for n, p in model.named_parameters()}
    w = {n: torch.randn(1, *p.shape, dtype=D) for n, p in model.named_parameters()}
    hu = hessfast.hvp(model, F.cross_entropy, X, Y, u)
    hw = hessfast.hvp(model, F.cross_entropy, X, Y, w)
    a = sum(float((u[n] * hw[n]).sum()) for n in u)
    b = sum(float((hu[n] * w[n]).sum()) for n in u)
    assert abs(a - b) < 1e-10 * max(1.0, abs(a))


def test_no_grad_region_is_inactive_in_the_plan():
    model = NoGrad().double()
    prog = capture.capture(model, (X,))
    plan = prog.plan(frozenset(n for n, _ in model.named_parameters()))
    hop = [s for s in prog.steps if capture._grad_disabled_region(s.node)]
    assert hop and not any(plan[s.node.name] for s in hop)


# --- 7. Embedding(max_norm=...) -----------------------------------------------------------------


def test_embedding_max_norm_uses_renormalised_rows_without_writing_them():
    torch.manual_seed(0)
    model = Emb(max_norm=0.5).double()
    with torch.no_grad():
        model.e.weight.mul_(3)
    w0 = model.e.weight.detach().clone()
    ref = copy.deepcopy(model)
    ref(IDX)  # torch renormalises the looked-up rows of ref's weight in place
    v = {n: torch.randn(3, *p.shape, dtype=D) for n, p in model.named_parameters()}
    got = hessfast.hvp(model, F.cross_entropy, IDX, YE, v)
    assert torch.equal(model.e.weight, w0), "the weight was renormalised in place"
    assert rel_err(got, double_backward_hvp(ref, F.cross_entropy, (IDX,), YE, v)) < TOL
    g = hessfast.grad(model, F.cross_entropy, IDX, YE)
    with torch.enable_grad():
        gr = torch.autograd.grad(F.cross_entropy(ref(IDX), YE), list(ref.parameters()))
    assert rel_err(g, dict(zip([n for n, _ in ref.named_parameters()], gr))) < TOL


# --- 4. the whole-model fallback on attention ---------------------------------------------------


class BranchyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(4, 12), nn.Linear(4, 3)

    def forward(self, x):
        if x.sum() > 0:  # a data-dependent Python branch: export refuses the model
            x = x * 2
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).unflatten(-1, (3, 1, 4)).unbind(-3))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(a.transpose(1, 2).flatten(-2))


def test_fallback_runs_attention_on_the_math_backend():
    torch.manual_seed(0)
    model = BranchyAttention().double()
    x = torch.randn(2, 5, 4, dtype=D)
    y = torch.randint(0, 3, (2, 5))
    v = {n: torch.randn(2, *p.shape, dtype=D) for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = hessfast.hvp(model, F.cross_entropy, x, y, v)
        gg = hessfast.ggn_vp(model, F.cross_entropy, x, y, v)
    assert rel_err(got, double_backward_hvp(model, F.cross_entropy, (x,), y, v)) < TOL
    assert all(t.shape == v[n].shape for n, t in gg.items())


# --- 5. the guard: stale captured graphs ---------------------------------------------------------


class Tempered(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.act = nn.Linear(4, 3), nn.GELU()
        self.temperature, self.squash = 1.0, False

    def forward(self, x):
        h = self.act(self.lin(x)) / self.temperature
        return torch.tanh(h) if self.squash else h


def _change_temperature(m):
    m.temperature = 3.0


def _change_flag(m):
    m.squash = True


def _add_hook(m):
    m.lin.register_forward_hook(lambda mod, args, out: out * 2)


def _add_pre_hook(m):
    m.lin.register_forward_pre_hook(lambda mod, args: (args[0] + 1,))


def _change_gelu(m):
    m.act.approximate = "tanh"


def _replace_submodule(m):
    m.act = nn.Tanh()


def _eval_mode(m):
    m.act.train(False)


@pytest.mark.parametrize(
    "change",
    [
        _change_temperature,
        _change_flag,
        _add_hook,
        _add_pre_hook,
        _change_gelu,
        _replace_submodule,
        _eval_mode,
    ],
)
def test_changed_model_is_recaptured(change):
    torch.manual_seed(0)
    model = Tempered().double()
    v = {n: torch.randn(2, *p.shape, dtype=D) for n, p in model.named_parameters()}
    hessfast.hvp(model, F.cross_entropy, X, Y, v)
    n0 = capture.EXPORT_COUNT
    hessfast.hvp(model, F.cross_entropy, X, Y, v)
    assert capture.EXPORT_COUNT == n0  # unchanged: replayed
    change(model)
    got = hessfast.hvp(model, F.cross_entropy, X, Y, v)
    assert capture.EXPORT_COUNT == n0 + 1
    assert rel_err(got, double_backward_hvp(model, F.cross_entropy, (X,), Y, v)) < TOL
    hessfast.hvp(model, F.cross_entropy, X, Y, v)
    assert capture.EXPORT_COUNT == n0 + 1


def test_global_forward_hook_is_guarded():
    model = Tempered().double()
    v = {n: torch.randn(1, *p.shape, dtype=D) for n, p in model.named_parameters()}
    hessfast.hvp(model, F.cross_entropy, X, Y, v)
    handle = nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: out + 1 if mod is model.lin else None
    )
    try:
        got = hessfast.hvp(model, F.cross_entropy, X, Y, v)
        ref = double_backward_hvp(model, F.cross_entropy, (X,), Y, v)
    finally:
        handle.remove()
    assert rel_err(got, ref) < TOL


def test_attribute_mutated_in_place_is_guarded():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.scales = [1.0, 1.0, 1.0]

        def forward(self, x):
            return self.lin(x) * torch.tensor(self.scales, dtype=x.dtype)

    model = Scaled().double()
    v = {n: torch.randn(1, *p.shape, dtype=D) for n, p in model.named_parameters()}
    hessfast.hvp(model, F.cross_entropy, X, Y, v)
    model.scales[1] = 4.0
    got = hessfast.hvp(model, F.cross_entropy, X, Y, v)
    assert rel_err(got, double_backward_hvp(model, F.cross_entropy, (X,), Y, v)) < TOL


def test_guard_is_cheap():
    layers = []
    for _ in range(20):
        layers += [nn.Linear(16, 16), nn.LayerNorm(16), nn.GELU()]
    model = nn.Sequential(*layers)
    ref = capture.fingerprint(model)
    n = 200
    t0 = time.process_time()
    for _ in range(n):
        assert capture.fingerprint(model) == ref
    per = (time.process_time() - t0) / n
    # about 0.15 ms of CPU on a loaded 2-core box; generous bound against noisy machines
    assert per < 2e-3


def test_generator_made_in_forward_runs_the_autograd_fallback_with_the_reason():
    """Issue 15.6: a torch.Generator created inside forward (lifted by export into a graph
    input) is computed by whole-loss double backward, with a warning that says why, exactly."""
    import warnings

    from oracle import double_backward_hvp, rel_err

    class Noisy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            g = torch.Generator().manual_seed(0)
            return self.lin(torch.tanh(x + 0.1 * torch.randn(x.shape, generator=g, dtype=x.dtype)))

    torch.manual_seed(0)
    m = Noisy().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    v = {n: torch.randn(2, *p.shape, dtype=torch.float64) for n, p in m.named_parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = hessfast.hvp(m, F.cross_entropy, x, y, v)
    assert any("Generator" in str(w.message) for w in caught)
    assert rel_err(got, double_backward_hvp(m, F.cross_entropy, (x,), y, v)) < 1e-10
    with pytest.raises(hessfast.CaptureError, match="Generator"):
        hessfast.hvp(m, F.cross_entropy, x, y, v, strict=True)
