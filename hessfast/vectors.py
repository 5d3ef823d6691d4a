"""Parameter selection and the vectors ``v`` of the public API: parsing, checking, formatting.

A vector is either a dict ``{name: tensor}`` over the selected parameters (names as in
``model.named_parameters()``) or a flat 1-D tensor in that order; either may carry one extra leading
axis K for K vectors at once. Results are returned in the structure the caller used.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn


def _named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``list(model.named_parameters())`` without its generators (a product calls this on every
    call): modules in pre-order, each once, parameters in registration order, each once. A model
    that overrides ``named_parameters`` or ``named_modules`` is asked through its own method."""
    cls = type(model)
    if (
        cls.named_parameters is not nn.Module.named_parameters
        or cls.named_modules is not nn.Module.named_modules
    ):
        return list(model.named_parameters())
    out = []
    seen_params: set[int] = set()
    seen_modules: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        prefix, m = stack.pop()
        if id(m) in seen_modules:
            continue
        seen_modules.add(id(m))
        for n, p in m._parameters.items():
            if p is not None and id(p) not in seen_params:
                seen_params.add(id(p))
                out.append((prefix + n, p))
        subs = [(f"{prefix}{n}.", c) for n, c in m._modules.items() if c is not None]
        stack.extend(reversed(subs))
    return out


def select_params(
    model: nn.Module, params: str | Sequence[str] | None
) -> list[tuple[str, nn.Parameter]]:
    """The differentiated parameters in ``named_parameters()`` order.

    ``params=None`` selects every parameter with ``requires_grad``; otherwise names or glob
    patterns (``"blocks.3.*"``), each of which must match at least one parameter.
    """
    named = _named_parameters(model)
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError("the model has no parameter with requires_grad=True; pass params=")
        return chosen
    patterns = [params] if isinstance(params, str) else list(params)
    if not patterns:
        raise ValueError("params= is empty; pass None for every trainable parameter")
    names = [n for n, _ in named]
    for pat in patterns:
        if not any(n == pat or fnmatch.fnmatchcase(n, pat) for n in names):
            sample = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise ValueError(f"params pattern {pat!r} matches no parameter (names: {sample})")
    return [
        (n, p) for n, p in named if any(n == pat or fnmatch.fnmatchcase(n, pat) for pat in patterns)
    ]


@dataclass
class Vectors:
    """``v`` parsed: per-parameter tangents ``[K, *shape]`` and how to give results back."""

    tangents: dict[str, torch.Tensor]
    k: int
    batched: bool  # the caller passed a leading K axis
    flat: bool  # the caller passed a flat tensor


def first_non_finite(values: dict[str, torch.Tensor]) -> str | None:
    """The first name whose tensor holds NaN or Inf, or ``None``; one host sync for all."""
    if not values:
        return None
    # A finite 2-norm proves every entry finite (NaN and ±Inf propagate into it) and costs a
    # fraction of the max-norm on the CPU; a non-finite one may be an overflow of the squares,
    # so those tensors are asked again with the max-norm, non-finite exactly for NaN or ±Inf.
    tensors = list(values.values())
    norms = torch._foreach_norm(tensors, 2.0)
    if len({n.dtype for n in norms}) > 1:
        norms = [n.double() for n in norms]
    flags = torch.stack(norms).isfinite()
    if bool(flags.all()):
        return None
    for i in (~flags).nonzero().flatten().tolist():
        if not bool(tensors[i].abs().max().isfinite()):
            return list(values)[i]
    return None


def _check_finite(values: dict[str, torch.Tensor]) -> None:
    bad = first_non_finite(values)
    if bad is not None:
        raise ValueError(f"v[{bad!r}] contains NaN or Inf; hessfast needs finite vectors")


