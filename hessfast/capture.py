"""Capture: ``torch.export`` (training IR, ``strict=False``) once per input signature, then replay.

A :class:`Program` is the exported graph, functionalised (in-place ops made out-of-place, a tensor
mutated in ``forward`` read with its mutated value, nothing written back to buffers, parameters or
inputs; :func:`functionalize`), with its placeholders classified (parameter, buffer, constant,
user input), every call normalised to schema order, and the checks that must run before any number
is computed (dropout in training mode). :func:`capture` caches programs per model and input
signature, guarded by a :func:`fingerprint` of what export specialised on (Python attributes,
hooks, modes); :meth:`Program.plan` adds the activity analysis for one parameter subset, in which
whatever autograd treats as constant (``detach``, ``torch.no_grad()`` regions) is inactive.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.export.graph_signature import OutputKind
from torch.nn.modules import module as _nn_module
from torch.utils import _pytree as pytree

from .errors import CaptureError, DropoutError
from .fusion import fuse_rms_norm
from .rules.base import normalize_args

aten = torch.ops.aten

#: Ops whose output does not depend on the values of their tensor inputs: never active.
VALUE_INDEPENDENT = {
    aten.ones_like,
    aten.zeros_like,
    aten.empty_like,
    aten.full_like,
    aten.rand_like,
    aten.randn_like,
    aten.new_zeros,
    aten.new_ones,
    aten.new_empty,
    aten.new_full,
    aten.detach,
    aten.sym_size,
    aten.sym_numel,
    aten.sym_stride,
    aten._assert_tensor_metadata,
}

_DROPOUT = {
    aten.dropout,
    aten.native_dropout,
    aten.feature_dropout,
    aten.alpha_dropout,
    aten.feature_alpha_dropout,
}

#: How many times :func:`capture` has called ``torch.export`` (tests check the cache with it).
EXPORT_COUNT = 0


@dataclass
class Step:
    """One ``call_function`` node, ready to evaluate."""

    node: torch.fx.Node
    op: Any
    args: tuple  # schema-ordered; fx Nodes where values come from other nodes
    is_float_out: bool
    module: str  # the nn.Module path the node came from, for error messages


@dataclass
class Program:
    """One exported model at one input signature."""

    graph_module: torch.fx.GraphModule
    steps: list[Step]
    params: dict[str, str]  # placeholder name -> canonical parameter name
    buffers: dict[str, str]  # placeholder name -> buffer FQN
    constants: dict[str, torch.Tensor]  # placeholder name -> lifted constant
    user_inputs: list[str]  # placeholder names in flattened input order
    output: torch.fx.Node  # the model output node the loss reads
    in_spec: Any = None  # pytree spec of (args, kwargs) the placeholders flatten
    out_spec: Any = None  # pytree spec of what forward returns (None: one tensor)
    _plans: dict = field(default_factory=dict)
    _active: dict = field(default_factory=dict)
    _last_uses: dict | None = None
    _state: list | None = None
    _state_of: Any = None  # the fingerprint _state was looked up under
    fingerprint: Any = None  # the fingerprint :func:`capture` matched last

    def state(self, model: nn.Module) -> list[tuple[str, torch.Tensor]]:
        """``(placeholder, tensor)`` of the model's parameters and buffers this program reads,
        looked up by name once per fingerprint: a program belongs to one model and is reused
        only while the model holds the same parameter and buffer objects (:func:`fingerprint`),
        so the objects (whose ``.data`` may change) are kept, not the names."""
        if self._state is None or self._state_of is not self.fingerprint:
            self._state_of = self.fingerprint
            self._state = [(ph, model.get_parameter(n)) for ph, n in self.params.items()] + [
                (ph, model.get_buffer(n)) for ph, n in self.buffers.items()
            ]
        return self._state

    def last_uses(self) -> dict[int, list[str]]:
        """Step index -> names of the nodes whose last forward use is that step (freed after it)."""
        if self._last_uses is None:
            last: dict[str, int] = {}
            for i, s in enumerate(self.steps):
                for n in s.node.all_input_nodes:
                    last[n.name] = i
            out: dict[int, list[str]] = {}
            for name, i in last.items():
                if name != self.output.name:
                    out.setdefault(i, []).append(name)
            self._last_uses = out
        return self._last_uses

    def active_params(self, param_names: frozenset[str]) -> list[str]:
        """The names of the parameters in ``param_names`` that :meth:`plan` makes active (the
        ones that get a tangent), in placeholder order; made once per subset."""
        names = self._active.get(param_names)
        if names is None:
            plan = self.plan(param_names)
            names = self._active[param_names] = [
                n for ph, n in self.params.items() if plan.get(ph, False)
            ]
        return names

    def plan(self, param_names: frozenset[str]) -> dict[str, bool]:
        """Activity analysis: node name -> whether it depends on the parameters in the subset.

        What autograd treats as a constant is inactive here, so it gets neither a tangent nor a
        cotangent (docs/architecture.md §2.3): ``detach``, and everything computed with gradients disabled
        (a ``torch.no_grad()`` region of ``forward``, which export wraps in a
        ``wrap_with_set_grad_enabled(False, ...)`` call, or bare ``_set_grad_enabled`` calls).
        """
        plan = self._plans.get(param_names)
        if plan is None:
            plan = {ph: (p in param_names) for ph, p in self.params.items()}
            grad_on = True
            for s in self.steps:
                if s.op is torch._C._set_grad_enabled:
                    grad_on = bool(s.args[0]) if s.args else True
                    plan[s.node.name] = False
                    continue
                if not grad_on or not s.is_float_out or s.op in VALUE_INDEPENDENT:
                    plan[s.node.name] = False
                    continue
                if getattr(s.op, "overloadpacket", None) in VALUE_INDEPENDENT:
                    plan[s.node.name] = False
                    continue
                if _grad_disabled_region(s.node):
                    plan[s.node.name] = False
                    continue
                plan[s.node.name] = any(plan.get(n.name, False) for n in s.node.all_input_nodes)
            self._plans[param_names] = plan
        return plan


_GRAD_HOP = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)


def _grad_disabled_region(node: fx.Node) -> bool:
    """Whether ``node`` is a ``torch.no_grad()`` region as export captures it."""
    return (
        _GRAD_HOP is not None
        and node.op == "call_function"
        and node.target is _GRAD_HOP
        and node.args[0] is False
    )


def _is_float_meta(val: Any) -> bool:
    if isinstance(val, torch.Tensor):
        return val.is_floating_point()
    if isinstance(val, (tuple, list)):
        return any(_is_float_meta(v) for v in val)
    return False


def _module_path(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "<model>"
    path, cls = list(stack.values())[-1]
    cls_name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return f"{path or '<model>'} ({cls_name.split('.')[-1]})"


def _check_dropout(step: Step) -> None:
    packet = getattr(step.op, "overloadpacket", None)
    p = train = None
    if packet in _DROPOUT:
        p, train = step.args[1], step.args[2]
    elif packet is aten.scaled_dot_product_attention:
        p, train = step.args[4], True
    if train and isinstance(p, (int, float)) and p > 0:
        raise DropoutError(
            f"dropout with p={p} is active in training mode at {step.module}: a Hessian of a "
            "randomly masked loss is not what you want. Call model.eval() before asking for "
            "curvature (BatchNorm then uses its running statistics), or set the dropout "
            "probability to 0."
        )


# --- functionalisation (docs/architecture.md §2.3: mutation is functionalised, never skipped) -------------


def _is_mutating(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _written(node: fx.Node) -> list[Any]:
    """The arguments an in-place op writes to."""
    schema = node.target._schema
    out = []
    for i, a in enumerate(schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            if i < len(node.args):
                out.append(node.args[i])
            elif a.name in node.kwargs:
                out.append(node.kwargs[a.name])
    return out


def _called_graphs(gm: fx.GraphModule, node: fx.Node) -> list[fx.GraphModule]:
    """The sub-graphs a higher-order op node calls (``get_attr`` arguments)."""
    subs = []
    for a in node.args:
        if isinstance(a, fx.Node) and a.op == "get_attr":
            sub = getattr(gm, a.target, None)
            if isinstance(sub, fx.GraphModule):
                subs.append(sub)
    return subs


def _mutations(gm: fx.GraphModule) -> list[fx.Node]:
    """Every in-place op in ``gm`` and in the sub-graphs its higher-order ops call."""
    out = []
    for n in gm.graph.nodes:
        if _is_mutating(n):
            out.append(n)
        elif n.op == "call_function" and not hasattr(n.target, "_schema"):
            for sub in _called_graphs(gm, n):
                out += _mutations(sub)
    return out


def _drop_unread_buffer_updates(gm: fx.GraphModule, buffers: set[str]) -> None:
    """Erase in-place updates of buffers that nothing reads (``num_batches_tracked += 1`` in a
    training-mode BatchNorm): a product never updates buffers, and no value depends on them."""
    for n in list(gm.graph.nodes):
        if not _is_mutating(n) or n.users:
            continue
        written = _written(n)
        if written and all(
            isinstance(a, fx.Node)
            and a.op == "placeholder"
            and a.name in buffers
            and all(_is_mutating(u) and not u.users for u in a.users)
            for a in written
        ):
            gm.graph.erase_node(n)


def _detach_no_grad_outputs(gm: fx.GraphModule) -> None:
    """Put an ``aten.detach`` after every output of a ``torch.no_grad()`` region (recursively):
    functionalisation inlines the regions, and the detach is what keeps their values constant."""
    graph = gm.graph
    for n in list(graph.nodes):
        if n.op != "call_function" or hasattr(n.target, "_schema"):
            continue
        for sub in _called_graphs(gm, n):
            _detach_no_grad_outputs(sub)
        if not _grad_disabled_region(n):
            continue
        for u in list(n.users):
            if u.target is not operator.getitem or not _is_float_meta(u.meta.get("val")):
                continue
            with graph.inserting_after(u):
                d = graph.call_function(aten.detach.default, (u,))
            d.meta = dict(u.meta)
            u.replace_all_uses_with(d, delete_user_cb=lambda user, d=d: user is not d)
    gm.recompile()


_BN_FUNCTIONAL = {
    aten._native_batch_norm_legit_functional.default: "functional",
    aten._native_batch_norm_legit_no_training.default: "no_training",
    aten._native_batch_norm_legit.no_stats: "no_stats",
}


def _restore_batch_norm(graph: fx.Graph) -> None:
    """Functionalisation lowers ``aten.batch_norm`` (it updates the running statistics in place)
    to ``_native_batch_norm_legit*``: put the training-IR op back, which the batch-norm rule
    handles. The updated running statistics are dropped (a product never writes buffers)."""
    for n in list(graph.nodes):
        kind = _BN_FUNCTIONAL.get(n.target) if n.op == "call_function" else None
        if kind is None:
            continue
        outs = {u.args[1]: u for u in n.users if u.target is operator.getitem}
        if len(outs) != len(n.users) or any(outs[i].users for i in (1, 2) if i in outs):
            continue  # the saved statistics are read: leave the node as it is
        args = normalize_args(n.target, n.args, n.kwargs)
        if kind == "functional":
            x, w, b, rm, rv, training, momentum, eps = args
        elif kind == "no_training":
            (x, w, b, rm, rv, momentum, eps), training = args, False
        else:
            (x, w, b, training, momentum, eps), rm, rv = args, None, None
        if 0 in outs:
            with graph.inserting_before(n):
                bn = graph.call_function(
                    aten.batch_norm.default, (x, w, b, rm, rv, training, momentum, eps, False)
                )
            bn.meta = dict(outs[0].meta)
            outs[0].replace_all_uses_with(bn)
        for i, u in outs.items():
            if i in (3, 4):  # the new running statistics: the buffers keep their values
                u.replace_all_uses_with(rm if i == 3 else rv)
        for u in outs.values():
            graph.erase_node(u)
        graph.erase_node(n)


def _rewrite_copies(graph: fx.Graph) -> None:
    """``aten.copy(self, src)`` (a functionalised ``self.copy_(src)``, e.g. ``h[:, 0] = v``) is
    ``src`` broadcast to ``self``'s shape, dtype and device; ``self``'s value does not matter.
    Written that way, because torch's forward-mode AD has no formula for ``aten.copy``."""
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target is not aten.copy.default:
            continue
        dst, src = n.args[0], n.args[1]
        dv, sv = dst.meta.get("val"), _meta(src)
        if not isinstance(dv, torch.Tensor):
            continue
        with graph.inserting_before(n):
            if not isinstance(src, fx.Node):
                new = graph.call_function(
                    aten.full.default,
                    (list(dv.shape), src),
                    {"dtype": dv.dtype, "device": dv.device},
                )
            else:
                new = src
                if sv is None or tuple(sv.shape) != tuple(dv.shape):
                    new = graph.call_function(aten.expand.default, (new, list(dv.shape)))
                    new.meta = dict(n.meta)
                if sv is None or sv.dtype != dv.dtype or sv.device != dv.device:
                    new = graph.call_function(
                        aten._to_copy.default, (new,), {"dtype": dv.dtype, "device": dv.device}
                    )
            if new is src:
                new = graph.call_function(aten.clone.default, (src,))
        new.meta = dict(n.meta)
        n.replace_all_uses_with(new)
        graph.erase_node(n)


