"""Traced products: each product's forward-over-reverse program traced once into one FX graph.

The interpreter (:func:`hessfast.engine.run`) is the specification: per product it walks the
captured program node by node, looks up and dispatches a rule per node and calls it. For a given
capture signature and product kind it always does the same thing, so :func:`run` traces it once —
``make_fx`` over ``engine.run`` with fake tensors — into one graph of aten (and ``hessfast::``) ops,
caches the graph beside the program and replays its generated code on later products: no per-node
Python, no rule lookup, no dispatch.

What a trace is specialised on (the cache key): the product mode (``hvp``/``ggn``/``grad``/
``residual``) and, for an HVP, whether the caller reads the gradient (without, the graph has no
parameter cotangents: a traced graph keeps only what its outputs need), K,
the differentiated parameters, the backend request, the fused-head setting, the shapes, strides,
dtypes and devices of every input (parameters, buffers, constants, user inputs, tangents, the loss
rule's tensors) and the loss rule's non-tensor settings (reduction, ``ignore_index``, the callable
of a custom loss, ...). Everything else is a graph input: parameter and input *values*, targets,
tangents. Tracing runs on fake tensors, so no value of the data can be baked into the graph: a rule
that reads a tensor value on the host (``.item()``, a Python branch on data, a data-dependent
shape) makes the trace fail, and that signature runs the interpreter instead (the reason is kept,
:func:`explain`). The finiteness of ``v`` and the results is a scalar output of the graph
(:func:`add_probe`), read once per product by :mod:`hessfast.api`; target ranges are checked
once per product outside the graph, in :mod:`hessfast.losses`.

``compile=`` picks what runs (:data:`MODES`):

- ``None`` (default): the traced graph, eager — traced on a signature's second product
  (:data:`TRACE_AFTER`; the first is interpreted, so a one-off product never pays for tracing),
  and falling back to the interpreter where tracing fails;
- ``"interpret"``: the interpreter (the reference path; ``hessfast profile``'s per-rule view);
- ``"inductor"``: the traced graph through ``torch.compile`` (Inductor fuses the elementwise
  tangent math; hessfast's own kernels stay opaque custom ops). Compiling costs seconds to minutes
  per signature (:func:`explain` reports it); it raises if the program cannot be traced;
- ``"cudagraphs"``: the traced graph replayed as a CUDA graph (CUDA tensors only).

Example:
    >>> import torch, torch.nn.functional as F, hessfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    >>> v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    >>> a = hessfast.hvp(model, F.cross_entropy, x, y, v)  # traced once, then replayed
    >>> b = hessfast.hvp(model, F.cross_entropy, x, y, v, compile="interpret")
    >>> all(torch.allclose(a[n], b[n]) for n in a)
    True
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import operator
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from . import engine, lower_loss
from .capture import Program, hashable_spec
from .dispatch import requested
from .losses import FuncLoss
from .rules import cross_entropy
from .vectors import SMALL

log = logging.getLogger("hessfast")

#: The values ``compile=`` takes.
MODES = (None, "interpret", "inductor", "cudagraphs")

#: Relative agreement a trace's first replay must reach with the interpreter, per dtype
#: (:func:`_first_call`; Inductor may reorder reductions).
TOLERANCES = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}

#: Inductor's settings for ``compile="inductor"``. ``layout_optimization`` off: Inductor would
#: run the convolutions channels-last and convert the graph's tensors (the K-batched tangents
#: included) to and from that layout around them, which on a CPU cost more than it saved
#: (ResNet-18 HVP: 0.93× the eager graph with it, 0.77× without; ``benchmarks/results``).
#: ``size_asserts`` off: the generated code's checks of each input's sizes and strides repeat
#: what the trace key already guarantees (a replay's inputs have the traced shapes and strides).
INDUCTOR_OPTIONS = {"layout_optimization": False, "size_asserts": False}

#: How many graphs :func:`run` has traced (tests check the cache with it).
TRACE_COUNT = 0


def check_mode(compile: Any) -> None:
    """Raise ``ValueError`` unless ``compile`` is one of :data:`MODES`."""
    if compile not in MODES:
        raise ValueError(
            f"compile={compile!r}: expected None (the traced graph), 'interpret' (the "
            "interpreter), 'inductor' (torch.compile of the traced graph) or 'cudagraphs'"
        )


@dataclass
class Trace:
    """One traced product: the callable on flat inputs, or why there is none."""

    fn: Any = None  # flat tensors -> flat outputs: the loss, then the gradients, the products
    layout: Any = None  # (gradient names or None, product names or None)
    reason: str | None = None  # why the signature runs the interpreter
    fallback_ops: Counter = field(default_factory=Counter)
    nodes: int = 0
    trace_seconds: float = 0.0
    compile_seconds: float | None = None  # first call of a compiled graph (None: not compiled)
    calls: int = 0
    dispatch_choices: Counter | None = None  # implementations chosen while tracing (dispatch)
    probe: bool = False  # the graph's last output is its finiteness probe (:func:`add_probe`)
    #: every op of the eager graph is an aten op (no hessfast kernel), or ``False``; ``None``:
    #: not looked yet (:func:`hessfast.replay.checks_bounds`)
    aten_only: bool | None = None


def _meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return (x.shape, x.stride(), x.dtype, x.device)
    if isinstance(x, (int, float, bool, str, type(None), torch.dtype, torch.device)):
        return ("V", type(x), x)
    try:
        hash(x)
        return ("O", x)  # a callable or other hashable object: by identity or value
    except TypeError:
        return ("R", type(x), repr(x))


def _is_rule(x: Any) -> bool:
    """A loss rule held inside another (e.g. an elementwise loss under ``Broadcast``)."""
    return type(x).__module__.startswith("hessfast.") and hasattr(x, "evaluate")


def _state(rule: Any) -> dict:
    """A loss rule's attributes as a nested dict (inner rules expanded, their classes kept), so
    that every tensor it holds, however deep, becomes a graph input."""
    out = {k: (_state(v) if _is_rule(v) else v) for k, v in vars(rule).items()}
    out["__class__"] = type(rule)
    return out


def _rebuild(rule: Any, state: dict) -> Any:
    """A copy of ``rule`` holding ``state`` (the inverse of :func:`_state`)."""
    new = copy.copy(rule)
    for k, v in state.items():
        if k != "__class__":
            old = getattr(rule, k)
            setattr(new, k, _rebuild(old, v) if _is_rule(old) else v)
    return new


#: Attribute types a loss rule's state may hold for :func:`_split_loss`'s walk: pytree leaves.
_LEAVES = frozenset({int, float, bool, str, type(None), torch.dtype, torch.device})


def _walk(rule: Any, leaves: list) -> tuple | None:
    """:func:`_state` of ``rule`` flattened in pytree's order (attributes in order, inner rules
    expanded, the class last) into ``leaves``, and the structure as a hashable tuple; ``None``
    where an attribute is a container or another object pytree might flatten."""
    keys: list = []
    for k, v in vars(rule).items():
        if type(v) in _LEAVES or isinstance(v, torch.Tensor):
            keys.append(k)
            leaves.append(v)
        elif _is_rule(v):
            inner = _walk(v, leaves)
            if inner is None:
                return None
            keys.append((k, inner))
        elif (type(v) is tuple or type(v) is list) and all(type(x) in _LEAVES for x in v):
            keys.append((k, type(v), len(v)))  # (a shape): pytree's leaves are its items
            leaves.extend(v)
        else:
            return None
    leaves.append(type(rule))
    return (type(rule), tuple(keys))


#: structure (:func:`_walk`) -> its pytree spec
_SPECS: dict = {}


def _split_loss(loss_rule: Any) -> tuple[list, Any, list]:
    """The loss rule's state as pytree leaves: (leaves, a hashable structure, indices of the
    tensor leaves). A rule of plain attributes (the closed-form rules) is walked directly, its
    pytree spec made once per structure; others through ``pytree.tree_flatten``."""
    leaves: list = []
    structure = _walk(loss_rule, leaves)
    if structure is not None:
        if structure not in _SPECS:
            _SPECS[structure] = pytree.tree_flatten(_state(loss_rule))[1]
        key = ("walked", structure)
    else:
        leaves, spec = pytree.tree_flatten(_state(loss_rule))
        key = ("pytree", hashable_spec(spec))
    return leaves, key, [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]


def _spec(loss_rule: Any, structure: tuple) -> Any:
    """The pytree spec of the rule's state (:func:`_split_loss`'s ``structure``)."""
    if structure[0] == "walked":
        return _SPECS[structure[1]]
    return pytree.tree_flatten(_state(loss_rule))[1]


_size, _stride = torch.Tensor.size, torch.Tensor.stride
_dtype, _device = operator.attrgetter("dtype"), operator.attrgetter("device")


def _metas(xs: Any) -> tuple:
    """:func:`_meta` of each of ``xs`` (the key reads every input on every product): for
    tensors only, as four tuples read in C."""
    xs = list(xs)
    if all(map(isinstance, xs, itertools.repeat(torch.Tensor))):
        return (
            "T",
            tuple(map(_size, xs)),
            tuple(map(_stride, xs)),
            tuple(map(_dtype, xs)),
            tuple(map(_device, xs)),
        )
    return tuple([_meta(x) for x in xs])


def loss_key(loss_rule: Any, loss_parts: tuple) -> tuple:
    """The loss part of a product's cache key: the rule's type, the structure of its state and
    the metas of its leaves (``loss_parts``: :func:`_split_loss` of ``loss_rule``)."""
    leaves, structure, _ = loss_parts
    return type(loss_rule), structure, _metas(leaves)


def _key(param_names, values, tangents, k, loss_rule, mode, compile, loss_parts, grads) -> tuple:
    """The cache key of a product (module docstring). The names of ``values`` and ``tangents``
    are left out: the placeholders are the program's and the tangents' names follow from
    ``param_names`` (:meth:`~hessfast.capture.Program.plan`), in a fixed order."""
    return (
        mode,
        k,
        param_names,
        requested(),
        engine.FUSE_HEAD,
        cross_entropy.HEAD_CHUNK_BYTES,
        compile,
        *loss_key(loss_rule, loss_parts),
        _metas(values.values()),
        None if tangents is None else _metas(tangents.values()),
        grads or mode != "hvp",
    )


#: Products of a signature interpreted before it is traced under ``compile=None``: tracing costs
#: tens to thousands of products (fake-tensor dispatch per op), so a product computed once never
#: pays it, and repeated products (operators, Lanczos, a training loop) are traced on the next.
TRACE_AFTER = 1

#: Traces kept per program, least recently used dropped first (a loop over many K or batch
#: shapes must not grow the cache without bound).
MAX_TRACES = 32


def _traces(program: Program) -> dict:
    cache = program.__dict__.get("_traces")
    if cache is None:
        cache = program.__dict__["_traces"] = {}
    return cache


def _trace(program, param_names, values, tangents, k, loss_rule, mode, compile, loss_parts, grads):
    global TRACE_COUNT
    leaves, structure, tensor_idx = loss_parts
    spec = _spec(loss_rule, structure)
    flat_in, in_spec = pytree.tree_flatten((values, tangents, [leaves[i] for i in tensor_idx]))
    is_tensor = [isinstance(x, torch.Tensor) for x in flat_in]
    statics = [None if t else x for x, t in zip(flat_in, is_tensor)]
    fell_back: Counter = Counter()
    layout: list = [None]

    def product(*tensors):
        it = iter(tensors)
        full = [next(it) if t else s for t, s in zip(is_tensor, statics)]
        vals, tans, loss_tensors = pytree.tree_unflatten(full, in_spec)
        state_leaves = list(leaves)
        for i, t in zip(tensor_idx, loss_tensors):
            state_leaves[i] = t
        rule = _rebuild(loss_rule, pytree.tree_unflatten(state_leaves, spec))
        res = engine.run(program, param_names, vals, tans, k, rule, mode, grads=grads)
        fell_back.update(res.fallback_ops)
        g = res.grads if grads else None
        p = res.products
        layout[0] = (None if g is None else list(g), None if p is None else list(p))
        return (res.loss, *(g or {}).values(), *(p or {}).values())

    TRACE_COUNT += 1
    example = [x for x, t in zip(flat_in, is_tensor) if t]
    t0 = time.perf_counter()
    try:
        from torch.fx.experimental.proxy_tensor import make_fx

        quiet = logging.getLogger("torch._subclasses.fake_tensor")
        level = quiet.level
        quiet.setLevel(logging.CRITICAL)  # a failed trace is a reason, not an error log
        try:
            gm = make_fx(product, tracing_mode="fake", _allow_non_fake_inputs=True)(*example)
        finally:
            quiet.setLevel(level)
    except Exception as e:  # any failure to trace means: this signature is interpreted
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        return Trace(reason=f"{type(e).__name__}: {msg}")
    prune(gm)
    n_values = sum(isinstance(x, torch.Tensor) for x in pytree.tree_leaves(values))
    probe = PROBE and add_probe(gm, n_values, len(tangents or ()))
    trace = Trace(
        layout=layout[0],
        fallback_ops=fell_back,
        nodes=len(gm.graph.nodes),
        trace_seconds=time.perf_counter() - t0,
        probe=probe,
    )
    if compile is None:
        trace.fn = Direct(gm)
    else:  # the compile modes are torch.compile backends of the same name; compiled lazily
        options = dict(INDUCTOR_OPTIONS) if compile == "inductor" else None
        trace.fn = torch.compile(
            gm, backend=compile, fullgraph=True, dynamic=False, options=options
        )
        trace.compile_seconds = 0.0  # measured on the first call
    return trace


def prune(gm: torch.fx.GraphModule) -> None:
    """Drop the work no output of ``gm`` reads. ``make_fx`` records every op that ran: a
    gradient nobody asked for, a rule's residual that a mode does not use. Dead nodes go
    (mutating ops count as used), and a multi-output backward op with an ``output_mask``
    (``convolution_backward``, the normalisations' backwards) stops computing the outputs no
    node reads, e.g. a convolution's weight cotangent in an HVP whose caller does not want the
    gradient."""
    graph = gm.graph
    graph.eliminate_dead_code()
    for node in graph.nodes:
        op = node.target
        if node.op != "call_function" or not isinstance(op, torch._ops.OpOverload):
            continue
        names = [a.name for a in op._schema.arguments]
        if "output_mask" not in names:
            continue
        used = set()
        for user in node.users:
            if user.target is operator.getitem:
                used.add(user.args[1])
            else:  # the tuple itself is read: keep every output
                used = None
                break
        if used is None:
            continue
        i = names.index("output_mask")
        positional = i < len(node.args)
        mask = list(node.args[i] if positional else node.kwargs.get("output_mask", ()))
        new = [bool(m) and j in used for j, m in enumerate(mask)]
        if new == mask:
            continue
        if positional:
            node.args = (*node.args[:i], new, *node.args[i + 1 :])
        else:
            node.kwargs = {**node.kwargs, "output_mask": new}
    gm.recompile()


#: Whether traced graphs carry a finiteness probe (:func:`add_probe`; benchmarks switch it off
#: to measure what it costs).
PROBE = True


def add_probe(gm: torch.fx.GraphModule, first_tangent: int, n_tangents: int) -> bool:
    """Append to ``gm``'s outputs one scalar, the *probe*, that is finite only if every tangent
    input (placeholders ``first_tangent`` to ``first_tangent + n_tangents``) and every output
    but the first (the loss) is: the sum of those tensors' sums (a NaN, an Inf, or +Inf and
    -Inf make a sum non-finite; the sums are stacked in the widest of their dtypes). A non-finite probe proves nothing (a sum may overflow): the
    caller then asks each tensor exactly. Each sum of a large tensor is placed right after the
    node that produces it (an output) or first reads it (a tangent), where the tensor is still
    in the cache: summing it there costs a fraction of a pass over it from memory after the
    product (on one CPU thread, 14 µs against 229 µs for a 1 MiB tensor). Tensors of fewer than
    :data:`hessfast.vectors.SMALL` entries are summed together at the end by one
    ``_foreach_norm`` (their 1-norms: finite exactly when the entries are). Returns whether a
    probe was added (``False``: nothing to probe, or a tensor that is not real floating point,
    which the exact check then reads)."""
    graph = gm.graph
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    out_node = nodes[-1]
    outs = out_node.args[0]
    if out_node.op != "output" or not isinstance(outs, (tuple, list)):
        return False
    # (anchor after which the tensor is read hot, tensor node), deduplicated
    targets: dict = {}
    for p in placeholders[first_tangent : first_tangent + n_tangents]:
        targets[p] = _first_read(p, order)
    for o in outs[1:]:
        if isinstance(o, torch.fx.Node):
            targets.setdefault(o, o)
    vals = [x.meta.get("val") for x in targets]
    if not all(isinstance(v, torch.Tensor) and v.dtype.is_floating_point for v in vals):
        return False  # (complex, integer or unknown: the exact check reads it)
    sums, small = [], []
    for (x, anchor), val in zip(targets.items(), vals):
        half = val.dtype in (torch.float16, torch.bfloat16)
        if val.numel() < SMALL and not half:
            small.append(x)
            continue
        with graph.inserting_after(anchor):
            kwargs = {"dtype": torch.float32} if half else {}
            sums.append(graph.call_function(torch.ops.aten.sum.default, (x,), kwargs))
    with graph.inserting_before(out_node):
        if small:
            norms = graph.call_function(torch.ops.aten._foreach_norm.Scalar, (small, 1))
            sums += [graph.call_function(operator.getitem, (norms, i)) for i in range(len(small))]
        if not sums:
            return False
        stacked = graph.call_function(torch.ops.aten.stack.default, (sums,))
        probe = graph.call_function(torch.ops.aten.sum.default, (stacked,))
    out_node.args = ((*outs, probe),)
    gm.recompile()
    return True


#: Ops that return a view of their first argument without reading it (:func:`_first_read`).
_VIEWS = frozenset(
    getattr(torch.ops.aten, name).default
    for name in ("t", "view", "_unsafe_view", "permute", "expand", "unsqueeze", "alias",
                 "detach")  # fmt: skip
) | {torch.ops.aten.select.int, torch.ops.aten.slice.Tensor, torch.ops.aten.squeeze.dim,
     torch.ops.aten.transpose.int, torch.ops.aten.reshape.default}  # fmt: skip


def _first_read(x: torch.fx.Node, order: dict) -> torch.fx.Node:
    """The first node (in ``order``) that reads ``x``'s memory, through the views of it (a
    transpose or reshape before a matmul reads nothing); ``x`` itself if none does."""
    best, stack = None, list(x.users)
    while stack:
        n = stack.pop()
        if n.op == "call_function" and n.target in _VIEWS:
            stack += n.users
        elif n.op != "output" and (best is None or order[n] < order[best]):
            best = n
    return x if best is None else best


class Direct:
    """A traced graph's generated code with every op called through its C++ entry point
    (``OpOverload._op``, bound once as a global) instead of ``torch.ops.<ns>.<op>.<overload>(...)``:
    per node, that spelling costs four attribute lookups and the Python ``OpOverload.__call__``
    frame, 5–10% of a CPU product of a few thousand nodes. Ops whose ``__call__`` does more than
    forward to ``_op`` (a Python dispatcher) keep it. ``graph`` and ``code`` are the module's."""

    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.graph = gm.graph
        code = gm.code
        scope = dict(type(gm).forward.__globals__)
        entries: dict[str, Any] = {}
        for node in gm.graph.nodes:
            op = node.target
            if node.op == "call_function" and isinstance(op, torch._ops.OpOverload):
                if getattr(op, "_pyobj_dispatcher", None) is None:
                    entries[_qualified_name(op)] = op._op
        for i, (name, entry) in enumerate(entries.items()):
            alias = f"_hessfast_op{i}"
            code = code.replace(f"{name}(", f"{alias}(")
            scope[alias] = entry
        self.code = code
        exec(compile(code, f"<hessfast traced graph {id(gm):x}>", "exec"), scope)
        self._forward = scope["forward"]

    def __call__(self, *args):
        return self._forward(self.gm, *args)


