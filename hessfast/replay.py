"""Repeated products: a call like the last replayed one runs its graph behind a short guard.

A research loop asks for the same product again and again (the same model, loss and batch
layout; new values): after :mod:`hessfast.traced` has traced and checked a product's graph, the
path from :func:`hessfast.hvp` to that graph still resolves the loss, captures, builds the
inputs' dictionaries and the trace key on every call — a few hundred Python calls, 2–4% of a
small CPU product (``benchmarks/bench_overhead.py``). :func:`record` keeps, per model and product
kind, what the last replay needed; :func:`run` replays it when every guard holds and returns
``None`` otherwise (the caller then takes the full path, which records again).

The guards are those of the full path, read directly:

- the model's :func:`~hessfast.capture.fingerprint` is the same object (nothing the capture
  specialised on changed) and every parameter's ``requires_grad`` is what it was;
- the same ``loss_fn`` object: a closed-form loss with the same keyword arguments (none a
  tensor), or a custom callable lowered again on meta tensors to the same rule
  (:func:`lowered`, which the full path does on every product too); the same
  ``backend``/``compile``/``output``/``strict`` arguments, the same backend request
  (:func:`hessfast.dispatch.request_state`) and engine settings;
- the shapes, strides, dtypes and devices of every graph input (parameters, buffers, constants,
  the inputs, ``v``, the targets or a custom loss's tensors) are the recorded ones (one C++ call, torch's tensor guard,
  which also compares ``requires_grad`` and dispatch keys), ``v`` is a dict in the recorded name
  order, and hard class targets lie in range (one host sync, as the full path; skipped where
  the graph's own kernels refuse an index out of range, :func:`checks_bounds`, and a graph
  that raises sends the call to the full path, which names the bad target);
- the graph's finiteness probe is finite; otherwise the full path runs and reports what is not.

Only products the full path replays with a probe are recorded: dict ``v`` (with or without a K
axis), a tensor or a tuple of tensors as inputs, a tensor as targets, ``params=None``, no
``return_info``. Anything else, and the first products of a signature, take the full path.

Example:
    >>> import torch, torch.nn.functional as F, hessfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    >>> v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    >>> a = [hessfast.hvp(model, F.cross_entropy, x, y, v) for _ in range(4)]  # the last: here
    >>> all(torch.equal(a[0][n], a[3][n]) for n in v)
    True
"""

from __future__ import annotations

import math
import operator
import types
import weakref
from typing import Any

import torch

from . import capture, engine, losses, lower_loss, traced
from .dispatch import request_state
from .rules import cross_entropy
from .vectors import _named_parameters_at

try:
    from torch._C._dynamo.guards import TensorGuards as _TensorGuards
except ImportError:  # pragma: no cover (every supported torch has it)
    _TensorGuards = None

#: model -> {product kind: _Record}
_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: Whether :func:`run` may replay (tests and benchmarks switch it off to time the full path).
ENABLED = True


def _settings() -> tuple:
    return *request_state(), engine.FUSE_HEAD, cross_entropy.HEAD_CHUNK_BYTES


class _Record:
    __slots__ = ("fp", "params", "rg", "loss_fn", "ident", "ident_fixed", "args", "settings",
                 "lowering", "loss_key", "fixed", "n_in", "names", "active", "batched", "metas",
                 "guard", "classes", "g_at", "p_at", "trace")  # fmt: skip


def _tensor_guard(tensors: tuple) -> Any:
    """A check, in C++, that tensors passed in the same order have the sizes, strides, dtypes,
    devices, ``requires_grad`` and dispatch keys these have (torch's own guard for compiled
    graphs, ``torch._C._dynamo.guards.TensorGuards``, with every size and stride static); or
    ``None`` where it is missing or does not accept these tensors (then :func:`run` compares
    :func:`hessfast.traced._metas`, which reads the first four in Python: 75 µs against 21 µs
    for the 14 inputs of the small MLP's HVP, read cold after its graph)."""
    if _TensorGuards is None:
        return None
    try:
        guard = _TensorGuards(
            *tensors,
            dynamic_dims_sizes=[list(t.shape) for t in tensors],
            dynamic_dims_strides=[list(t.stride()) for t in tensors],
        )
        return guard if guard.check(*tensors) else None
    except Exception:  # a private API: any change of its signature falls back to Python
        return None


