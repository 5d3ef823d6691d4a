"""The engine: forward-over-reverse over a captured program, K tangents at once (docs/architecture.md §3).

Forward pass in graph order: every active node's rule returns its value, its ``[K, ...]`` tangent
and the residuals its backward needs; everything else is freed after its last use. The loss rule
turns the output and its tangent into ``(ḡ_z, ġ_z)``. Backward pass in reverse order accumulates
``(ḡ, ġ)`` cotangents; at the parameters ``ġ_θ = H V`` (or ``G V`` in GGN mode, where ``ḡ`` is
never formed and every second-order term drops out) and ``ḡ_θ = ∇L``.

Modes: ``"hvp"`` (ḡ and ġ), ``"ggn"`` (ġ only, no primal backward), ``"grad"`` (ḡ only, no tangents)
and ``"residual"``: ``ġ_θ = R V = (H − G) V``, the Hessian's part from the model's second
derivatives, ``Σ_i (∂L/∂z_i) ∇²_θ z_i · V``. It is an HVP pass whose loss rule returns no ``ġ_z``
(the loss Hessian's term ``Jᵀ H_L J V`` is the GGN's), so only the rules' second-order terms, driven
by ``ḡ``, produce ``ġ``; the fused head is off (its ``ġ`` mixes both terms).

The fused head: when the loss is softmax cross-entropy with hard targets and the model output is a
linear layer's (``aten.linear``, possibly followed by views and reshapes that keep the class axis
last), the layer and the loss run together, a chunk of rows at a time
(:class:`~hessfast.rules.cross_entropy.LinearCrossEntropy`), so the logits ``[N, V]`` and their
tangents ``[K, N, V]`` never exist for the whole batch; the backward pass continues from the
layer's inputs. :data:`FUSE_HEAD` chooses when.

Subnormals: in GGN mode on the CPU (float32, bfloat16) the loss's ``ġ_z`` is handed on scaled by a
power of two per product, and the products are scaled back at the end (:mod:`hessfast.subnormal`:
exact; it keeps a saturated softmax's subnormal ``ġ_z`` out of the backward pass as far as
float32's range allows).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from . import subnormal
from .capture import Program, Step
from .dispatch import requested
from .errors import UnsupportedOpError
from .rules import cross_entropy, rule_for
from .rules.base import Call, invoke
from .rules.fallback import FuncFallback

aten = torch.ops.aten

#: When to fuse a cross-entropy head with the linear layer before it: ``None`` (the default) when
#: the head's logits and their K tangents, ``[K+1, N, V]``, would not fit in the chunk budget
#: (``hessfast.rules.cross_entropy.HEAD_CHUNK_BYTES``), i.e. when fusing saves memory; ``True``
#: whenever the pattern applies; ``False`` never. Products are the same either way (up to
#: round-off in float32 and below).
FUSE_HEAD: bool | None = None

#: Shape-only ops allowed between the head's linear layer and the model output.
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


@dataclass
class Result:
    loss: torch.Tensor
    grads: dict[str, torch.Tensor] | None
    products: dict[str, torch.Tensor] | None
    fallback_ops: Counter
    trace: Any = None  # the traced product that ran or was traced (hessfast.traced.Trace)
    #: a replay's finiteness probe (:func:`hessfast.traced.add_probe`): finite only if ``v`` and
    #: the gradients and products are; ``None``: not vouched for, check them
    probe: Any = None
    #: a replay's graph inputs, in order, and the tangent names in their order (what
    #: :mod:`hessfast.replay` records to replay the graph without this path)
    flat: Any = None
    active: Any = None
    classes: Any = None  # (C, ignore_index, name) of the targets' range check, or None
    #: a custom loss: ``(output shape, output structure, output argument, meta output)``, what
    #: lowering it again needs (:func:`hessfast.replay.lowered`); ``None`` for a closed form
    lowering: Any = None
    #: a custom loss's lowered rule: its part of the trace key and how many of the graph's last
    #: inputs are its tensors (:func:`hessfast.traced.loss_key`)
    loss_key: Any = None
    n_loss: int = 0


def _accumulate(store: dict, key: str, g: Any, gd: Any) -> None:
    if g is None and gd is None:
        return
    old = store.get(key)
    if old is None:
        store[key] = [g, gd]
        return
    old[0] = _add(old[0], g)
    old[1] = _add(old[1], gd)


def _add(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, tuple):
        return tuple(_add(x, y) for x, y in zip(a, b))
    return a + b


@dataclass
class _Head:
    """A fused head found in a program: the linear step and the step indices it replaces."""

    linear: Step
    skip: frozenset[int]


def _classes_last(shape: tuple, target: torch.Tensor) -> bool:
    """Whether the cross-entropy rule reads logits of ``shape`` as rows ``[M, C]`` with the classes
    on the last axis, in row-major order (see ``cross_entropy.to_rows``)."""
    lead = tuple(target.shape)
    if len(shape) == 1:
        return lead == ()
    if lead != tuple(shape[:-1]):
        return False
    return len(shape) == 2 or lead != (shape[0], *shape[2:])  # else ambiguous: not fused


def _find_head(program: Program, plan: dict, loss_rule: Any, k: int) -> _Head | None:
    """The fused head of ``program`` for ``loss_rule`` (see :data:`FUSE_HEAD`), or ``None``."""
    if (
        FUSE_HEAD is False
        or not isinstance(loss_rule, cross_entropy.CrossEntropyLoss)
        or loss_rule.soft
    ):
        return None
    node = program.output
    chain = []
    while node.op == "call_function" and node.target in _VIEWS and len(node.users) == 1:
        chain.append(node)
        node = node.args[0]
    if node.op != "call_function" or node.target is not aten.linear.default:
        return None
    if len(node.users) != 1 or not plan.get(node.name, False):
        return None
    lin_val = node.meta.get("val")
    out_val = program.output.meta.get("val")
    if lin_val is None or out_val is None or lin_val.dim() < 1 or out_val.dim() < 1:
        return None
    if lin_val.shape[-1] != out_val.shape[-1]:
        return None
    if not _classes_last(tuple(out_val.shape), loss_rule.target):
        return None
    if FUSE_HEAD is None:
        if (k + 1) * lin_val.numel() * lin_val.element_size() <= cross_entropy.HEAD_CHUNK_BYTES:
            return None
    names = {n.name for n in (node, *chain)}
    skip = frozenset(i for i, s in enumerate(program.steps) if s.node.name in names)
    linear = next(s for s in program.steps if s.node is node)
    return _Head(linear, skip)


def _scatter(cot: dict, plan: dict, args: tuple, gargs: Any, gdargs: Any) -> None:
    """Accumulate the cotangents ``(ḡ, ġ)`` of a node's ``args`` into ``cot`` (active args only)."""
    for a, ga, gda in zip(args, gargs, gdargs):
        if isinstance(a, torch.fx.Node):
            if plan.get(a.name, False):
                _accumulate(cot, a.name, ga, gda)
        elif isinstance(a, (list, tuple)):
            for j, aj in enumerate(a):
                if isinstance(aj, torch.fx.Node) and plan.get(aj.name, False):
                    _accumulate(
                        cot,
                        aj.name,
                        ga[j] if ga is not None else None,
                        gda[j] if gda is not None else None,
                    )