def _qualified_name(op: Any) -> str:
    from torch.fx.node import _get_qualified_name

    return _get_qualified_name(op)


def lookup(
    program: Program,
    param_names: frozenset[str],
    values: dict[str, Any],
    tangents: dict[str, torch.Tensor] | None,
    k: int,
    loss_rule: Any,
    mode: str,
    compile: str | None,
    loss_parts: tuple,
    grads: bool = True,
) -> Trace | None:
    """The (cached) trace of this product, traced now if it is due; ``None`` while the signature
    is still interpreted (its first :data:`TRACE_AFTER` products under ``compile=None``).
    ``loss_parts``: :func:`_split_loss` of ``loss_rule``; tracing reads ``values`` detached."""
    cache = _traces(program)
    key = _key(param_names, values, tangents, k, loss_rule, mode, compile, loss_parts, grads)
    trace = cache.get(key)
    if isinstance(trace, Trace) and next(reversed(cache.values())) is trace:
        return trace  # the most recently used already: the key is hashed once
    trace = cache.pop(key, None)
    if isinstance(trace, int):  # interpreted products so far
        if compile is None and trace < TRACE_AFTER:
            cache[key] = trace + 1
            return None
        trace = None
    elif trace is None and compile is None and TRACE_AFTER > 0:
        cache[key] = 1
        return None
    if trace is None:
        plain = detached(values)
        trace = _trace(
            program, param_names, plain, tangents, k, loss_rule, mode, compile, loss_parts, grads
        )
        while len(cache) >= MAX_TRACES:
            cache.pop(next(iter(cache)))
        if trace.reason is not None:
            log.info("hessfast: this product runs the interpreter: %s", trace.reason)
    cache[key] = trace  # most recently used last
    return trace