def _ident(loss_fn: Any) -> tuple | None:
    """The recognised loss and its keyword arguments, or ``None`` (a custom loss, or a tensor
    among its arguments, which equality cannot compare)."""
    fn, kw = losses.identify(loss_fn)
    if fn is None or any(isinstance(x, torch.Tensor) for x in kw.values()):
        return None
    return fn, tuple(sorted(kw.items()))


def _inputs(inputs: Any) -> tuple | None:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if type(inputs) is tuple and all(isinstance(x, torch.Tensor) for x in inputs):
        return inputs
    return None


def lowered(lowering: tuple, loss_fn: Any, targets: Any) -> tuple[tuple, list]:
    """A custom loss resolved and lowered again, as the full path does on every product
    (:func:`hessfast.lower_loss.lower` runs the callable on meta tensors): the loss part of the
    trace key (the lowered rule's type, its state's structure and the metas of its leaves) and
    its tensor leaves, the graph's last inputs. ``lowering``:
    :attr:`hessfast.engine.Result.lowering`."""
    out_shape, out_spec, output, out_meta = lowering
    rule = losses.resolve(loss_fn, targets, out_shape)
    _, rule = losses.read_output(rule, out_spec, output)
    rule = lower_loss.lower(rule, out_meta)
    parts = traced._split_loss(rule)
    leaves, _, tensor_idx = parts
    return traced.loss_key(rule, parts), [leaves[i] for i in tensor_idx]


def checks_bounds(trace: Any, targets: torch.Tensor) -> bool:
    """Whether ``trace``'s graph itself refuses class targets out of range: an eager graph of
    aten ops only (no hessfast kernel, nothing compiled) on CPU targets, whose indexing kernels
    (``gather``, ``scatter``, advanced indexing, ``nll_loss``) check every index and raise (the
    unchecked ``_unsafe_*index*`` ops excepted: a graph with one keeps the check). A
    replay then skips the separate range check (one reduction and a host read, ≈ 35 µs read
    cold after a small CPU product) and, should the graph raise, takes the full path, which
    names the bad target; on a GPU an index out of range is a device-side assert, so the check
    stays before the graph."""
    if targets.device.type != "cpu":
        return False
    if trace.aten_only is None:
        fn = trace.fn
        trace.aten_only = isinstance(fn, traced.Direct) and all(
            n.op != "call_function"
            or n.target is operator.getitem
            or (
                isinstance(n.target, torch._ops.OpOverload)
                and n.target.namespace == "aten"
                and not ("_unsafe" in n.target.__name__ and "index" in n.target.__name__)
            )
            for n in fn.graph.nodes
        )
    return trace.aten_only


def record(kind, model, loss_fn, inputs, targets, v, args, res, fp, selected, batched) -> None:
    """Keep what the full path's replay ``res`` (an :class:`~hessfast.engine.Result` with
    ``flat``, checked finite) needs to be replayed by :func:`run`; ``args``: the call's other
    arguments, compared as they are; ``fp`` and ``selected``: the fingerprint the call took and
    its differentiated parameters (the order the results are returned in); ``batched``: ``v``
    has a K axis. Does nothing for calls :func:`run` does not serve."""
    if res.flat is None or res.probe is None or not isinstance(targets, torch.Tensor):
        return
    ins = _inputs(inputs)
    if ins is None or (v is not None and type(v) is not dict):
        return
    flat = res.flat
    if res.lowering is None:  # a closed-form loss: the targets are the graph's last input
        ident, loss_key, loss_in = _ident(loss_fn), None, [targets]
        if ident is None or not flat or flat[-1] is not targets:
            return
    else:  # a custom loss: its lowered rule's tensors are (traced.run keyed them)
        ident, loss_key = None, res.loss_key
        if loss_key is None:
            return
        loss_in = flat[len(flat) - res.n_loss :]
    n_t = 0 if res.active is None else len(res.active)
    n_fixed = len(flat) - len(loss_in) - n_t - len(ins)
    if n_fixed < 0 or any(a is not b for a, b in zip(flat[n_fixed : n_fixed + len(ins)], ins)):
        return
    r = _Record()
    r.fp = fp
    r.params = [p for _, p in _named_parameters_at(model, fp)]
    r.rg = [p.requires_grad for p in r.params]
    r.loss_fn, r.ident, r.args, r.settings = loss_fn, ident, args, _settings()
    r.lowering, r.loss_key = res.lowering, loss_key
    # a plain function's keywords are its defaults: the same object, the same loss (a loss
    # module's or a partial's keywords are attributes, which may change in place); a custom
    # loss is lowered again on every call instead
    r.ident_fixed = r.lowering is not None or isinstance(
        loss_fn, (types.FunctionType, types.BuiltinFunctionType)
    )
    r.fixed = flat[:n_fixed]
    r.n_in = len(ins)
    r.classes = None if checks_bounds(res.trace, targets) else res.classes
    r.trace = res.trace
    # (name, position in the graph's outputs) in the parameters' order, per output kind
    r.g_at, r.p_at = (
        None if idx is None else [(n, idx[n]) for n, _ in selected]
        for idx in traced.out_indices(res.trace)
    )
    if v is None:
        r.names, r.active, r.batched = None, None, False
    else:
        r.names = tuple(v)
        r.active = res.active
        r.batched = batched
    guarded = (*r.fixed, *ins, *(() if v is None else v.values()), *loss_in)
    r.guard = _tensor_guard(guarded)
    r.metas = traced._metas(guarded) if r.guard is None else None
    if r.guard is not None and {id(p) for p in r.params} <= {id(t) for t in r.fixed}:
        r.rg = None  # every parameter is a graph input: the guard compares its requires_grad
    per = _RECORDS.get(model)
    if per is None:
        per = _RECORDS[model] = {}
    per[kind] = r


