"""Custom loss callables that are a built-in loss on reshaped tensors, lowered to its closed form.

Users write the loss of a sequence model as a callable, ``lambda z, y: F.cross_entropy(z.reshape(-1,
z.shape[-1]), y.reshape(-1))``; as an arbitrary callable it would be differentiated at the output by
``torch.func`` (:class:`hessfast.losses.FuncLoss`), a few times the cost of the closed-form rule
and outside what a traced product can fuse. :func:`lower` runs the callable on every product on
``meta`` tensors (shapes only, no data, no compute) under a ``TorchFunctionMode`` that records
every torch call; nothing is cached, since the options it passes may change between calls (only
the shape and dtype a built-in loss returns for given argument metadata, so that its Python
decomposition does not run on meta tensors on every product). When
the record is nothing but reshapes (``reshape``, ``view``, ``flatten``, ``contiguous`` and shape
queries) of the output and of the targets, followed by one call of a loss
with a closed-form rule (``F.cross_entropy``, ``F.nll_loss``, ``F.mse_loss``, ... or their
``nn`` modules) on those two tensors whose value the callable returns, the loss is
``ℓ(reshape(z), reshape(t))``. Reshaping is linear and keeps the elements, so the closed-form rule
on the reshaped output, its results reshaped back (:class:`Reshaped`), is exactly the callable's
loss, gradient and Hessian. Anything else (another op on the output, a tensor held by the callable,
a container output or targets, an exception) keeps :class:`~hessfast.losses.FuncLoss`.

Example:
    >>> import torch, torch.nn.functional as F
    >>> from hessfast.losses import FuncLoss
    >>> from hessfast.lower_loss import lower
    >>> y = torch.randint(0, 5, (2, 3))
    >>> rule = lower(FuncLoss(lambda z, t: F.cross_entropy(z.flatten(0, 1), t.flatten()), y),
    ...              torch.empty(2, 3, 5))
    >>> type(rule).__name__, type(rule.inner).__name__, rule.shape
    ('Reshaped', 'CrossEntropyLoss', (6, 5))
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from . import losses

Tensor = torch.Tensor

#: torch functions a lowered callable may apply to the output and the targets: reshapes, and
#: queries of the shape.
_RESHAPES = {
    Tensor.reshape,
    Tensor.view,
    Tensor.flatten,
    Tensor.contiguous,
    torch.reshape,
    torch.flatten,
}
_QUERIES = {
    Tensor.size,
    Tensor.dim,
    Tensor.numel,
    Tensor.shape.__get__,
    Tensor.ndim.__get__,
    Tensor.dtype.__get__,
    Tensor.device.__get__,
}
_LOSSES = losses.CLOSED_FORM_FUNCTIONS


class Reshaped:
    """A closed-form loss rule read through a reshape of the model output: ``L(z) =
    ℓ(z.reshape(shape))``, so ``∇_z L`` and ``∇²_z L · ż`` are the inner rule's on the reshaped
    tensors, reshaped back."""

    def __init__(self, inner: Any, shape: tuple):
        self.inner = inner
        self.shape = shape
        self.name = inner.name

    def denominator(self) -> float | None:
        return self.inner.denominator()

    def evaluate(self, z: Tensor, zdot: Tensor | None, mode: str):
        zd = None if zdot is None else zdot.reshape(zdot.shape[0], *self.shape)
        loss, g, gd = self.inner.evaluate(z.reshape(self.shape), zd, mode)
        if g is not None:
            g = g.reshape(z.shape)
        if gd is not None:
            gd = gd.reshape(zdot.shape)
        return loss, g, gd


#: ``(loss function, the metadata of its arguments) -> (shape, dtype)`` of its result on meta
#: tensors: running a built-in loss on meta tensors goes through its Python decomposition, a few
#: milliseconds, on every product of a custom loss; its result depends on nothing else.
_LOSS_RESULTS: dict = {}
_MAX_LOSS_RESULTS = 256


def _shape_key(a: Any) -> Any:
    """What a meta computation can read of an argument: a tensor's shape, dtype, device and
    layout; a container's items; any other value itself (``TypeError`` when unhashable)."""
    if isinstance(a, Tensor):
        return ("T", tuple(a.shape), a.dtype, a.device.type, a.layout)
    if isinstance(a, (list, tuple)):
        return (type(a), *(_shape_key(x) for x in a))
    if isinstance(a, dict):
        return (dict, *sorted(((k, _shape_key(v)) for k, v in a.items()), key=repr))
    hash(a)
    return (type(a), a)


class _Record(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOSSES:
            out = self._loss(func, args, kwargs)
        else:
            out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, out))
        return out

    @staticmethod
    def _loss(func, args, kwargs):
        """``func(*args, **kwargs)`` on meta tensors, its result's shape and dtype remembered
        per argument metadata (a fresh meta tensor each time: identities are compared)."""
        try:
            key = (func, _shape_key(args), _shape_key(kwargs))
        except TypeError:
            return func(*args, **kwargs)
        known = _LOSS_RESULTS.get(key)
        if known is None:
            out = func(*args, **kwargs)
            if not (isinstance(out, Tensor) and out.device.type == "meta"):
                return out
            if len(_LOSS_RESULTS) >= _MAX_LOSS_RESULTS:
                _LOSS_RESULTS.clear()
            _LOSS_RESULTS[key] = (tuple(out.shape), out.dtype)
            return out
        shape, dtype = known
        return torch.empty(shape, dtype=dtype, device="meta")


