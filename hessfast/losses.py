"""From a user's ``loss_fn`` to a loss rule: closed forms for the standard losses, autograd otherwise.

:func:`resolve` recognises ``F.cross_entropy``, ``F.nll_loss``, ``F.mse_loss``,
``F.binary_cross_entropy_with_logits``, their ``nn.Module`` forms and ``functools.partial`` of the
functions, reading every option torch has. Anything else becomes a :class:`FuncLoss`, which
differentiates ``loss_fn(z, targets)`` at the output with ``torch.func``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jvp, vmap

from .rules.bce import BCEWithLogitsLoss
from .rules.cross_entropy import CrossEntropyLoss, NLLLoss
from .rules.mse import MSELoss


class FuncLoss:
    """Any callable ``loss_fn(z, targets) -> scalar``: value, ``∇_z L`` and ``∇²_z L · ż`` by
    ``torch.func`` (``grad``, and ``jvp`` of ``grad`` vmapped over the K tangents)."""

    name = "autograd loss"

    def __init__(self, loss_fn: Callable, target: Any):
        self.loss_fn = loss_fn
        self.target = target

    def denominator(self) -> float | None:
        """Unknown for an arbitrary callable: datasets weight its batches by their length (the
        size of the targets' first axis), which is exact for a per-sample mean."""
        t = self.target
        if isinstance(t, torch.Tensor) and t.dim() > 0:
            return float(t.shape[0])
        leaves = [x for x in torch.utils._pytree.tree_leaves(t) if isinstance(x, torch.Tensor)]
        return float(leaves[0].shape[0]) if leaves and leaves[0].dim() > 0 else 1.0

    def evaluate(self, z: torch.Tensor, zdot: torch.Tensor | None, mode: str):
        def f(x):
            out = self.loss_fn(x, self.target)
            if not isinstance(out, torch.Tensor) or out.dim() != 0:
                raise ValueError(
                    "loss_fn must return a scalar tensor; got "
                    f"{getattr(out, 'shape', type(out).__name__)} (use reduction='mean' or 'sum')"
                )
            return out

        gf = grad(f)
        loss = f(z)
        g = gf(z) if mode in ("hvp", "grad") else None
        gd = None
        if zdot is not None and mode in ("hvp", "ggn"):
            gd = vmap(lambda u: jvp(gf, (z,), (u,))[1])(zdot)
        return loss, g, gd


def _reduction(kw: dict) -> str:
    if kw.get("size_average") is not None or kw.get("reduce") is not None:
        raise ValueError("size_average/reduce are deprecated in torch; pass reduction= instead")
    r = kw.get("reduction", "mean")
    if r not in ("mean", "sum"):
        raise ValueError(
            f"reduction={r!r}: a Hessian needs a scalar loss; use reduction='mean' or 'sum'"
        )
    return r


def _call_kwargs(fn: Callable, keywords: dict) -> dict:
    """Defaults of ``fn`` overridden by ``keywords`` (for ``functools.partial``)."""
    sig = inspect.signature(fn)
    kw = {
        n: p.default for n, p in sig.parameters.items() if p.default is not inspect.Parameter.empty
    }
    kw.update(keywords)
    return kw


def _from_function(fn: Callable, kw: dict, target: Any):
    if fn is F.cross_entropy:
        return CrossEntropyLoss(
            target,
            kw.get("weight"),
            kw.get("ignore_index", -100),
            _reduction(kw),
            kw.get("label_smoothing", 0.0),
        )
    if fn is F.nll_loss:
        if target.is_floating_point():
            return None
        return NLLLoss(target, kw.get("weight"), kw.get("ignore_index", -100), _reduction(kw))
    if fn is F.mse_loss:
        red = _reduction(kw)
        return MSELoss(target, red)
    if fn is F.binary_cross_entropy_with_logits:
        return BCEWithLogitsLoss(target, kw.get("weight"), _reduction(kw), kw.get("pos_weight"))
    return None


_MODULES = {
    nn.CrossEntropyLoss: F.cross_entropy,
    nn.NLLLoss: F.nll_loss,
    nn.MSELoss: F.mse_loss,
    nn.BCEWithLogitsLoss: F.binary_cross_entropy_with_logits,
}


def _identify(loss_fn: Callable) -> tuple[Callable | None, dict]:
    """``(function, keyword arguments)`` of a recognised loss, ``(None, {})`` otherwise."""
    if isinstance(loss_fn, functools.partial) and not loss_fn.args:
        if loss_fn.func in _MODULES.values():
            return loss_fn.func, _call_kwargs(loss_fn.func, loss_fn.keywords)
        return None, {}
    if isinstance(loss_fn, nn.Module):
        fn = _MODULES.get(type(loss_fn))
        if fn is None:
            return None, {}
        kw = {"reduction": loss_fn.reduction}
        for attr in ("weight", "ignore_index", "label_smoothing", "pos_weight"):
            if hasattr(loss_fn, attr):
                kw[attr] = getattr(loss_fn, attr)
        return fn, kw
    if loss_fn in _MODULES.values():
        return loss_fn, _call_kwargs(loss_fn, {})
    return None, {}


def resolve(loss_fn: Callable, target: Any, output_shape: tuple | None = None):
    """The loss rule for ``loss_fn`` and ``target``: a closed form when recognised, else
    :class:`FuncLoss`. Raises ``ValueError`` for options that cannot give a scalar loss."""
    rule = None
    fn, kw = _identify(loss_fn)
    if fn is not None and isinstance(target, torch.Tensor):
        rule = _from_function(fn, kw, target)
    if isinstance(rule, MSELoss) and tuple(target.shape) != tuple(output_shape or target.shape):
        rule = None  # broadcasting MSE: autograd follows torch's semantics
    return rule if rule is not None else FuncLoss(loss_fn, target)