def run(kind, model, loss_fn, inputs, targets, v, args):
    """``(grads, products)`` of the recorded product ``kind`` of ``model`` replayed on these
    arguments, as the full path returns them to the caller: dicts in the parameters' order,
    the products with a K axis only where ``v`` has one (``None`` where the product kind has
    none); or ``None`` when a guard does not hold or the result's probe is not finite."""
    try:
        per = _RECORDS.get(model) if ENABLED else None
    except TypeError:  # not weak-referenceable (not a module): the full path says what is wrong
        return None
    r = None if per is None else per.get(kind)
    if r is None or loss_fn is not r.loss_fn or args != r.args:
        return None
    if capture.fingerprint(model) is not r.fp:
        return None
    if r.rg is not None and [p.requires_grad for p in r.params] != r.rg:
        return None
    ins = _inputs(inputs)
    if ins is None or len(ins) != r.n_in or not isinstance(targets, torch.Tensor):
        return None
    if (not r.ident_fixed and _ident(loss_fn) != r.ident) or _settings() != r.settings:
        return None
    if r.names is not None:
        if type(v) is not dict or tuple(v) != r.names:
            return None
        vals = tuple(v.values())
    elif v is not None:
        return None
    else:
        vals = ()
    if r.lowering is None:
        loss_in = (targets,)
    else:
        try:
            key, loss_in = lowered(r.lowering, loss_fn, targets)
        except Exception:  # the full path raises what is wrong
            return None
        if key != r.loss_key:
            return None
    if r.guard is not None:
        if not r.guard.check(*r.fixed, *ins, *vals, *loss_in):
            return None
    elif traced._metas((*r.fixed, *ins, *vals, *loss_in)) != r.metas:
        return None
    if r.names is None:
        tangents = []
    else:
        tangents = [v[n] for n in r.active]
        if not r.batched:
            tangents = [t.unsqueeze(0) for t in tangents]
    trace = r.trace
    if trace.fn is None:  # retired since
        return None
    if r.classes is not None:
        losses.check_class_range(targets, *r.classes)
    with torch.no_grad():
        try:
            out = trace.fn(*r.fixed, *ins, *tangents, *loss_in)
        except Exception:  # a target out of range (checks_bounds), or else: the full path says
            return None
    if not math.isfinite(out[-1].item()):
        return None  # the full path names what is not finite
    trace.calls += 1
    grads = prods = None
    if r.g_at is not None:
        grads = {n: out[i] for n, i in r.g_at}
    if r.p_at is not None:
        prods = (
            {n: out[i] for n, i in r.p_at}
            if r.batched
            else {n: out[i].squeeze(0) for n, i in r.p_at}
        )
    return grads, prods


def clear() -> None:
    """Forget every record (:func:`hessfast.capture.clear_cache` calls it)."""
    _RECORDS.clear()