def parse(v, selected: list[tuple[str, nn.Parameter]]) -> Vectors:
    """Check ``v`` against the selected parameters and lift it to ``[K, *shape]`` per parameter.

    Raises ``ValueError`` naming the offending parameter for a missing or extra name, a wrong shape,
    dtype or device, or a non-finite entry.
    """
    if isinstance(v, torch.Tensor):
        return _parse_flat(v, selected)
    if not isinstance(v, dict):
        raise ValueError(
            f"v must be a dict {{name: tensor}} or a flat tensor, not {type(v).__name__}"
        )
    names = [n for n, _ in selected]
    missing = [n for n in names if n not in v]
    extra = [n for n in v if n not in names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra} (not among the differentiated parameters)")
        raise ValueError("v does not match the differentiated parameters: " + "; ".join(parts))
    batched = None
    out = {}
    for n, p in selected:
        t = v[n]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"v[{n!r}] must be a tensor, not {type(t).__name__}")
        if tuple(t.shape) == tuple(p.shape):
            b = False
        elif t.dim() == p.dim() + 1 and tuple(t.shape[1:]) == tuple(p.shape):
            b = True
        else:
            raise ValueError(
                f"v[{n!r}] has shape {list(t.shape)}; expected {list(p.shape)} or "
                f"[K, {', '.join(map(str, p.shape))}]"
            )
        if batched is None:
            batched = b
        elif b != batched:
            raise ValueError(
                f"v[{n!r}]: some entries have a leading K axis and others do not; use one layout"
            )
        _check_like(n, t, p)
        out[n] = t if b else t.unsqueeze(0)
    k = next(iter(out.values())).shape[0]
    for n, t in out.items():
        if t.shape[0] != k:
            raise ValueError(f"v[{n!r}] has K={t.shape[0]} vectors, others have K={k}")
    if k == 0:
        raise ValueError(_NO_VECTORS)
    _check_finite(out)
    return Vectors(out, k, bool(batched), False)


_NO_VECTORS = (
    "v has K=0 vectors (a leading axis of length 0): pass at least one vector, [P] or [K, P] "
    "with K >= 1"
)


def _check_like(name: str, t: torch.Tensor, p: torch.Tensor) -> None:
    if t.dtype != p.dtype:
        raise ValueError(f"v[{name!r}] has dtype {t.dtype}; the parameter is {p.dtype}")
    if t.device != p.device:
        raise ValueError(f"v[{name!r}] is on {t.device}; the parameter is on {p.device}")


def _parse_flat(v: torch.Tensor, selected) -> Vectors:
    total = sum(p.numel() for _, p in selected)
    if v.dim() == 1:
        batched, vv = False, v.unsqueeze(0)
    elif v.dim() == 2:
        batched, vv = True, v
    else:
        raise ValueError(f"a flat v must be [P] or [K, P] with P={total}; got {list(v.shape)}")
    if vv.shape[1] != total:
        raise ValueError(
            f"flat v has {vv.shape[1]} entries per vector; the differentiated parameters have "
            f"P={total}"
        )
    first = selected[0][1]
    if v.dtype != first.dtype or v.device != first.device:
        raise ValueError(
            f"flat v is {v.dtype} on {v.device}; the parameters are {first.dtype} on {first.device}"
        )
    if vv.shape[0] == 0:
        raise ValueError(_NO_VECTORS)
    out, off = {}, 0
    for n, p in selected:
        _check_like(n, v, p)
        piece = vv[:, off : off + p.numel()].reshape(vv.shape[0], *p.shape)
        out[n] = piece
        off += p.numel()
    _check_finite(out)
    return Vectors(out, vv.shape[0], batched, True)


def format_like(values: dict[str, torch.Tensor], vec: Vectors, batched: bool | None = None):
    """Return ``values`` (``[K, *shape]`` per name, or ``[*shape]`` when not batched) in the
    caller's structure: a dict or a flat tensor, with or without the K axis."""
    batched = vec.batched if batched is None else batched
    if vec.flat:
        lead = 1 if batched else 0
        flat = torch.cat([values[n].flatten(lead) for n in vec.tangents], dim=lead)
        return flat
    return {n: values[n] for n in vec.tangents}
