"""Graph rewrites on the exported graph, before it becomes a :class:`~hessfast.capture.Program`.

:func:`fuse_rms_norm` recognises RMS normalisation written out op by op, as Hugging Face Llama,
Mistral, Qwen and most hand-written ``RMSNorm`` modules do::

    v = x.pow(2).mean(-1, keepdim=True)        # aten.pow.Tensor_Scalar(x, 2) (or mul(x, x)),
                                               # aten.mean.dim(·, [-1], True)
    h = x * torch.rsqrt(v + eps)               # aten.add.Tensor(·, eps), aten.rsqrt, aten.mul(x, ·)
    y = weight * h                             # optional: aten.mul(weight, h), weight [D]

and replaces it with one ``aten.rms_norm.default(x, [D], weight or None, eps)`` node: the same
function (``y = γ · x (mean(x²) + eps)^(−1/2)`` over the last dim), which the fused norm rules
(the torch reference and the Triton kernels) differentiate in one pass instead of six elementwise
and reduction nodes with their own residuals.

What stays where it was: ``x`` may be any node, in particular the float32 upcast
(``aten.to`` / ``aten._to_copy``) that Hugging Face applies first; a cast after the chain (back to
the input dtype) and the weight multiply after that cast are kept as separate nodes. The weight
multiply is absorbed only when it directly consumes the chain's output, the weight is ``[D]`` and
no dtype promotion happens. A chain is rewritten only when each intermediate (``pow``, ``mean``,
``add``, ``rsqrt``, and the product ``x · rsqrt`` when the weight is absorbed) has no user outside
the chain, so no value that another node reads disappears.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import fx

from .rules.base import normalize_args

aten = torch.ops.aten

Node = fx.Node


def _call(node: Any, *targets: Any) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _val(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _args(node: Node) -> tuple:
    return normalize_args(node.target, node.args, node.kwargs)


def _only_user(node: Node) -> Node | None:
    """The single node reading ``node``, or ``None`` when there are several (or none)."""
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _other(args: tuple, mine: Node) -> Any:
    """The operand of a binary op that is not ``mine`` (``None`` if both or neither are)."""
    a, b = args[0], args[1]
    if a is mine and b is not mine:
        return b
    if b is mine and a is not mine:
        return a
    return None


def _square_of(node: Any) -> Node | None:
    """``x`` when ``node`` is ``x²`` (``pow(x, 2)`` or ``mul(x, x)``)."""
    if _call(node, aten.pow.Tensor_Scalar):
        x, e = _args(node)
        return x if isinstance(x, Node) and e == 2 else None
    if _call(node, aten.mul.Tensor):
        a, b = _args(node)
        return a if isinstance(a, Node) and a is b else None
    return None


def _match(rsqrt: Node) -> tuple[list[Node], Node, int, float, Node | None] | None:
    """For an ``rsqrt`` node heading a chain: ``(chain, x, D, eps, weight)`` with ``chain`` the
    nodes to remove in graph order (its last one is the node the fused op replaces)."""
    add = rsqrt.args[0]
    if not _call(add, aten.add.Tensor) or len(add.users) != 1:
        return None
    a, b, alpha = _args(add)
    mean, eps = (a, b) if isinstance(a, Node) else (b, a)
    if alpha != 1 or not isinstance(eps, numbers.Real) or isinstance(eps, bool):
        return None
    if not _call(mean, aten.mean.dim) or len(mean.users) != 1:
        return None
    sq, dims, keepdim, dtype = _args(mean)
    x = _square_of(sq)
    if x is None or len(sq.users) != 1 or not keepdim or dtype is not None:
        return None
    xv = _val(x)
    if (
        xv is None
        or not xv.is_floating_point()
        or xv.dim() == 0
        or list(dims) not in ([-1], [xv.dim() - 1])
    ):
        return None
    d = xv.shape[-1]
    mul = _only_user(rsqrt)
    if not isinstance(d, int) or not _call(mul, aten.mul.Tensor):
        return None
    if _other(_args(mul), rsqrt) is not x:
        return None
    chain = [sq, mean, add, rsqrt, mul]
    wmul = _only_user(mul)
    if _call(wmul, aten.mul.Tensor):
        w = _other(_args(wmul), mul)
        wv = _val(w)
        if wv is not None and tuple(wv.shape) == (d,) and wv.dtype == xv.dtype:
            return [*chain, wmul], x, d, float(eps), w
    return chain, x, d, float(eps), None


def fuse_rms_norm(gm: fx.GraphModule) -> int:
    """Replace every decomposed RMSNorm chain of ``gm``'s graph by one ``aten.rms_norm.default``
    node (see the module docstring), in place; returns how many chains were fused."""
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if not _call(node, aten.rsqrt.default):
            continue
        found = _match(node)
        if found is None:
            continue
        chain, x, d, eps, w = found
        last = chain[-1]
        with graph.inserting_before(last):
            fused = graph.call_function(aten.rms_norm.default, (x, [d], w, eps))
        fused.meta = dict(last.meta)
        last.replace_all_uses_with(fused)
        for dead in reversed(chain):
            graph.erase_node(dead)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count


__all__ = ["fuse_rms_norm"]
