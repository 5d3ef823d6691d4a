"""Rules: one module per op family, each a plain-torch forward-over-reverse implementation.

:func:`rule_for` maps an op (an aten overload or ``operator.getitem``) to the rule that handles it,
or to the ``torch.func`` fallback when no hand-written rule exists or the rule declines the call.
Accelerated implementations (Triton, CUDA) of the same ops live in ``hessfast/triton/`` and
``hessfast/cuda/``; :func:`rule_for` picks among them per call (:mod:`hessfast.backends`).

A module here registers its rules by exporting ``RULES`` (a list of Rule instances); the registry
(:mod:`hessfast.registry`) finds every such module, as it finds the accelerated packages'
``IMPLEMENTATIONS``. :func:`registered_rule`, :func:`implementations` and :func:`fallback_for` are
the registry's.
"""

from __future__ import annotations

from typing import Any

from ..dispatch import call_device, choose
from ..registry import fallback_for, implementations, registered_rule
from .base import Call, Rule


def rule_for(op: Any, call: Call, backend: str = "auto") -> Rule:
    """The implementation that evaluates ``call`` under ``backend`` (see :mod:`hessfast.backends`):
    an accelerated one, the plain-torch rule, or the ``torch.func`` fallback when the rule declines
    or the op has none."""
    ref = registered_rule(op)
    if backend == "torch":
        impls = [ref] if ref is not None else []
    elif backend == "auto" and (call_device(call) is None or call_device(call).type != "cuda"):
        impls = [ref] if ref is not None else []
    else:
        impls = implementations(op)
    rule = choose(op, impls, call, backend)
    return rule if rule is not None else fallback_for(op)


__all__ = [
    "Call",
    "Rule",
    "rule_for",
    "registered_rule",
    "fallback_for",
    "implementations",
]
