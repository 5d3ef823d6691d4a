"""From a user's ``loss_fn`` to a loss rule: closed forms for the standard losses, autograd otherwise.

:func:`resolve` recognises ``F.cross_entropy``, ``F.nll_loss``, ``F.mse_loss``,
``F.huber_loss``, ``F.smooth_l1_loss``, ``F.binary_cross_entropy_with_logits``, their ``nn.Module``
forms and ``functools.partial`` of the functions, reading every option torch has. Anything else
becomes a :class:`FuncLoss`, which differentiates ``loss_fn(z, targets)`` at the output with
``torch.func`` (or autograd double backward where ``torch.func`` cannot).

Bad input is refused here, once per product and outside the engine: a loss class instead of an
instance, an empty batch, class-index targets of the wrong dtype, shape or range
(:func:`validate_targets`). :func:`probe_reduction` finds whether a custom callable sums or
averages over a batch, which the operators need to weight ragged batches.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jvp, vmap

from .capture import choose_output
from .rules.bce import BCEWithLogitsLoss
from .rules.cross_entropy import CrossEntropyLoss, NLLLoss
from .rules.huber import HuberLoss, SmoothL1Loss
from .rules.mse import MSELoss


class FuncLoss:
    """Any callable ``loss_fn(z, targets) -> scalar``: value, ``∇_z L`` and ``∇²_z L · ż`` by
    ``torch.func`` (``grad``, and ``jvp`` of ``grad`` vmapped over the K tangents); where torch has
    no forward-mode formula for an op of the loss (``NotImplementedError``) or ``torch.func`` cannot
    transform it, by autograd double backward at the output instead (one backward per vector)."""

    name = "autograd loss"

    def __init__(self, loss_fn: Callable, target: Any):
        self.loss_fn = loss_fn
        self.target = target

    def denominator(self) -> float | None:
        """The weight of this batch in a dataset mean: the number of elements of the targets (of
        their first tensor, for a structure of targets) — exact for a loss that averages over
        samples or tokens. An arbitrary callable's reduction is unknown here: the operators
        probe it once (:func:`probe_reduction`) or take ``reduction=``, and weight a ``sum``
        loss by 1."""
        t = _first_tensor(self.target)
        return float(t.numel()) if t is not None and t.dim() > 0 else 1.0

    def _loss(self, x: torch.Tensor) -> torch.Tensor:
        try:
            out = self.loss_fn(x, self.target)
        except (IndexError, KeyError, AttributeError, TypeError) as e:
            if not _indexes_output(e):
                raise
            raise ValueError(
                f"loss_fn(output, targets) raised {type(e).__name__}: {e}. hessfast gives loss_fn "
                f"the model's output as one tensor (here {list(x.shape)}): a model whose forward "
                "returns a dict, tuple or dataclass (a loss reading out['logits'] or out[0]) must "
                "be wrapped so that forward returns the tensor the loss reads"
            ) from e
        if not isinstance(out, torch.Tensor) or out.dim() != 0:
            raise ValueError(
                "loss_fn must return a scalar tensor; got "
                f"{getattr(out, 'shape', type(out).__name__)} (use reduction='mean' or 'sum')"
            )
        return out

    def evaluate(self, z: torch.Tensor, zdot: torch.Tensor | None, mode: str):
        try:
            return self._evaluate_func(z, zdot, mode)
        except (NotImplementedError, RuntimeError):
            # no forward-mode formula (huber_loss_backward, ...) or a composite torch.func cannot
            # transform (broadcasting losses: "ZeroTensors are immutable"): double backward. A
            # genuine error of the loss raises again there, with autograd's message.
            return self._evaluate_autograd(z, zdot, mode)

    def _evaluate_func(self, z, zdot, mode):
        gf = grad(self._loss)
        loss = self._loss(z)
        g = gf(z) if mode in ("hvp", "grad") else None
        gd = None
        if zdot is not None and mode in ("hvp", "ggn"):
            gd = vmap(lambda u: jvp(gf, (z,), (u,))[1])(zdot)
        return loss, g, gd

    def _evaluate_autograd(self, z, zdot, mode):
        second = zdot is not None and mode in ("hvp", "ggn")
        with torch.enable_grad():
            x = z.detach().requires_grad_(True)
            loss = self._loss(x)
            (g,) = torch.autograd.grad(loss, x, create_graph=second, allow_unused=True)
            if g is None:
                g = torch.zeros_like(x)
            gd = None
            if second:
                cols = []
                for u in zdot:
                    h = None
                    if g.requires_grad:
                        (h,) = torch.autograd.grad(g, x, u, retain_graph=True, allow_unused=True)
                    cols.append(torch.zeros_like(x) if h is None else h.detach())
                gd = torch.stack(cols)
        return loss.detach(), (g.detach() if mode in ("hvp", "grad") else None), gd


class Broadcast:
    """An elementwise loss (MSE, Huber, smooth L1) whose targets broadcast against the output, as
    torch computes it: ``L(z) = ℓ(expand(z), expand(t))`` over the broadcast shape, so (with
    ``E`` the expansion, a linear map) ``∇_z L = Eᵀ ∇ℓ`` and ``∇²_z L · ż = Eᵀ ∇²ℓ E ż``: the
    elementwise rule on the expanded tensors, its results summed back to the output's shape.
    ``mean`` divides by the broadcast shape's number of elements, as torch does. Resolving one
    warns as torch does."""

    def __init__(self, rule: Any, output_shape: tuple):
        try:
            shape = tuple(torch.broadcast_shapes(output_shape, tuple(rule.target.shape)))
        except RuntimeError as e:
            raise ValueError(
                f"{rule.name}: the targets {list(rule.target.shape)} do not broadcast against the "
                f"model output {list(output_shape)} ({e})"
            ) from None
        warnings.warn(
            f"Using a target size ({rule.target.shape}) that is different to the input size "
            f"({torch.Size(output_shape)}). This will likely lead to incorrect results due to "
            "broadcasting. Please ensure they have the same size.",
            stacklevel=4,
        )
        # plain attributes only (the traced path keys on them): the rule is rebuilt per call
        self.kind = type(rule)
        self.name = rule.name
        self.target = rule.target.expand(shape)
        self.reduction = rule.reduction
        self.threshold = getattr(rule, "threshold", None)
        self.shape = shape

    def _rule(self):
        if self.kind is MSELoss:
            return MSELoss(self.target, self.reduction)
        if self.kind is SmoothL1Loss:
            return SmoothL1Loss(self.target, self.reduction, self.threshold)
        return HuberLoss(self.target, self.reduction, self.threshold)

    def denominator(self) -> float | None:
        return float(self.target.numel()) if self.reduction == "mean" else None

    def evaluate(self, z: torch.Tensor, zdot: torch.Tensor | None, mode: str):
        zs = tuple(z.shape)
        ze = z.expand(self.shape)
        zde = zdot.expand(zdot.shape[0], *self.shape) if zdot is not None else None
        loss, g, gd = self._rule().evaluate(ze, zde, mode)
        if g is not None:
            g = g.sum_to_size(zs)
        if gd is not None:
            gd = gd.sum_to_size(gd.shape[0], *zs)
        return loss, g, gd


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    leaves = torch.utils._pytree.tree_leaves(x)
    return next((t for t in leaves if isinstance(t, torch.Tensor)), None)


def _indexes_output(e: Exception) -> bool:
    """Whether ``e`` looks like a loss reading a field of a dict/tuple/dataclass output from a
    tensor (``out["logits"]``, ``out.logits``)."""
    msg = str(e)
    return (
        "too many indices for tensor" in msg
        or "only integers, slices" in msg
        or "'Tensor' object has no attribute" in msg
        or ("Tensor" in msg and "not subscriptable" in msg)
    )


def _reduction(kw: dict) -> str:
    if kw.get("size_average") is not None or kw.get("reduce") is not None:
        raise ValueError("size_average/reduce are deprecated in torch; pass reduction= instead")
    r = kw.get("reduction", "mean")
    if r not in ("mean", "sum"):
        raise ValueError(
            f"reduction={r!r}: a Hessian needs a scalar loss; use reduction='mean' or 'sum'"
        )
    return r


#: Keyword defaults of the loss functions, read once (``inspect.signature`` per product costs
#: more than a small model's gradient's worth of Python).
_DEFAULTS: dict[Callable, dict] = {}


def _call_kwargs(fn: Callable, keywords: dict) -> dict:
    """Defaults of ``fn`` overridden by ``keywords`` (for ``functools.partial``)."""
    defaults = _DEFAULTS.get(fn)
    if defaults is None:
        sig = inspect.signature(fn)
        defaults = _DEFAULTS[fn] = {
            n: p.default
            for n, p in sig.parameters.items()
            if p.default is not inspect.Parameter.empty
        }
    return {**defaults, **keywords}


def _from_function(fn: Callable, kw: dict, target: Any):
    if fn is F.cross_entropy:
        _check_class_targets("cross_entropy", target, soft_ok=True)
        return CrossEntropyLoss(
            target,
            kw.get("weight"),
            kw.get("ignore_index", -100),
            _reduction(kw),
            kw.get("label_smoothing", 0.0),
        )
    if fn is F.nll_loss:
        _check_class_targets("nll_loss", target, soft_ok=False)
        return NLLLoss(target, kw.get("weight"), kw.get("ignore_index", -100), _reduction(kw))
    if fn is F.mse_loss:
        red = _reduction(kw)
        return None if kw.get("weight") is not None else MSELoss(target, red)
    if fn is F.huber_loss:
        red = _reduction(kw)
        return (
            None if kw.get("weight") is not None else HuberLoss(target, red, kw.get("delta", 1.0))
        )
    if fn is F.smooth_l1_loss:
        return SmoothL1Loss(target, _reduction(kw), kw.get("beta", 1.0))
    if fn is F.binary_cross_entropy_with_logits:
        return BCEWithLogitsLoss(target, kw.get("weight"), _reduction(kw), kw.get("pos_weight"))
    return None


_MODULES = {
    nn.CrossEntropyLoss: F.cross_entropy,
    nn.NLLLoss: F.nll_loss,
    nn.MSELoss: F.mse_loss,
    nn.HuberLoss: F.huber_loss,
    nn.SmoothL1Loss: F.smooth_l1_loss,
    nn.BCEWithLogitsLoss: F.binary_cross_entropy_with_logits,
}

#: The functions with a closed-form rule (the ``nn`` loss modules map to these).
CLOSED_FORM_FUNCTIONS = frozenset(_MODULES.values())


def closed_form(fn: Callable, kwargs: dict, target: torch.Tensor, output_shape: tuple):
    """The closed-form rule of ``fn(output, target, **kwargs)`` (``fn`` one of
    :data:`CLOSED_FORM_FUNCTIONS`) for an output of ``output_shape``, targets checked as
    :func:`resolve` checks them; ``None`` where there is none (an elementwise loss whose targets
    broadcast, an option without a rule)."""
    rule = _from_function(fn, _call_kwargs(fn, kwargs), target)
    if rule is None or (
        isinstance(rule, _ELEMENTWISE) and tuple(target.shape) != tuple(output_shape)
    ):
        return None
    validate_targets(rule, output_shape)
    return rule


#: Rules whose targets have the output's shape (a different shape broadcasts, with torch's
#: warning, through the autograd loss).
_ELEMENTWISE = (MSELoss, HuberLoss)


def identify(loss_fn: Callable) -> tuple[Callable | None, dict]:
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
        for attr in ("weight", "ignore_index", "label_smoothing", "pos_weight", "delta", "beta"):
            if hasattr(loss_fn, attr):
                kw[attr] = getattr(loss_fn, attr)
        return fn, kw
    if loss_fn in _MODULES.values():
        return loss_fn, _call_kwargs(loss_fn, {})
    return None, {}


def check_loss_fn(loss_fn: Any) -> None:
    """``ValueError`` for a ``loss_fn`` that cannot be called as ``loss_fn(output, targets)``: a
    loss class instead of an instance, or something not callable."""
    if isinstance(loss_fn, type):
        name = f"{loss_fn.__module__.replace('torch.nn.modules.loss', 'nn')}.{loss_fn.__name__}"
        if issubclass(loss_fn, nn.Module):
            raise ValueError(
                f"loss_fn is the class {name}, not a loss: instantiate it, "
                f"loss_fn={name}() (with its options, e.g. {loss_fn.__name__}(reduction='sum'))"
            )
        raise ValueError(f"loss_fn is the class {name}; pass a callable loss_fn(output, targets)")
    if not callable(loss_fn):
        raise ValueError(
            f"loss_fn must be callable as loss_fn(output, targets), not {type(loss_fn).__name__}"
        )


def is_empty_batch(target: Any) -> bool:
    """Whether ``target`` holds no sample: its (first) tensor has a zero-length axis."""
    t = _first_tensor(target)
    return t is not None and t.dim() > 0 and t.numel() == 0


def _check_class_targets(name: str, target: Any, soft_ok: bool) -> None:
    """Dtype checks of class-index targets (no host synchronisation)."""
    if not isinstance(target, torch.Tensor):
        raise ValueError(f"{name}: targets must be a tensor, not {type(target).__name__}")
    if target.dtype == torch.bool or target.is_complex():
        raise ValueError(
            f"{name}: targets are {target.dtype}; class indices must be an integer tensor "
            "(targets.long())"
            + (", class probabilities a float tensor of the logits' shape" if soft_ok else "")
        )
    if target.is_floating_point() and not soft_ok:
        raise ValueError(
            f"{name}: targets are {target.dtype}; class indices must be an integer tensor "
            "(targets.long()), as torch requires (expected target dtype to be Long or Byte)"
        )


def _class_layout(output_shape: tuple, target: torch.Tensor) -> tuple[int | None, str | None]:
    """``(number of classes, None)`` when hard targets fit logits of ``output_shape`` in a layout
    the cross-entropy rule reads, else ``(None, what is wrong)``."""
    shape, ts = tuple(output_shape), tuple(target.shape)
    if len(shape) == 0:
        return None, f"logits are a scalar; cross-entropy needs logits [N, C] or [C], got {shape}"
    if len(shape) == 1:
        return (shape[0], None) if ts == () else (None, f"[{shape[0]}] logits need a 0-d target")
    if len(shape) == 2:
        if ts == (shape[0],):
            return shape[1], None
        if len(ts) == 1:
            return None, (
                f"Expected input batch_size ({shape[0]}) to match target batch_size ({ts[0]}): "
                f"logits {list(shape)} have {shape[0]} rows but there are {ts[0]} targets"
            )
        return None, f"logits {list(shape)} need targets [{shape[0]}], got {list(ts)}"
    if ts == shape[:-1]:
        return shape[-1], None  # sequence layout, classes last (ambiguity: the rule refuses)
    if ts == (shape[0], *shape[2:]):
        return shape[1], None
    return None, (
        f"logits {list(shape)} need targets {list(shape[:-1])} (classes last) or "
        f"{[shape[0], *shape[2:]]} (torch's classes-in-dim-1 layout), got {list(ts)}"
    )


def validate_targets(rule: Any, output_shape: tuple | None) -> None:
    """Check hard cross-entropy/NLL targets against logits of ``output_shape``: shape, and every
    counted target a class in ``[0, C)`` — one host synchronisation per product, outside the
    engine. ``ValueError`` for a shape, ``IndexError`` (as torch) for a class out of range."""
    if output_shape is None or not isinstance(rule, (CrossEntropyLoss, NLLLoss)):
        return
    name = "cross_entropy" if isinstance(rule, CrossEntropyLoss) else "nll_loss"
    t = rule.target
    if isinstance(rule, CrossEntropyLoss) and rule.soft:
        if tuple(t.shape) != tuple(output_shape):
            raise ValueError(
                f"{name}: float targets {list(t.shape)} are read as class probabilities and "
                f"must have the logits' shape {list(output_shape)}; class indices must be an "
                "integer tensor (targets.long())"
            )
        return
    C, why = _class_layout(tuple(output_shape), t)
    if C is None:
        raise ValueError(f"{name}: {why}")
    check_class_range(t, C, rule.ignore_index, name)


def class_range(rule: Any, output_shape: tuple | None) -> tuple[int, int, str] | None:
    """``(C, ignore_index, name)`` of the range check :func:`validate_targets` makes of hard
    class targets (shapes already checked), or ``None`` when it makes none: what a later product
    with targets of the same shape checks by :func:`check_class_range`."""
    if output_shape is None or not isinstance(rule, (CrossEntropyLoss, NLLLoss)):
        return None
    if isinstance(rule, CrossEntropyLoss) and rule.soft:
        return None
    C, _ = _class_layout(tuple(output_shape), rule.target)
    name = "cross_entropy" if isinstance(rule, CrossEntropyLoss) else "nll_loss"
    return (C, rule.ignore_index, name) if C is not None else None


def check_class_range(t: torch.Tensor, C: int, ignore_index: int, name: str) -> None:
    """``IndexError`` (as torch) unless every target of ``t`` is a class in ``[0, C)`` or
    ``ignore_index``: one reduction and one host synchronisation in the common case."""
    if t.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(t)).tolist()  # the common case: one reduction
    if 0 <= lo and hi < C:
        return
    bad = (t != ignore_index) & ((t < 0) | (t >= C))
    if bool(bad.any()):
        first = int(t[bad].flatten()[0])
        raise IndexError(
            f"{name}: Target {first} is out of bounds: the logits have {C} classes, so targets "
            f"must lie in [0, {C - 1}] (or equal ignore_index={ignore_index})"
        )


class RebuiltOutput:
    """A custom ``loss_fn`` fed the model's output container rebuilt around the one tensor it
    holds, as ``loss_fn(model(x), y)`` would see it. Equal for the same loss and structure (the
    traced products key on it)."""

    def __init__(self, loss_fn: Callable, spec: Any):
        self.loss_fn, self.spec, self._key = loss_fn, spec, str(spec)

    def __call__(self, z, target):
        return self.loss_fn(torch.utils._pytree.tree_unflatten([z], self.spec), target)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, RebuiltOutput)
            and other.loss_fn is self.loss_fn
            and other._key == self._key
        )

    def __hash__(self) -> int:
        return hash((id(self.loss_fn), self._key))


def read_output(rule: Any, out_spec: Any, output: Any) -> tuple[int, Any]:
    """Which leaf of a model output structured as ``out_spec`` (``None`` or a leaf: one tensor)
    the loss reads, and the loss rule — its callable wrapped to receive the whole container where
    :func:`hessfast.capture.choose_output` says so."""
    if out_spec is None or out_spec.is_leaf():
        return 0, rule
    idx, rebuild = choose_output(out_spec, output, isinstance(rule, FuncLoss))
    if rebuild is not None:
        rule.loss_fn = RebuiltOutput(rule.loss_fn, rebuild)
    return idx, rule


def is_closed_form(loss_fn: Callable) -> bool:
    """Whether ``loss_fn`` is one of the losses with a closed-form rule (it reads a tensor), as
    opposed to a custom callable (which may read a container the model returns)."""
    return identify(loss_fn)[0] is not None


def resolve(loss_fn: Callable, target: Any, output_shape: tuple | None = None):
    """The loss rule for ``loss_fn`` and ``target``: a closed form when recognised, else
    :class:`FuncLoss`. Raises ``ValueError`` for options that cannot give a scalar loss, a loss
    class passed instead of an instance, an empty batch (targets with no sample: torch's mean is
    NaN), and class-index targets of the wrong dtype or shape; ``IndexError`` for a class out of
    range (with ``output_shape``, one host synchronisation)."""
    check_loss_fn(loss_fn)
    if is_empty_batch(target):
        t = _first_tensor(target)
        raise ValueError(
            f"the batch is empty: targets of shape {list(t.shape)} hold no sample, and a loss "
            "over no sample has no curvature (torch's mean over it is NaN). Drop empty batches; "
            "an operator over a dataset skips them"
        )
    rule = None
    fn, kw = identify(loss_fn)
    if fn is not None and isinstance(target, torch.Tensor):
        rule = _from_function(fn, kw, target)
    if (
        isinstance(rule, _ELEMENTWISE)
        and output_shape is not None
        and tuple(target.shape) != tuple(output_shape)
    ):
        rule = Broadcast(rule, tuple(output_shape))
    if rule is None:
        return FuncLoss(loss_fn, target)
    validate_targets(rule, output_shape)
    return rule


def probe_reduction(loss_fn: Callable, z: Any, target: Any) -> str:
    """``"sum"`` or ``"mean"``: how ``loss_fn`` reduces over the samples of a batch, found from
    its values at the model output ``z`` of one batch. The batch duplicated gives twice the loss
    for a sum and the same loss for a mean; for a mean, the batch split in two halves must give
    the row-weighted average of the halves (a mean over something else, such as the targets not
    ignored, cannot weight ragged batches). ``ValueError`` when the values decide neither."""
    tree = torch.utils._pytree

    def rows(x):
        t = _first_tensor(x)
        return t.shape[0] if t is not None and t.dim() > 0 else None

    n = rows(target)
    nz = rows(z)
    fix = (
        "use a recognised loss, which hessfast weights exactly (F.cross_entropy, "
        "nn.CrossEntropyLoss(ignore_index=...), functools.partial(F.cross_entropy, "
        "reduction='sum'), nn.MSELoss(), ...), or tell the operator how to weight batches: "
        "reduction='sum' (batches added) or reduction='mean' (batches weighted by their number "
        "of target elements)"
    )
    if n is None or nz != n:
        raise ValueError(
            "cannot find how loss_fn reduces over a batch: its targets and the model output do "
            f"not share a batch axis; {fix}"
        )

    def cat(a, b):
        return tree.tree_map(
            lambda x, y: torch.cat([x, y]) if isinstance(x, torch.Tensor) and x.dim() else x, a, b
        )

    def part(x, sl):
        return tree.tree_map(lambda t: t[sl] if isinstance(t, torch.Tensor) and t.dim() else t, x)

    def value(zz, tt):
        with torch.no_grad():
            out = loss_fn(zz, tt)
        if not isinstance(out, torch.Tensor) or out.dim() != 0:
            raise ValueError(
                "loss_fn must return a scalar tensor; got "
                f"{getattr(out, 'shape', type(out).__name__)} (use reduction='mean' or 'sum')"
            )
        return float(out.double())

    one = value(z, target)
    two = value(cat(z, z), cat(target, target))
    scale = max(abs(one), abs(two))
    tol = 1e-3 * scale
    if not (scale > 0 and abs(one) > 0) or not all(map(lambda v: v == v, (one, two))):
        raise ValueError(
            f"cannot find how loss_fn reduces over a batch: it is {one:g} on the first batch; {fix}"
        )
    if abs(two - 2 * one) <= tol:
        return "sum"
    if abs(two - one) > tol:
        raise ValueError(
            f"loss_fn is neither a sum nor a mean over the samples of a batch (the batch "
            f"duplicated gives {two:g}, the batch {one:g}); {fix}"
        )
    if n >= 2:
        h = n // 2
        a = value(part(z, slice(0, h)), part(target, slice(0, h)))
        b = value(part(z, slice(h, n)), part(target, slice(h, n)))
        mix = (h * a + (n - h) * b) / n
        if abs(mix - one) > 1e-3 * max(abs(one), abs(a), abs(b)):
            raise ValueError(
                "loss_fn averages over something other than the samples of a batch (e.g. "
                "the targets not equal to ignore_index): batches of different sizes cannot be "
                f"weighted from it; {fix}"
            )
    return "mean"
