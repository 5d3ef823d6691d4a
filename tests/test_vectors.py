"""``hessfast.vectors``: parameter selection is ``named_parameters()``, without its generators."""

import pytest
import torch
from torch import nn

from hessfast.vectors import _named_parameters, select_params


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