def _record(loss_fn: Callable, z_meta: Any, t_meta: Any) -> tuple[list, Any] | None:
    """The torch calls of ``loss_fn(z_meta, t_meta)`` and its result, or ``None`` when it cannot
    run on meta tensors (a tensor it holds on a real device, a host read of a value)."""
    rec = _Record()
    try:
        with rec:
            out = loss_fn(z_meta, t_meta)
    except Exception:
        return None
    return rec.calls, out


def _recipe(calls: list, out: Any, z_meta: Tensor, t_meta: Any):
    """``(function, keyword arguments, output shape, target shape)`` of the built-in loss the
    recorded callable applies to reshapes of its two arguments, or ``None``."""
    if not isinstance(t_meta, Tensor):
        return None
    origin = {id(z_meta): "z", id(t_meta): "t"}
    found = None
    for func, args, kwargs, res in calls:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        touched = {origin[id(a)] for a in tensors if id(a) in origin}
        if not touched:
            if func in _QUERIES or func in _RESHAPES:
                continue
            return None  # a computation on something else (a tensor the callable holds)
        if func in _QUERIES:
            continue
        if func in _RESHAPES:
            if len(touched) != 1 or not isinstance(res, Tensor):
                return None
            origin[id(res)] = touched.pop()
            continue
        if func not in _LOSSES or found is not None:
            return None
        try:
            bound = inspect.signature(func).bind(*args, **kwargs)
        except TypeError:
            return None
        arguments = dict(bound.arguments)
        zi, ti = arguments.pop("input", None), arguments.pop("target", None)
        if not isinstance(zi, Tensor) or not isinstance(ti, Tensor):
            return None
        if origin.get(id(zi)) != "z" or origin.get(id(ti)) != "t":
            return None
        if any(isinstance(v, Tensor) for v in arguments.values()):
            return None  # a weight tensor: keep the callable
        found = (func, arguments, tuple(zi.shape), tuple(ti.shape), res)
    if found is None or found[4] is not out:
        return None
    return found[:4]


class CallSignature:
    """What a custom loss callable did on one product, as a hashable key: every torch call with
    its non-tensor arguments, and the identity, version, shape and dtype of every tensor it used
    that is not derived from the output or targets. A traced product of a :class:`FuncLoss` bakes
    the callable's Python state into its graph; keyed on this, a changed option (a schedule read
    from a global, a rebound or updated tensor) traces anew instead of replaying a stale graph."""

    def __init__(self, calls: list, inputs: set[int]):
        derived = set(inputs)
        parts = []
        for func, args, kwargs, res in calls:
            parts.append(
                (
                    func,
                    tuple(_arg_key(a, derived) for a in args),
                    tuple((k, _arg_key(v, derived)) for k, v in sorted(kwargs.items())),
                )
            )
            for r in torch.utils._pytree.tree_leaves(res):
                if isinstance(r, Tensor):
                    derived.add(id(r))
        self.parts = tuple(parts)
        self._hash = hash(self.parts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CallSignature) and other.parts == self.parts

    def __hash__(self) -> int:
        return self._hash


def _arg_key(a: Any, derived: set[int]) -> Any:
    if isinstance(a, Tensor):
        if id(a) in derived:
            return ("input",)
        return ("tensor", id(a), a._version, tuple(a.shape), a.dtype, str(a.device))
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, *(_arg_key(x, derived) for x in a))
    if isinstance(a, dict):
        return ("dict", *((k, _arg_key(v, derived)) for k, v in sorted(a.items(), key=str)))
    try:
        hash(a)
    except TypeError:
        return ("repr", type(a).__name__, repr(a))
    return a


def _meta(t: Tensor) -> Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def lower(rule: Any, z: Tensor) -> Any:
    """``rule`` (a :class:`~hessfast.losses.FuncLoss`) as a closed-form rule for a model output
    like ``z`` (its shape and dtype are read, nothing else) where the callable is a built-in loss
    of reshaped tensors. Otherwise ``rule`` itself, with ``rule.call_signature`` set: the
    :class:`CallSignature` of this product, or ``None`` when the callable could not be recorded
    (the product must then be interpreted). Target errors (range, dtype) raise as for the
    built-in loss."""
    if not isinstance(rule, losses.FuncLoss):
        return rule
    rule.call_signature = None
    if not isinstance(z, Tensor):
        return rule
    z_meta = _meta(z)
    t_meta = torch.utils._pytree.tree_map(
        lambda x: _meta(x) if isinstance(x, Tensor) else x, rule.target
    )
    # recorded on every product (meta tensors: no data, no compute), never cached: the callable
    # may read options that change between calls (a label-smoothing schedule in a global), and
    # the closed-form rule's options are part of the traced product's key
    record = _record(rule.loss_fn, z_meta, t_meta)
    if record is None:
        return rule
    calls, out = record
    inputs = {id(z_meta)} | {
        id(x) for x in torch.utils._pytree.tree_leaves(t_meta) if isinstance(x, Tensor)
    }
    if not isinstance(rule.loss_fn, losses.RebuiltOutput):
        recipe = _recipe(calls, out, z_meta, t_meta)
        if recipe is not None:
            fn, arguments, z_shape, t_shape = recipe
            inner = losses.closed_form(fn, arguments, rule.target.reshape(t_shape), z_shape)
            if inner is not None:
                return inner if z_shape == tuple(z.shape) else Reshaped(inner, z_shape)
    rule.call_signature = CallSignature(calls, inputs)
    return rule
