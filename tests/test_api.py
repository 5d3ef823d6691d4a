"""The public API's contract: structures of v, parameter subsets, caching, and bad input."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from models import zoo
from oracle import hvp as oracle_hvp
from oracle import rel_err
from torch import nn

import hessfast
from hessfast import capture

D = torch.float64


def _mlp():
    return zoo.mlp()


def test_flat_and_dict_vectors_agree():
    m, lf, x, y = _mlp()
    names = [n for n, _ in m.named_parameters()]
    flat = torch.randn(sum(p.numel() for p in m.parameters()), dtype=D)
    d, off = {}, 0
    for n, p in m.named_parameters():
        d[n] = flat[off : off + p.numel()].view_as(p)
        off += p.numel()
    hd = hessfast.hvp(m, lf, x, y, d)
    hf = hessfast.hvp(m, lf, x, y, flat)
    assert list(hd) == names
    assert hf.shape == flat.shape
    torch.testing.assert_close(hf, torch.cat([hd[n].flatten() for n in names]))


def test_k_axis_is_kept_in_every_layout():
    m, lf, x, y = _mlp()
    P = sum(p.numel() for p in m.parameters())
    assert hessfast.hvp(m, lf, x, y, torch.randn(4, P, dtype=D)).shape == (4, P)
    d = {n: torch.randn(2, *p.shape, dtype=D) for n, p in m.named_parameters()}
    out = hessfast.ggn_vp(m, lf, x, y, d)
    assert all(out[n].shape == d[n].shape for n in d)


def test_return_grad_gives_gradient_in_v_structure():
    m, lf, x, y = _mlp()
    v = {n: torch.randn(3, *p.shape, dtype=D) for n, p in m.named_parameters()}
    hv, g = hessfast.hvp(m, lf, x, y, v, return_grad=True)
    ref = hessfast.grad(m, lf, x, y)
    assert all(g[n].shape == p.shape for n, p in m.named_parameters())
    for n in ref:
        torch.testing.assert_close(g[n], ref[n])
    flat_g = hessfast.grad(m, lf, x, y, flat=True)
    assert flat_g.shape == (sum(p.numel() for p in m.parameters()),)


def test_params_subset_with_glob_is_the_diagonal_block():
    m, lf, x, y = zoo.gpt()
    sub = [n for n, _ in m.named_parameters() if n.startswith("blocks.1.")]
    v = {n: torch.randn(2, *m.get_parameter(n).shape, dtype=D) for n in sub}
    got = hessfast.hvp(m, lf, x, y, v, params="blocks.1.*")
    assert list(got) == sub
    assert rel_err(got, oracle_hvp(m, lf, x, y, v)) < 1e-10


def test_params_list_of_names_and_requires_grad_default():
    m, lf, x, y = _mlp()
    m[0].weight.requires_grad_(False)
    v = {n: torch.randn_like(p) for n, p in m.named_parameters() if p.requires_grad}
    out = hessfast.hvp(m, lf, x, y, v)
    assert "0.weight" not in out
    out2 = hessfast.hvp(m, lf, x, y, {"4.bias": v["4.bias"]}, params=["4.bias"])
    assert list(out2) == ["4.bias"]


def test_unmatched_pattern_is_an_error():
    m, lf, x, y = _mlp()
    with pytest.raises(ValueError, match="matches no parameter"):
        hessfast.hvp(m, lf, x, y, {}, params="nope.*")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda v: v.pop("0.weight"), "missing .*0.weight"),
        (lambda v: v.update(extra=torch.zeros(1, dtype=D)), "unexpected .*extra"),
        (lambda v: v.update({"0.bias": torch.zeros(5, dtype=D)}), "0.bias.*shape"),
        (lambda v: v.update({"0.bias": torch.zeros(8, dtype=torch.float32)}), "0.bias.*dtype"),
        (lambda v: v.update({"0.bias": torch.full((8,), float("nan"), dtype=D)}), "0.bias.*NaN"),
        (lambda v: v.update({"0.bias": torch.zeros(2, 8, dtype=D)}), "0.bias.*leading K"),
    ],
)
def test_bad_vectors_raise_value_error_naming_the_parameter(mutate, match):
    m, lf, x, y = _mlp()
    v = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    mutate(v)
    with pytest.raises(ValueError, match=match):
        hessfast.hvp(m, lf, x, y, v)


def test_bad_flat_vector_length():
    m, lf, x, y = _mlp()
    with pytest.raises(ValueError, match="P="):
        hessfast.hvp(m, lf, x, y, torch.zeros(3, dtype=D))


def test_second_call_does_not_reexport():
    m, lf, x, y = _mlp()
    v = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    hessfast.hvp(m, lf, x, y, v)
    before = capture.EXPORT_COUNT
    x2, y2 = torch.randn_like(x[0]), torch.randint(0, 4, y.shape)
    hessfast.hvp(m, lf, (x2,), y2, v)
    hessfast.grad(m, lf, (x2,), y2)
    assert capture.EXPORT_COUNT == before
    hessfast.hvp(m, lf, (torch.randn(3, 6, dtype=D),), y2[:3], v)  # new shape: one export
    assert capture.EXPORT_COUNT == before + 1


def test_replacing_a_submodule_recaptures():
    m, lf, x, y = _mlp()
    v = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    hessfast.hvp(m, lf, x, y, v)
    m[3] = nn.Sequential(nn.Tanh())  # was GELU: a stale graph would differentiate GELU
    v = {n: torch.randn(1, *p.shape, dtype=D) for n, p in m.named_parameters()}
    got = hessfast.hvp(m, lf, x, y, v)
    assert rel_err(got, oracle_hvp(m, lf, x, y, v)) < 1e-10


def test_new_data_gives_new_answer_with_cached_program():
    m, lf, x, y = _mlp()
    v = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    hessfast.hvp(m, lf, x, y, v)
    x2 = (torch.randn_like(x[0]),)
    got = hessfast.hvp(m, lf, x2, y, {n: t[None] for n, t in v.items()})
    assert rel_err(got, oracle_hvp(m, lf, x2, y, {n: t[None] for n, t in v.items()})) < 1e-10


def test_dropout_in_training_mode_is_refused():
    m = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2), nn.Linear(4, 2)).to(D).train()
    x, y = torch.randn(3, 4, dtype=D), torch.tensor([0, 1, 0])
    v = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    with pytest.raises(hessfast.DropoutError, match=r"model\.eval\(\)"):
        hessfast.hvp(m, F.cross_entropy, x, y, v)
    m.eval()
    hessfast.hvp(m, F.cross_entropy, x, y, v)  # fine in eval mode


def test_non_finite_result_is_an_error_unless_opted_out():
    m, lf, x, y = _mlp()
    x = (x[0].clone(),)
    x[0][0, 0] = float("inf")
    v = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    with pytest.raises(hessfast.NonFiniteError, match="check_finite=False"):
        hessfast.hvp(m, lf, x, y, v)
    out = hessfast.hvp(m, lf, x, y, v, check_finite=False)
    assert not all(torch.isfinite(t).all() for t in out.values())


@torch.library.custom_op("hessfast_test::opaque_sin", mutates_args=())
def opaque_sin(x: torch.Tensor) -> torch.Tensor:
    """A custom kernel with no autograd formula: export keeps it whole, nothing differentiates it."""
    return x.sin()


@opaque_sin.register_fake
def _(x):
    return torch.empty_like(x)


class Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return opaque_sin(self.lin(x))


def test_capture_failure_falls_back_to_autograd_with_warning():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: export cannot capture it
                return self.lin(x)
            return -self.lin(x)

    m = Dynamic().to(D)
    x, y = torch.rand(4, 3, dtype=D), torch.tensor([0, 1, 1, 0])
    v = {n: torch.randn(2, *p.shape, dtype=D) for n, p in m.named_parameters()}
    with pytest.warns(UserWarning, match="could not capture"):
        got = hessfast.hvp(m, F.cross_entropy, x, y, v)
    assert rel_err(got, oracle_hvp(m, F.cross_entropy, (x,), y, v)) < 1e-10
    with pytest.raises(hessfast.CaptureError):
        hessfast.hvp(m, F.cross_entropy, x, y, v, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = hessfast.ggn_vp(m, F.cross_entropy, x, y, v)
    from oracle import ggn_vp

    assert rel_err(g, ggn_vp(m, F.cross_entropy, (x,), y, v)) < 1e-10


def test_op_that_cannot_be_differentiated_twice_names_op_and_module():
    m = Opaque().to(D)
    x = torch.randn(2, 3, dtype=D)
    v = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    with pytest.raises(hessfast.UnsupportedOpError, match="opaque_sin.*<model> \\(Opaque\\)"):
        hessfast.hvp(m, F.mse_loss, x, torch.zeros(2, 3, dtype=D), v)


def test_buffers_and_parameters_unchanged():
    m, lf, x, y = zoo.cnn_bn(train=True)
    before = {k: t.clone() for k, t in m.state_dict().items()}
    v = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    hessfast.hvp(m, lf, x, y, v)
    hessfast.ggn_vp(m, lf, x, y, v)
    hessfast.grad(m, lf, x, y)
    for k, t in m.state_dict().items():
        assert torch.equal(t, before[k]), k


def test_model_with_several_outputs_is_a_clear_error():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x), x

    m = Two().to(D)
    v = {n: torch.randn_like(p) for n, p in m.named_parameters()}
    with pytest.raises(ValueError, match="pass output="):
        hessfast.hvp(m, F.mse_loss, torch.randn(2, 3, dtype=D), torch.zeros(2, 2, dtype=D), v)
