"""``hessfast.vectors``: parameter selection is ``named_parameters()``, without its generators."""

import pytest
import torch
from torch import nn

from hessfast import vectors
from hessfast.vectors import _named_parameters, first_non_finite_in, select_params


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight  # one parameter under two names
        self.shared = self.a  # one module under two names
        self.empty = None
        self.register_parameter("none", None)
        self.deep = nn.Sequential(nn.Sequential(nn.Linear(3, 2), nn.ReLU()), nn.Linear(2, 1))


class _Custom(nn.Linear):
    def named_parameters(self, *args, **kwargs):
        yield from reversed(list(super().named_parameters(*args, **kwargs)))


@pytest.mark.parametrize(
    "model",
    [_Tied(), nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)), _Custom(2, 2)],
    ids=["tied", "sequential", "custom"],
)
def test_named_parameters_as_torch(model):
    want = [(n, id(p)) for n, p in model.named_parameters()]
    assert [(n, id(p)) for n, p in _named_parameters(model)] == want


def test_select_params_skips_frozen_and_matches_patterns():
    model = _Tied()
    model.deep[1].bias.requires_grad_(False)
    names = [n for n, _ in select_params(model, None)]
    assert "deep.1.bias" not in names and "a.weight" in names and "b.weight" not in names
    assert [n for n, _ in select_params(model, "deep.0.*")] == [
        "deep.0.0.weight",
        "deep.0.0.bias",
    ]
    with pytest.raises(ValueError, match="matches no parameter"):
        select_params(model, "nope.*")
    assert torch.is_tensor(select_params(model, "a.bias")[0][1])


def test_selection_under_a_fingerprint_follows_every_change():
    """The named parameters are listed once per fingerprint: a frozen parameter, a replaced
    parameter or submodule and a new parameter all show in the next selection."""
    from hessfast.capture import fingerprint

    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))

    def selected():
        return [(n, id(p)) for n, p in select_params(model, None, fingerprint(model))]

    def want():
        return [(n, id(p)) for n, p in model.named_parameters() if p.requires_grad]

    assert selected() == want()
    model[0].bias.requires_grad_(False)  # same fingerprint: requires_grad is read every time
    assert selected() == want() and "0.bias" not in dict(selected())
    model[2].weight = nn.Parameter(torch.zeros(2, 3))
    assert selected() == want()
    model[1] = nn.Linear(3, 3)
    assert selected() == want() and "1.weight" in dict(selected())
    model[2].register_parameter("scale", nn.Parameter(torch.ones(1)))
    assert selected() == want() and "2.scale" in dict(selected())
    assert [n for n, _ in select_params(model, "2.*", fingerprint(model))] == [
        "2.weight",
        "2.bias",
        "2.scale",
    ]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_first_non_finite_names_the_tensor_among_small_and_large(bad):
    """Small tensors are summed as one, large ones alone: either way the first non-finite
    tensor is named, in order over the groups."""
    torch.manual_seed(0)
    sizes = [3, vectors.SMALL + 5, 7, 1, vectors.SMALL * 2, 0, 5]
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for where in range(len(sizes)):
            if sizes[where] == 0:
                continue
            a = {f"a{i}": torch.randn(s).to(dtype) for i, s in enumerate(sizes)}
            b = {f"b{i}": torch.randn(s).to(dtype) for i, s in enumerate(sizes)}
            assert first_non_finite_in([("v", a), ("r", b)]) is None
            b[f"b{where}"][-1] = bad
            assert first_non_finite_in([("v", a), ("r", b)]) == ("r", f"b{where}")
            a[f"a{len(sizes) - 1}"][0] = bad  # an earlier group wins
            assert first_non_finite_in([("v", a), ("r", b)]) == ("v", f"a{len(sizes) - 1}")


def test_first_non_finite_overflowing_sums_are_finite():
    """Finite entries whose sum overflows (float32, float16) are finite: asked again exactly."""
    big32 = torch.full((vectors.SMALL + 1,), 3e38)
    small16 = torch.full((10,), 60000.0, dtype=torch.float16)
    mixed = {"x": big32, "y": small16, "z": torch.tensor([1e308, 1e308], dtype=torch.float64)}
    assert first_non_finite_in([("r", mixed)]) is None
    mixed["y"][3] = float("nan")
    assert first_non_finite_in([("r", mixed)]) == ("r", "y")