def _const_eval(step: Step, args: tuple, kwargs: dict) -> Any:
    """Evaluate a parameter-independent node without side effects on the model.

    Capture functionalises programs (``capture.functionalize``), so no in-place op reaches the
    engine. Should one do so anyway, it runs on copies of the tensors it writes, and its result
    is the written copy; nothing is skipped, and nothing the caller passed is changed."""
    op = step.op
    schema = getattr(op, "_schema", None)
    if schema is not None and schema.is_mutable:
        args = tuple(
            a.clone()
            if (isinstance(a, torch.Tensor) and s.alias_info and s.alias_info.is_write)
            else a
            for a, s in zip(args, schema.arguments)
        )
    if schema is None:
        return op(*args, **kwargs)
    return invoke(op, args)


def run(
    program: Program,
    param_names: frozenset[str],
    values: dict[str, torch.Tensor],
    tangents: dict[str, torch.Tensor] | None,
    k: int,
    loss_rule: Any,
    mode: str,
    profiler: Any = None,
    grads: bool = True,
) -> Result:
    """Run one forward-over-reverse pass.

    ``values`` maps placeholder names to tensors (parameters, buffers, constants, user inputs);
    ``tangents`` maps canonical parameter names to ``[K, *shape]`` tangents (``None`` in grad mode).
    ``grads=False`` in ``"hvp"`` mode returns no gradient (``Result.grads`` is ``None``): the
    rules are told (:attr:`~hessfast.rules.base.Call.unread`) that nobody reads the parameters'
    primal cotangents, as in ``"residual"`` mode, and skip them where they are computed together
    with what is read (a convolution's stacked weight gradient, an embedding's row sums).

    ``profiler`` (``None``: no instrumentation, no extra work) is called around every node's
    evaluation: ``profiler.sync()`` before and after it (a device synchronisation, so that the
    time is the node's own) and then ``profiler.record(step, rule, phase, seconds, nbytes)`` with
    ``phase`` one of ``"constant"`` (a parameter-independent node; ``rule`` is ``None``),
    ``"forward"`` (``fwd_jvp``), ``"loss"`` (the loss rule; ``step`` is ``None``) and
    ``"backward"`` (``bwd_jvp``), and ``nbytes`` from :func:`produced_bytes`. ``hessfast
    profile`` (``hessfast/profile.py``) is the user of this hook. A fused head is one ``"loss"``
    record whose rule is the :class:`~hessfast.rules.cross_entropy.LinearCrossEntropy` (named
    ``linear_cross_entropy``); its linear layer has no records of its own.
    """
    backend = requested()
    plan = program.plan(param_names)
    if not plan.get(program.output.name, False):
        raise UnsupportedOpError(
            "the model output does not depend on the differentiated parameters; "
            "check `params=` (every selected parameter is unused by this forward)"
        )
    loss_mode = "grad" if mode == "residual" else mode
    head = None if mode == "residual" else _find_head(program, plan, loss_rule, k)
    gm = program.graph_module
    env: dict[str, Any] = dict(values)
    tan: dict[str, Any] = {}
    if tangents is not None:
        for ph, name in program.params.items():
            if plan[ph]:
                tan[ph] = tangents[name]
    last = program.last_uses()
    # the parameters whose primal cotangent nobody reads: every one without a returned gradient
    no_gbar = mode == "residual" or (mode == "hvp" and not grads)
    unread_phs = frozenset(ph for ph in program.params if plan[ph]) if no_gbar else frozenset()
    saved: dict[str, tuple] = {}
    fell_back: Counter = Counter()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            env[node.name] = getattr(gm, node.target)

    def val(a):
        if isinstance(a, torch.fx.Node):
            return env[a.name]
        if isinstance(a, (list, tuple)):
            return type(a)(val(x) for x in a)
        return a

    def act(a):
        if isinstance(a, torch.fx.Node):
            return plan.get(a.name, False)
        if isinstance(a, (list, tuple)) and any(isinstance(x, torch.fx.Node) for x in a):
            return [act(x) for x in a]
        return False

    def tng(a):
        if isinstance(a, torch.fx.Node):
            return tan.get(a.name)
        if isinstance(a, (list, tuple)) and any(isinstance(x, torch.fx.Node) for x in a):
            return [tng(x) for x in a]
        return None

    with torch.no_grad():
        for i, step in enumerate(program.steps):
            if head is not None and i in head.skip:
                continue  # evaluated by the fused head; its inputs stay alive until then
            name = step.node.name
            args = val(step.args)
            if not plan[name]:
                kwargs = val(dict(step.node.kwargs))
                env[name] = _timed(
                    profiler, step, None, "constant", args, _const_eval, step, args, kwargs
                )
            else:
                call = Call(
                    step.op,
                    args,
                    tuple(act(a) for a in step.args),
                    tuple(tng(a) for a in step.args) if k else (None,) * len(args),
                    k,
                    frozenset(
                        j
                        for j, a in enumerate(step.args)
                        if isinstance(a, torch.fx.Node) and a.name in unread_phs
                    )
                    if unread_phs
                    else frozenset(),
                )
                rule = rule_for(step.op, call, backend)
                try:
                    y, ydot, res = _timed(
                        profiler,
                        step,
                        rule,
                        "forward",
                        (call.args, call.tangents),
                        rule.fwd_jvp,
                        call,
                    )
                except Exception as e:
                    if isinstance(rule, FuncFallback):
                        raise _unsupported(step, e) from e
                    raise
                if isinstance(rule, FuncFallback):
                    fell_back[str(step.op)] += 1
                env[name] = y
                if ydot is not None:
                    tan[name] = ydot
                saved[name] = (rule, res)
            for dead in last.get(i, ()):
                env.pop(dead, None)
                tan.pop(dead, None)
        # the loop's last values (the output and its tangents, unfused) must not outlive their use
        args = call = y = ydot = res = None

        cot: dict[str, list] = {}
        scale = None  # GGN mode's power-of-two scale of ġ_z per product [K] (hessfast.subnormal)
        if head is not None:
            fused = cross_entropy.LinearCrossEntropy(loss_rule, backend)
            largs = head.linear.args
            inputs = (val(largs), tuple(tng(a) for a in largs))
            active = tuple(act(a) for a in largs)
            loss, gargs, gdargs, scale = _timed(
                profiler,
                None,
                fused,
                "loss",
                inputs,
                fused.evaluate,
                *inputs[0],
                *inputs[1],
                active,
                mode,
            )
            env.clear()
            tan.clear()
            _scatter(cot, plan, largs, gargs, gdargs)
            del inputs, gargs, gdargs  # the backward pass frees them once consumed
        else:
            out = program.output.name
            z = env[out]
            zdot = tan.get(out)
            loss, gz, gdz = _timed(
                profiler,
                None,
                loss_rule,
                "loss",
                (z, zdot),
                loss_rule.evaluate,
                z,
                zdot,
                loss_mode,
            )
            env.clear()
            tan.clear()
            if mode == "ggn" and isinstance(gdz, torch.Tensor) and subnormal.applies(gdz):
                scale = subnormal.pow2_scale(gdz)
                gdz = gdz * subnormal.per_product(scale, gdz)
            _accumulate(cot, out, gz, gdz)
            del z, zdot, gz, gdz  # the backward pass frees them once consumed
        for step in reversed(program.steps):
            name = step.node.name
            entry = saved.pop(name, None)
            c = cot.pop(name, None)
            if entry is None or c is None:
                continue
            rule, res = entry
            try:
                gargs, gdargs = _timed(
                    profiler, step, rule, "backward", (c, res), rule.bwd_jvp, res, c[0], c[1]
                )
            except Exception as e:
                if isinstance(rule, FuncFallback):
                    raise _unsupported(step, e) from e
                raise
            _scatter(cot, plan, step.args, gargs, gdargs)

    unscale = None if scale is None else subnormal.inverse(scale)
    out_grads = {} if mode == "grad" or (mode == "hvp" and grads) else None
    prods: dict[str, torch.Tensor] | None = {} if mode in ("hvp", "ggn", "residual") else None
    for ph, name in program.params.items():
        if not plan[ph]:
            continue
        g, gd = cot.get(ph, (None, None))
        p = values[ph]
        if out_grads is not None:
            g = torch.zeros_like(p) if g is None else g.contiguous()
            out_grads[name] = out_grads[name] + g if name in out_grads else g
        if prods is not None:
            if gd is None:
                gd = p.new_zeros((k, *p.shape))
            elif unscale is not None:
                gd = (gd * subnormal.per_product(unscale, gd)).contiguous()
            else:
                gd = gd.contiguous()
            prods[name] = prods[name] + gd if name in prods else gd
    return Result(loss, out_grads, prods, fell_back)