def _meta(a: Any) -> torch.Tensor | None:
    val = a.meta.get("val") if isinstance(a, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _renormed_embeddings(graph: fx.Graph) -> None:
    """``nn.Embedding(max_norm=...)``: torch renormalises the looked-up rows of the weight in
    place through a detached alias, then reads the weight. Functionalised, the lookup reads
    ``embedding_renorm(detach(W))``, right in value but constant for autograd. Give the readers
    ``W + (renormed − detach(W))`` instead: the renormalised values, with the tangent and the
    cotangent of ``W`` itself, as torch's gradient has them. The weight is never written."""
    base_of: dict[fx.Node, fx.Node] = {}
    for n in list(graph.nodes):
        if n.op != "call_function" or n.target is not aten.embedding_renorm.default:
            continue
        src = n.args[0]
        if not (isinstance(src, fx.Node) and src.target is aten.detach.default):
            raise CaptureError(
                "embedding_renorm (nn.Embedding with max_norm) of a tensor that is not a "
                "detached weight: hessfast cannot tell what it renormalises"
            )
        base = src.args[0]
        base = base_of.get(base, base)
        base_of[n] = base
        readers = [u for u in n.users if u.op != "output" and not _is_renorm_input(u, n)]
        if not readers:
            continue
        with graph.inserting_after(n):
            d = graph.call_function(aten.detach.default, (base,))
        with graph.inserting_after(d):
            delta = graph.call_function(aten.sub.Tensor, (n, d))
        with graph.inserting_after(delta):
            eff = graph.call_function(aten.add.Tensor, (base, delta))
        for new in (d, delta, eff):
            new.meta = dict(n.meta)
        for u in readers:
            u.replace_input_with(n, eff)


def _is_renorm_input(user: fx.Node, renorm: fx.Node) -> bool:
    """``user`` is the ``detach`` feeding a later ``embedding_renorm`` (the next lookup)."""
    return user.target is aten.detach.default and all(
        u.target is aten.embedding_renorm.default for u in user.users
    )


def functionalize(ep: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The exported program with every in-place op made out-of-place (docs/architecture.md §2.3).

    Unread buffer updates are dropped. If other mutations remain (``relu_``, ``out += x``,
    ``w[0] = 0`` on a tensor built in ``forward``, a buffer written and read, ...), the program
    goes through torch's functionalisation (``run_decompositions`` with an empty table, which
    keeps the training-IR ops), a tensor mutated in ``forward`` and read later keeps its mutated
    value, and the results written back to buffers, parameters or inputs are dropped. Programs
    without mutation are returned as exported."""
    gm = ep.graph_module
    _drop_unread_buffer_updates(gm, set(ep.graph_signature.inputs_to_buffers))
    if not _mutations(gm):
        gm.graph.lint()
        gm.recompile()
        return ep
    _detach_no_grad_outputs(gm)
    ep = ep.run_decompositions(decomp_table={})
    gm = ep.graph_module
    graph = gm.graph
    out = next(n for n in graph.nodes if n.op == "output")
    specs = ep.graph_signature.output_specs
    keep = [o for o, spec in zip(out.args[0], specs) if spec.kind == OutputKind.USER_OUTPUT]
    out.args = (tuple(keep),)  # written-back buffers, parameters and inputs: not ours to write
    _restore_batch_norm(graph)
    _rewrite_copies(graph)
    _renormed_embeddings(graph)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    left = _mutations(gm)
    if left:
        raise CaptureError(
            f"in-place op {left[0].target} could not be made out-of-place; rewrite it in "
            "out-of-place form (e.g. y = x.relu() instead of x.relu_())"
        )
    return ep


def choose_output(out_spec: Any, output: str | int | None, custom_loss: bool) -> tuple[int, Any]:
    """Which leaf of a model output structured as ``out_spec`` the loss reads, as
    ``(leaf index, rebuild)``: ``rebuild`` is ``out_spec`` when the loss is to receive the output
    rebuilt around that leaf (a custom ``loss_fn`` of a model returning a container with one tensor:
    exactly what ``loss_fn(model(x), y)`` sees), else ``None`` (the loss receives the tensor).

    ``output``: a key (``"logits"``) or an index into the returned dict, ``ModelOutput``, tuple or
    list; ``None`` takes a lone tensor, else the ``logits`` entry when there is one (closed-form
    losses only: a custom loss over several returned tensors must say which one it reads).
    """
    n = out_spec.num_leaves
    if out_spec.is_leaf():
        if output is not None:
            raise ValueError(f"output={output!r}: the model returns one tensor; drop output=")
        return 0, None
    tree = pytree.tree_unflatten(list(range(n)), out_spec)
    what = f"{type(tree).__name__} of {n} tensor{'s' if n != 1 else ''}"
    if output is not None:
        try:
            idx = tree[output]
        except (KeyError, IndexError, TypeError) as e:
            keys = list(tree.keys()) if hasattr(tree, "keys") else list(range(len(tree)))
            raise ValueError(
                f"output={output!r}: the model returns a {what} with entries {keys}"
            ) from e
        if not isinstance(idx, int):
            raise ValueError(f"output={output!r} selects a {type(idx).__name__}, not a tensor")
        return idx, None
    if n == 1:
        return 0, (out_spec if custom_loss else None)
    if hasattr(tree, "keys") and "logits" in tree.keys() and not custom_loss:
        return tree["logits"], None
    raise ValueError(
        f"the model returns a {what}: pass output= (a key such as 'logits', or an index) to say "
        "which tensor the loss reads; the loss then receives that tensor"
    )


def _build(
    ep: torch.export.ExportedProgram, model: nn.Module, output=None, custom_loss=False
) -> Program:
    sig = ep.graph_signature
    lifted = getattr(sig, "inputs_to_lifted_custom_objs", {})
    if lifted:
        kinds = sorted({type(ep.constants.get(n)).__name__ for n in lifted.values()})
        raise CaptureError(
            f"forward creates an object export lifts into a graph input ({', '.join(kinds)}, "
            "e.g. a torch.Generator made inside forward), whose state a replayed graph cannot "
            "reproduce call after call"
        )
    canonical = {id(p): n for n, p in model.named_parameters(remove_duplicate=True)}
    params = {}
    for ph, fqn in sig.inputs_to_parameters.items():
        params[ph] = canonical.get(id(model.get_parameter(fqn)), fqn)
    buffers = dict(sig.inputs_to_buffers)
    constants = {
        ph: ep.constants[name] for ph, name in sig.inputs_to_lifted_tensor_constants.items()
    }
    gm = ep.graph_module
    fuse_rms_norm(gm)  # decomposed RMSNorm chains -> aten.rms_norm (hessfast/fusion.py)
    steps = []
    output_node = None
    user_outputs = list(sig.user_outputs)
    for node in gm.graph.nodes:
        if node.op == "call_function":
            op = node.target
            if hasattr(op, "_schema"):
                args = normalize_args(op, node.args, node.kwargs)
                if op.overloadpacket is aten.batch_norm and args[5]:
                    # training mode uses batch statistics; dropping the running statistics
                    # from the call is what keeps every evaluation free of buffer updates
                    args = (*args[:3], None, None, *args[5:])
            else:  # operator.getitem, higher-order ops: kwargs stay on the node
                args = node.args
            # without a recorded value (some higher-order ops) assume a float output: the node is
            # then differentiated (or refused with a clear error), never silently held constant
            val = node.meta.get("val", torch.empty(0))
            step = Step(node, op, tuple(args), _is_float_meta(val), _module_path(node))
            _check_dropout(step)
            steps.append(step)
        elif node.op == "output":
            outs = node.args[0]
            names = [o.name if isinstance(o, torch.fx.Node) else None for o in outs]
            out_spec = ep.call_spec.out_spec
            if out_spec is None or out_spec.num_leaves != len(user_outputs):
                out_spec = pytree.tree_flatten(0)[1] if len(user_outputs) == 1 else None
            if out_spec is None:
                raise ValueError(
                    f"the model returns {len(user_outputs)} outputs; wrap the model so that "
                    "forward returns the tensor the loss reads"
                )
            leaf, _ = choose_output(out_spec, output, custom_loss)
            chosen = user_outputs[leaf]
            idx = names.index(chosen) if chosen in names else len(outs) - 1
            output_node = outs[idx]
            if not isinstance(output_node, torch.fx.Node):
                raise ValueError("the model output is not a tensor computed by the model")
    return Program(
        gm,
        steps,
        params,
        buffers,
        constants,
        list(sig.user_inputs),
        output_node,
        ep.call_spec.in_spec,
        None if out_spec.is_leaf() else out_spec,
    )


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: Programs kept per model (least recently used dropped first): input signatures times the
#: states of its Python attributes seen recently.
MAX_PROGRAMS_PER_MODEL = 16


def hashable_spec(spec: Any) -> Any:
    """A pytree spec as a dictionary key: the spec itself where it hashes (cheap), else its
    text."""
    try:
        hash(spec)
    except TypeError:
        return str(spec)
    return spec


def signature(inputs: tuple) -> tuple:
    """What a program is specialised on in ``(args, kwargs)``: the pytree structure, each tensor's
    shape, dtype and device, each other leaf's type and ``repr``. Positional plain tensors and no
    keyword arguments (the common call, on every product) skip the pytree walk.

    Example:
        >>> a = signature(((torch.ones(2, 3),), {}))
        >>> a == signature(((torch.zeros(2, 3),), {})), a == signature(((torch.ones(3, 2),), {}))
        (True, False)
    """
    args, kwargs = inputs
    if not kwargs and type(args) is tuple and all(type(x) is torch.Tensor for x in args):
        return ("tensors", tuple([(x.shape, x.dtype, x.device) for x in args]))
    leaves, spec = pytree.tree_flatten(inputs)
    parts = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            parts.append(("T", x.shape, x.dtype, x.device))
        else:
            parts.append(("V", type(x).__name__, repr(x)))
    return (hashable_spec(spec), tuple(parts))


# --- the guard: what forward can read that export specialised on (docs/architecture.md §2.3) -------------

#: ``nn.Module.__dict__`` entries that are not user attributes (parameters, buffers, submodules
#: and the forward hooks are fingerprinted on their own; the rest do not change forward).
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)
_GLOBAL_HOOKS = tuple(
    getattr(_nn_module, name)
    for name in (
        "_global_forward_hooks",
        "_global_forward_hooks_with_kwargs",
        "_global_forward_hooks_always_called",
        "_global_forward_pre_hooks",
    )
    if hasattr(_nn_module, name)
)
_ATOMS = (int, float, bool, str, bytes, complex, type(None), torch.dtype, torch.device, tuple)
_HELD = (torch.Tensor, nn.Module)


def _contents(v: Any, depth: int = 0) -> Any:
    """What an in-place change of a mutable attribute value would change: the items of a list,
    dict or set (recursively, to a small depth), the ``__dict__`` of another object (a config,
    say). Identity is compared first, so equality of the values only runs where something was
    rebound. Type tests are exact (``isinstance`` on a Hugging Face config is slow)."""
    t = type(v)
    if t is list or t is dict or t is set:
        if depth >= 3:
            return None
        items = v.items() if t is dict else enumerate(v) if t is list else ()
        inner = tuple(
            (k, _contents(x, depth + 1))
            for k, x in items
            if _KINDS.get(type(x)) != 0 and not isinstance(x, _ATOMS)
        )
        return (t(v), inner)
    if _KINDS.get(t) in (0, 1, 2) or callable(v):
        return None
    d = getattr(v, "__dict__", None)
    return dict(d) if type(d) is dict else None


#: type -> 0 (immutable value), 1 (module), 2 (tensor), 3 (mutable: its contents are compared).
#: Looked up by exact type: ``isinstance`` on some objects (Hugging Face configs) is slow.
_KINDS: dict[type, int] = {}


def _kind(t: type) -> int:
    if issubclass(t, _ATOMS):
        return 0
    if issubclass(t, nn.Module):
        return 1
    if issubclass(t, torch.Tensor):
        return 2
    return 3


class Fingerprint:
    """What a captured program of a model specialised on (see :func:`fingerprint`). Holds
    references to the objects it saw, so identities stay valid; compared with ``==``."""

    __slots__ = ("parts",)

    def __init__(self, parts: tuple):
        self.parts = parts

    def __eq__(self, other: object) -> bool:
        if other is self:
            return True
        if not isinstance(other, Fingerprint):
            return NotImplemented
        try:
            return self.parts == other.parts
        except Exception:  # e.g. a rebound tensor attribute compared elementwise: a change
            return False

    __hash__ = None  # type: ignore[assignment]


_dict_of = operator.attrgetter("__dict__")
_chain = itertools.chain.from_iterable
_get = operator.itemgetter.__call__
#: the entries of a module's ``__dict__`` :func:`fingerprint` reads besides the user's attributes
_READ = ("training", "_parameters", "_buffers", "_modules", "_forward_hooks", "_forward_pre_hooks")


def _dict_version_reader():
    """CPython's per-dict modification tag (``ma_version_tag``, read by torch's guard module),
    or ``None`` where it is missing or does not behave as a tag: a new value on every change
    (CPython leaves it alone when an entry is rebound to the object it holds), the same value
    while nothing changes."""
    try:
        from torch._C._dynamo.guards import dict_version
    except ImportError:
        return None
    try:
        d: dict = {}
        a = dict_version(d)
        d["x"] = 1
        b = dict_version(d)
        d["x"] = 2
        c = dict_version(d)
        ok = len({a, b, c}) == 3 and dict_version(d) == c
    except Exception:
        return None
    return dict_version if ok else None


#: ``dict -> int``, changed by every modification of the dict (``None``: not available, and
#: :meth:`_Snapshot.unchanged` compares the dicts' lengths, keys and entries instead)
_dict_version = _dict_version_reader()


class _Snapshot:
    """Everything :func:`fingerprint` read of one model, kept so that the next call can tell
    cheaply that none of it changed (:meth:`unchanged`), and then return the same
    :class:`Fingerprint` object without walking the modules in Python.

    The full walk reads, per module, the training flag, the user's attributes and the
    ``_parameters``, ``_buffers``, ``_modules`` and forward hook dicts of ``__dict__``, every
    entry of those dicts, and the global hook dicts; tensor attributes' ``_version`` and the
    contents of mutable attribute values. The snapshot holds those dict objects, their lengths
    and keys (``__dict__``'s all), and the entries read, by identity (held, so identities stay
    valid). The same ``__dict__`` object per module, unchanged lengths and keys of every dict
    and the same objects in every entry read — compared in C, over all modules at once —, the
    same tensor versions and equal mutable contents mean every part of the full fingerprint is
    what it was. Anything else (including a value rebound to an equal but different object) is
    no proof, and :func:`fingerprint` walks the model again.

    Where CPython's dict modification tags can be read (:data:`_dict_version`), the tags come
    first: the same tag on every dict means none was changed since (CPython does not count
    rebinding an entry to the object it holds), which proves what the comparison does, and
    reads only the dict objects, not the key and value objects whose memory the comparison
    touches (read cold, as after a product has evicted the caches: 115 µs of tags against
    430 µs of comparisons on the small ResNet-18, one CPU thread). A changed tag is no
    disproof (an entry set to another object and back): the comparison then decides, and
    refreshes the tags when it finds nothing changed."""

    __slots__ = ("fp", "mods", "mod_dicts", "getters", "dicts", "subdicts", "lens", "keys",
                 "held", "tags", "tensors", "versions", "mutables", "contents")  # fmt: skip

    def __init__(self, fp, mods, user_keys, subdicts, tensors, mutables, contents):
        self.fp = fp
        # the model itself is not held (the snapshot is the value of a weak-keyed dict whose
        # key is the model): :meth:`unchanged` is given it
        self.mods = mods[1:]
        module_dicts = [m.__dict__ for m in mods]
        self.mod_dicts = tuple(module_dicts)  # held, compared by identity
        self.getters = [operator.itemgetter(*_READ, *keys) for keys in user_keys]
        self.dicts = dicts = module_dicts + subdicts
        self.subdicts = subdicts
        self.lens = tuple(map(len, dicts))
        self.keys = tuple(_chain(dicts))
        self.held = self._read(module_dicts)
        self.tags = None if _dict_version is None else tuple(map(_dict_version, dicts))
        self.tensors = tensors
        self.versions = tuple(t._version for t in tensors)
        self.mutables = mutables
        self.contents = contents

    def _read(self, module_dicts: list) -> tuple:
        return (
            *_chain(map(_get, self.getters, module_dicts)),
            *_chain(map(dict.values, self.subdicts)),
        )

    def unchanged(self, model: nn.Module) -> bool:
        """Whether every part of :attr:`fp` still holds for ``model`` (``False``: not proven)."""
        held = self.mod_dicts
        if model.__dict__ is not held[0] or False in map(
            operator.is_, map(_dict_of, self.mods), held[1:]
        ):
            return False
        dicts = self.dicts
        tags = None if self.tags is None else tuple(map(_dict_version, dicts))
        if tags is None or tags != self.tags:
            # written since (perhaps the same values again: ``model.eval()`` on every step)
            if tuple(map(len, dicts)) != self.lens or tuple(_chain(dicts)) != self.keys:
                return False
            try:
                now = self._read(held)
            except KeyError:
                return False
            if False in map(operator.is_, now, self.held):
                return False
            self.tags = tags
        # (the two reads below only where there is something to read: each costs a few µs cold)
        if self.tensors and tuple(t._version for t in self.tensors) != self.versions:
            return False
        return not self.mutables or all(
            _same(_contents(v), c) for v, c in zip(self.mutables, self.contents)
        )


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # a rebound tensor compared elementwise: a change
        return False


#: model -> the :class:`_Snapshot` of its last :func:`fingerprint`
_SNAPSHOTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fingerprint(model: nn.Module) -> Fingerprint:
    """What a captured program of ``model`` specialised on: every submodule (the module objects,
    their ``__dict__`` — training flag, plain-Python attributes, replaced methods —, parameter,
    buffer and submodule objects, forward hooks and pre-hooks, the contents of mutable attribute
    values such as lists, dicts and config objects) and the global forward hooks. A snapshot of
    shallow copies: cheap to take and to compare (identity first, values only where something
    was rebound). :func:`capture` compares it on every call, so a change re-captures, like
    ``torch.compile``'s guards.

    When nothing it read changed since the model's last fingerprint (:class:`_Snapshot`: the
    lengths, keys and value identities of every dict it read, compared in C), the same
    :class:`Fingerprint` object is returned without walking the modules again; a walk that
    finds the last fingerprint's state again also returns that object (the caches keyed on it
    then compare by identity).

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> a = fingerprint(lin)
        >>> a is fingerprint(lin), a == fingerprint(lin.eval()), a == fingerprint(lin.train())
        (True, False, True)
    """
    snap = _SNAPSHOTS.get(model)
    if snap is not None and snap.unchanged(model):
        return snap.fp
    parts: list = [tuple(dict(h) for h in _GLOBAL_HOOKS)]
    add = parts.append
    memo: dict = {}
    seen: set = set()
    stack = [model]
    internals = _MODULE_INTERNALS
    mods: list = []
    user_keys: list = []
    subdicts: list = list(_GLOBAL_HOOKS)
    tensors: list = []
    mutables: list = []
    contents: list = []
    while stack:
        m = stack.pop()
        if m is None or id(m) in seen:
            continue
        seen.add(id(m))
        mods.append(m)
        d = m.__dict__
        subs = d["_modules"]
        params = d["_parameters"]
        bufs = d["_buffers"]
        hooks, pre_hooks = d["_forward_hooks"], d["_forward_pre_hooks"]
        subdicts += (subs, params, bufs, hooks, pre_hooks)
        add(d["training"])
        if params:
            add(tuple(params))
            add(tuple(map(id, params.values())))
        if bufs:
            add(tuple(bufs))
            add(tuple(map(id, bufs.values())))
        add(tuple(subs))
        add(tuple(map(id, subs.values())))
        # (the *_with_kwargs and *_always_called dicts only flag hooks held in these two)
        if hooks or pre_hooks:
            add(tuple(hooks.items()))
            add(tuple(pre_hooks.items()))
        user = d.keys() - internals  # the user's attributes
        user_keys.append(tuple(user))
        for k in user:
            v = d[k]
            add(k)
            add(v)
            t = type(v)
            kind = _KINDS.get(t)
            if kind is None:
                kind = _KINDS[t] = _kind(t)
            if kind == 2:
                # an in-place change of a tensor constant; a rebound one of equal value but
                # another dtype, device or shape (``==`` alone would call it equal)
                add(v._version)
                add((v.dtype, v.device, v.shape))
                tensors.append(v)
            elif kind == 3:
                c = memo.get(id(v), memo)
                if c is memo:
                    c = memo[id(v)] = _contents(v)  # a config shared by many modules: once
                    mutables.append(v)
                    contents.append(c)
                add(c)
        stack.extend(reversed(subs.values()))
    fp = Fingerprint(tuple(parts))
    if snap is not None and snap.fp == fp:
        fp = snap.fp  # the same state: the object the caches hold, compared by identity
    _SNAPSHOTS[model] = _Snapshot(fp, mods, user_keys, subdicts, tensors, mutables, contents)
    return fp


def capture(
    model: nn.Module,
    inputs: tuple,
    kwargs: dict | None = None,
    output: str | int | None = None,
    custom_loss: bool = False,
    fp: Fingerprint | None = None,
) -> Program:
    """Export ``model`` at the signature of ``model(*inputs, **kwargs)`` (cached; a second call
    does not re-export). ``output`` and ``custom_loss`` choose the returned tensor the loss reads
    (:func:`choose_output`). ``fp``: :func:`fingerprint` of ``model`` taken by the caller since
    the model last changed (``None``: taken here).

    A program is reused when the model object, :func:`fingerprint` of the model (its modules,
    their training flags, parameter and buffer objects, plain-Python attributes and forward
    hooks, and the global forward hooks: a change to any of them re-captures) and the shapes,
    dtypes and devices of the inputs are those it was captured at. Raises :class:`CaptureError`
    (carrying export's message) when export fails, and :class:`DropoutError` when dropout is
    active in training mode.
    """
    global EXPORT_COUNT
    per_model = _CACHE.get(model)
    if per_model is None:
        per_model = _CACHE[model] = []
    sig = signature((inputs, kwargs or {}))
    if fp is None:
        fp = fingerprint(model)
    for i, (s, f, held) in enumerate(per_model):
        if s == sig and f == fp:
            if i:
                per_model.insert(0, per_model.pop(i))  # most recently used first
            if isinstance(held, Exception):
                raise held
            prog = held.program(model, output, custom_loss)
            prog.fingerprint = f
            return prog
    EXPORT_COUNT += 1
    try:
        ep = torch.export.export(model, inputs, kwargs or None, strict=False)
        ep = functionalize(ep)
    except Exception as e:  # export raises many types; all mean "could not capture"
        err = e if isinstance(e, CaptureError) else None
        if err is None:
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            err = CaptureError(f"{type(e).__name__}: {msg}")
        _store(per_model, sig, fp, fingerprint(model), err)
        raise err from e
    held = _Exported(ep)
    # export ran forward, which may itself have changed a Python attribute (a counter): the
    # program is also valid for the state forward left behind, which the next call sees
    _store(per_model, sig, fp, fingerprint(model), held)
    prog = held.program(model, output, custom_loss)
    prog.fingerprint = fp
    return prog


class _Exported:
    """One export and the programs built from it, one per choice of the output the loss reads
    (a single choice when the model returns one tensor)."""

    def __init__(self, ep: torch.export.ExportedProgram):
        self.ep = ep
        self.out_spec = ep.call_spec.out_spec  # call_spec builds a class on every access
        self.programs: dict = {}

    def program(self, model: nn.Module, output: Any, custom_loss: bool) -> Program:
        spec = self.out_spec
        key = None if spec is None or spec.is_leaf() else (output, custom_loss)
        prog = self.programs.get(key)
        if prog is None:
            prog = self.programs[key] = _build(self.ep, model, output, custom_loss)
        elif key is None and output is not None:
            choose_output(spec, output, custom_loss)  # the same error as a first call
        return prog


def _store(per_model: list, sig: tuple, before: Fingerprint, after: Fingerprint, value) -> None:
    per_model.insert(0, (sig, before, value))
    if after != before:
        per_model.insert(0, (sig, after, value))
    del per_model[MAX_PROGRAMS_PER_MODEL:]


def clear_cache() -> None:
    """Forget all captured programs and fingerprint snapshots (changes to a model are detected
    without it; this frees memory)."""
    _CACHE.clear()
    _SNAPSHOTS.clear()
    from . import replay  # (imports this module)

    replay.clear()
