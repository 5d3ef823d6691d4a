"""Capture: ``torch.export`` (training IR, ``strict=False``) once per input signature, then replay.

A :class:`Program` is the exported graph with its placeholders classified (parameter, buffer,
constant, user input), every call normalised to schema order, and the checks that must run before
any number is computed (dropout in training mode). :func:`capture` caches programs per model and
input signature; :meth:`Program.plan` adds the activity analysis for one parameter subset.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
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
    output: torch.fx.Node  # the model output node
    _plans: dict = field(default_factory=dict)
    _last_uses: dict | None = None

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

    def plan(self, param_names: frozenset[str]) -> dict[str, bool]:
        """Activity analysis: node name -> whether it depends on the parameters in the subset."""
        plan = self._plans.get(param_names)
        if plan is None:
            plan = {ph: (p in param_names) for ph, p in self.params.items()}
            for s in self.steps:
                if not s.is_float_out or s.op in VALUE_INDEPENDENT:
                    plan[s.node.name] = False
                    continue
                if getattr(s.op, "overloadpacket", None) in VALUE_INDEPENDENT:
                    plan[s.node.name] = False
                    continue
                plan[s.node.name] = any(plan.get(n.name, False) for n in s.node.all_input_nodes)
            self._plans[param_names] = plan
        return plan


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


def _build(ep: torch.export.ExportedProgram, model: nn.Module) -> Program:
    sig = ep.graph_signature
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
            if len(user_outputs) != 1:
                raise ValueError(
                    f"the model returns {len(user_outputs)} outputs; hessfast needs one logits "
                    "tensor. Wrap the model so that forward returns only the tensor the loss reads."
                )
            idx = names.index(user_outputs[0]) if user_outputs[0] in names else len(outs) - 1
            output_node = outs[idx]
            if not isinstance(output_node, torch.fx.Node):
                raise ValueError("the model output is not a tensor computed by the model")
    return Program(gm, steps, params, buffers, constants, list(sig.user_inputs), output_node)


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def signature(inputs: tuple) -> tuple:
    leaves, spec = pytree.tree_flatten(inputs)
    parts = []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            parts.append(("T", tuple(x.shape), x.dtype, str(x.device)))
        else:
            parts.append(("V", type(x).__name__, repr(x)))
    return (str(spec), tuple(parts))


def capture(model: nn.Module, inputs: tuple) -> Program:
    """Export ``model`` at the signature of ``inputs`` (cached; a second call does not re-export).

    The cache key is the model object, its training flag, which parameter and buffer objects it
    and submodule objects it holds (replacing a submodule re-captures), and the shapes, dtypes and devices of the inputs. Raises :class:`CaptureError` (carrying export's message) when export fails, and
    :class:`DropoutError` when dropout is active in training mode.
    """
    global EXPORT_COUNT
    per_model = _CACHE.setdefault(model, {})
    state = (
        tuple(id(m) for m in model.modules()),
        tuple((n, id(t)) for n, t in model.state_dict(keep_vars=True).items()),
    )
    key = (model.training, state, signature(inputs))
    prog = per_model.get(key)
    if isinstance(prog, Exception):
        raise prog
    if prog is None:
        EXPORT_COUNT += 1
        try:
            ep = torch.export.export(model, inputs, strict=False)
        except Exception as e:  # export raises many types; all mean "could not capture"
            err = CaptureError(f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
            per_model[key] = err
            raise err from e
        prog = per_model[key] = _build(ep, model)
    return prog


def clear_cache() -> None:
    """Forget all captured programs (e.g. after changing a model's structure in place)."""
    _CACHE.clear()