def _timed(profiler, step, rule, phase, inputs, fn, *args):
    """``fn(*args)``; with a profiler, timed between device synchronisations and recorded with
    the bytes it produced beyond ``inputs``."""
    if profiler is None:
        return fn(*args)
    t0 = _tick(profiler)
    out = fn(*args)
    dt = _tick(profiler) - t0
    profiler.record(step, rule, phase, dt, produced_bytes(out, inputs))
    return out


def _tick(profiler: Any) -> float:
    """Profiling only: wait for the device, then read the clock."""
    profiler.sync()
    return time.perf_counter()


def _storages(x: Any, seen: dict, depth: int = 0) -> None:
    if isinstance(x, torch.Tensor):
        try:
            s = x.untyped_storage()
            seen.setdefault(s.data_ptr(), s.nbytes())
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, fake)
            seen.setdefault(id(x), x.numel() * x.element_size())
    elif depth < 4 and isinstance(x, (tuple, list)):
        for a in x:
            _storages(a, seen, depth + 1)
    elif depth < 4 and isinstance(x, dict):
        for a in x.values():
            _storages(a, seen, depth + 1)


def produced_bytes(out: Any, inputs: Any) -> int:
    """Bytes of the distinct tensor storages in ``out`` (walking tuples, lists and dicts) that are
    not storages of ``inputs``: memory a rule allocated for its results (values, tangents and the
    residuals it keeps for the backward pass; cotangents and their tangents in the backward pass).
    Views and pass-throughs of its inputs count zero; a view of a new storage counts the storage.
    """
    got: dict = {}
    _storages(out, got)
    have: dict = {}
    _storages(inputs, have)
    return int(sum(n for ptr, n in got.items() if ptr not in have))


def _unsupported(step: Step, err: Exception) -> UnsupportedOpError:
    msg = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
    schema = getattr(step.op, "_schema", None)
    if schema is not None and schema.is_mutable:
        return UnsupportedOpError(
            f"in-place op {step.op} in {step.module} lies on the parameter path and was not "
            f"made out-of-place at capture ({type(err).__name__}: {msg}). Write it out of place "
            "(e.g. `x = x.relu()` for `x.relu_()`, `out = out + y` for `out += y`), or exclude "
            "the parameters before it with `params=`."
        )
    return UnsupportedOpError(
        f"op {step.op} in {step.module} lies on the parameter path and cannot be differentiated "
        f"twice by torch.func ({type(err).__name__}: {msg}). Give it a hessfast rule, replace it "
        "with a differentiable equivalent, or exclude the parameters before it with `params=`."
    )
