"""The workload as the benchmark reads it: dtypes, the built-in models and users' (from
:mod:`hessfast.bench_models`), the loss as autograd must call it, and whether the forward
calls ``F.scaled_dot_product_attention``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import losses
from ..bench_models import BUILTIN, SIZES, Workload
from ..bench_models import build as build_workload

__all__ = [
    "BUILTIN",
    "DTYPES",
    "SIZES",
    "Workload",
    "autograd_loss",
    "build_workload",
    "needs_flatten",
    "probe",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def autograd_loss(loss_fn: Callable, out_shape: tuple, targets: Any) -> Callable:
    """``loss_fn`` as hessfast reads it: cross-entropy / NLL on ``[B, T, C]`` logits with
    ``[B, T]`` targets is the mean over all tokens, ``loss_fn(z.flatten(0, -2), y.flatten())``
    (torch itself would read dim 1 as the classes); anything else is ``loss_fn(z, targets)``."""
    if needs_flatten(loss_fn, out_shape, targets):

        def flat(z, t):
            return loss_fn(z.flatten(0, -2), t.flatten())

        return flat
    return loss_fn


def needs_flatten(loss_fn: Callable, out_shape: tuple, targets: Any) -> bool:
    fn, _ = losses.identify(loss_fn)
    if fn not in (F.cross_entropy, F.nll_loss) or not isinstance(targets, torch.Tensor):
        return False
    if targets.is_floating_point() or len(out_shape) < 3:
        return False
    t = tuple(targets.shape)
    return t == tuple(out_shape[:-1]) and t != (out_shape[0], *out_shape[2:])


class _SDPASpy(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.seen = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "scaled_dot_product_attention":
            self.seen = True
        return func(*args, **(kwargs or {}))


def probe(model: nn.Module, inputs: tuple) -> tuple[tuple, bool]:
    """``(output shape, whether the forward calls F.scaled_dot_product_attention)``."""
    spy = _SDPASpy()
    with torch.no_grad(), spy:
        out = model(*inputs)
    if not isinstance(out, torch.Tensor):
        raise ValueError("the model must return one tensor (the loss input)")
    return tuple(out.shape), spy.seen