def detached(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every tensor detached: what the interpreter and tracing read (a replay
    reads the tensors as they are, under ``no_grad``).

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> out = detached({"w": w, "n": 3})
        >>> out["w"].requires_grad, out["n"]
        (False, 3)
    """
    return {n: x.detach() if isinstance(x, torch.Tensor) else x for n, x in values.items()}


def run(
    program: Program,
    param_names: frozenset[str],
    values: dict[str, Any],
    tangents: dict[str, torch.Tensor] | None,
    k: int,
    loss_rule: Any,
    mode: str,
    compile: str | None = None,
    grads: bool = True,
    before: Callable[[], None] | None = None,
) -> engine.Result:
    """One product like :func:`hessfast.engine.run`, through its traced graph (see the module
    docstring for ``compile``). ``values`` may hold tensors that require grad (parameters): a
    replay runs under ``no_grad``, everything else on detached copies. ``before`` (a check of
    the inputs, e.g. that ``v`` is finite) is called before anything but a replay of a checked
    trace runs: the interpreter, tracing, a trace's first replay (which a bad input must not
    retire); the result of a replay is left to the caller to check together with the inputs.

    Example:
        >>> import torch, torch.nn.functional as F, hessfast
        >>> from hessfast import capture, losses
        >>> model, x, y = torch.nn.Linear(3, 2), torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
        >>> prog = capture.capture(model, (x,))
        >>> values = dict(prog.state(model)) | dict(zip(prog.user_inputs, (x,)))
        >>> res = run(prog, frozenset({"weight", "bias"}), values, None, 0,
        ...           losses.resolve(F.cross_entropy, y), "grad")
        >>> torch.allclose(res.grads["weight"], hessfast.grad(model, F.cross_entropy, x, y)["weight"])
        True
    """
    check_mode(compile)
    custom = isinstance(loss_rule, FuncLoss)
    loss_rule = lower_loss.lower(loss_rule, program.output.meta.get("val"))

    def interpret():
        if before is not None:
            before()
        return engine.run(
            program, param_names, detached(values), tangents, k, loss_rule, mode, grads=grads
        )

    if compile == "interpret":
        return interpret()
    if isinstance(loss_rule, FuncLoss) and loss_rule.call_signature is None:
        # a custom loss that cannot be recorded on meta tensors: what it reads cannot be keyed,
        # so a graph could replay stale Python state; the interpreter calls it afresh
        if compile is not None:
            raise RuntimeError(
                f"compile={compile!r} needs a traced product, and this custom loss_fn cannot be "
                "recorded on meta tensors (it holds a tensor on a real device or reads a value "
                "on the host), so its state cannot be keyed; use compile=None (which interprets "
                "it) instead"
            )
        return interpret()
    if compile == "cudagraphs":
        dev = next((x.device for x in values.values() if isinstance(x, torch.Tensor)), None)
        if dev is None or dev.type != "cuda":
            raise ValueError(
                "compile='cudagraphs' replays CUDA graphs and needs the model and data on a CUDA "
                "device; use compile=None or 'inductor' on the CPU"
            )
    whole_v = True  # every tangent is a graph input (the probe then vouches for v)
    if tangents is not None:
        active = program.active_params(param_names)
        whole_v = len(active) == len(tangents)
        tangents = dict(zip(active, map(tangents.__getitem__, active)))
    loss_parts = _split_loss(loss_rule)
    trace = lookup(
        program, param_names, values, tangents, k, loss_rule, mode, compile, loss_parts, grads
    )
    if trace is None:
        return interpret()
    if trace.fn is None:
        if compile is not None:
            raise RuntimeError(
                f"compile={compile!r} needs a traced product, and this one cannot be traced "
                f"({trace.reason}); use compile=None (which interprets it) instead"
            )
        res = interpret()
        res.trace = trace
        return res
    leaves, _, tensor_idx = loss_parts
    flat = [x for x in values.values() if isinstance(x, torch.Tensor)]
    if tangents is not None:
        flat += tangents.values()
    flat += [leaves[i] for i in tensor_idx]
    if trace.calls == 0:
        if before is not None:
            before()
        args = (program, param_names, detached(values), tangents, k, loss_rule, mode, compile)
        res = _first_call(trace, flat, *args, grads)
        res.trace = trace
        return res
    trace.calls += 1
    with torch.no_grad():
        out = trace.fn(*flat)
    grads, prods = unpack(trace, out)
    res = engine.Result(out[0], grads, prods, trace.fallback_ops, trace)
    # the probe vouches for v only when every tangent was a graph input
    if trace.probe and whole_v:
        res.probe = out[-1]
        res.flat, res.active = flat, None if tangents is None else list(tangents)
        if custom:  # what hessfast.replay compares after lowering the callable again
            res.loss_key, res.n_loss = loss_key(loss_rule, loss_parts), len(tensor_idx)
    return res


def out_indices(trace: Trace) -> tuple[dict | None, dict | None]:
    """``(gradients, products)``: the position of each name's tensor in a replay's flat outputs
    (the loss first, then the gradients, the products, and the probe last when there is one),
    ``None`` where the product kind has none."""
    gnames, pnames = trace.layout
    grads = prods = None
    i = 1
    if gnames is not None:
        grads = {n: i + j for j, n in enumerate(gnames)}
        i += len(gnames)
    if pnames is not None:
        prods = {n: i + j for j, n in enumerate(pnames)}
    return grads, prods


def unpack(trace: Trace, out: Any) -> tuple[dict | None, dict | None]:
    """``(gradients, products)`` by name from a replay's flat outputs (:func:`out_indices`),
    ``None`` where the product kind has none."""
    return tuple(
        None if idx is None else {n: out[i] for n, i in idx.items()} for idx in out_indices(trace)
    )  # type: ignore[return-value]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _first_call(
    trace, flat, program, param_names, values, tangents, k, loss_rule, mode, compile, grads
):
    """A trace's first replay, checked against the interpreter on the same inputs: tracing ran on
    fake tensors, whose strides or kernels can differ from the real ones. A replay that raises or
    disagrees beyond the dtype's tolerance retires the trace (the signature is interpreted from
    now on, the reason kept); the interpreter's result is returned either way. Inputs on which
    the interpreter's result is not finite (a NaN or Inf in the data) cannot judge the trace: it
    is left for the next product's first replay."""
    ref = engine.run(program, param_names, values, tangents, k, loss_rule, mode, grads=grads)
    want = [
        ref.loss,
        *((ref.grads or {}).values() if grads else ()),
        *(ref.products or {}).values(),
    ]
    if not all(bool(torch.isfinite(b).all()) for b in want if isinstance(b, torch.Tensor)):
        return ref
    t0 = time.perf_counter()
    try:
        with torch.no_grad():  # as every replay (:func:`run`)
            out = list(trace.fn(*flat))
    except Exception as e:
        trace.fn = None
        trace.reason = f"the traced graph failed on real tensors ({type(e).__name__}: {e})"[:400]
        if compile is not None:
            raise RuntimeError(f"compile={compile!r}: {trace.reason}") from e
        log.info("hessfast: this product runs the interpreter: %s", trace.reason)
        return ref
    if trace.compile_seconds == 0.0:
        trace.compile_seconds = time.perf_counter() - t0
    if trace.probe:
        probe = out.pop()
        if not math.isfinite(probe.item()):  # the outputs are finite: an overflow
            log.info("hessfast: this product's finiteness probe overflows; checked exactly")
    errors = [_rel(a, b) for a, b in zip(out, want) if isinstance(b, torch.Tensor)]
    rtol = TOLERANCES.get(ref.loss.dtype, 1e-2)
    worst = next((e for e in errors if not e <= rtol), max(errors, default=0.0))  # NaN first
    if len(out) != len(want) or not worst <= rtol:
        trace.fn = None
        trace.reason = (
            f"the traced graph disagreed with the interpreter (relative error {worst:.2e} > "
            f"{rtol:g})"
        )
        log.warning("hessfast: this product runs the interpreter: %s", trace.reason)
        return ref
    trace.calls += 1
    return ref


def traces(program: Program) -> list[Trace]:
    """The traces cached for ``program``, least recently used first (benchmarks replay them)."""
    return [t for t in _traces(program).values() if isinstance(t, Trace)]


def explain(program: Program) -> list[dict]:
    """Every trace cached for ``program``: mode, K, nodes, trace and compile seconds, calls, and
    why a signature runs the interpreter (``reason``)."""
    return [
        {
            "mode": key[0],
            "k": key[1],
            "compile": key[6],
            "grads": key[-1],
            "traced": t.fn is not None,
            "reason": t.reason,
            "nodes": t.nodes,
            "trace_seconds": t.trace_seconds,
            "compile_seconds": t.compile_seconds,
            "calls": t.calls,
        }
        for key, t in _traces(program).items()
        if isinstance(t, Trace)
    ]
