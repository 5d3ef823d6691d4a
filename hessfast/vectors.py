"""Parameter selection and the vectors ``v`` of the public API: parsing, checking, formatting.

A vector is either a dict ``{name: tensor}`` over the selected parameters (names as in
``model.named_parameters()``) or a flat 1-D tensor in that order; either may carry one extra leading
axis K for K vectors at once. Results are returned in the structure the caller used.
"""

from __future__ import annotations

import fnmatch
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


#: model -> (the fingerprint its named parameters were listed under, the list)
_NAMED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _named_parameters_at(model: nn.Module, fingerprint: Any) -> list[tuple[str, nn.Parameter]]:
    """:func:`_named_parameters`, listed once per ``fingerprint`` of ``model``
    (:func:`hessfast.capture.fingerprint`: the module tree, each module's parameter names and
    objects; equal fingerprints have the same named parameters). A model overriding
    ``named_parameters`` or ``named_modules`` is asked every time."""
    cls = type(model)
    if (
        fingerprint is None
        or cls.named_parameters is not nn.Module.named_parameters
        or cls.named_modules is not nn.Module.named_modules
    ):
        return _named_parameters(model)
    held = _NAMED.get(model)
    if held is not None and (held[0] is fingerprint or held[0] == fingerprint):
        return held[1]
    named = _named_parameters(model)
    _NAMED[model] = (fingerprint, named)
    return named


def select_params(
    model: nn.Module, params: str | Sequence[str] | None, fingerprint: Any = None
) -> list[tuple[str, nn.Parameter]]:
    """The differentiated parameters in ``named_parameters()`` order.

    ``params=None`` selects every parameter with ``requires_grad``; otherwise names or glob
    patterns (``"blocks.3.*"``), each of which must match at least one parameter.
    ``fingerprint``: the model's :func:`hessfast.capture.fingerprint`, taken now; the parameter
    list is then reused while it does not change (``requires_grad`` is read on every call).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
        >>> [n for n, _ in select_params(model, "1.*")]
        ['1.weight', '1.bias']
    """
    named = _named_parameters_at(model, fingerprint)
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
    given: dict[str, torch.Tensor] | None = None  # {"": the flat v} (its finiteness is v's)

    def finite_parts(self) -> dict[str, torch.Tensor]:
        """The tensors whose finiteness is that of ``v``: the flat tensor as one, else the
        tangents (read by :func:`first_non_finite_in`, named by :meth:`raise_non_finite`)."""
        return self.given if self.given is not None else self.tangents

    def raise_non_finite(self, name: str) -> None:
        """Raise the ``ValueError`` for a non-finite entry of :meth:`finite_parts` ``name``,
        naming the parameter (a flat ``v`` is searched piece by piece for it)."""
        if self.given is not None and name not in self.tangents:
            name = first_non_finite(self.tangents) or name
        raise ValueError(f"v[{name!r}] contains NaN or Inf; hessfast needs finite vectors")

    def check_finite(self) -> None:
        """Raise ``ValueError`` naming the parameter if ``v`` has a NaN or Inf entry."""
        bad = first_non_finite(self.finite_parts())
        if bad is not None:
            self.raise_non_finite(bad)


def first_non_finite(values: dict[str, torch.Tensor]) -> str | None:
    """The first name whose tensor holds NaN or Inf, or ``None``; one host sync for all."""
    bad = first_non_finite_in([("", values)])
    return None if bad is None else bad[1]


#: Tensors with fewer elements than this are concatenated and summed together by
#: :func:`first_non_finite_in` (one reduction's fixed cost, a few microseconds on the CPU, is
#: then paid once for all the biases and norm weights of a model instead of once each).
SMALL = 8192

_flatten = torch._C._nn.flatten_dense_tensors


def _sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t``'s entries, finite only if every entry is (NaN and ±Inf propagate), in at
    least float32 (a float16 sum overflows at 65504)."""
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.sum(dtype=torch.float32)
    return t.sum()


def first_non_finite_in(groups: Sequence[tuple[str, dict[str, torch.Tensor]]]):
    """``(group, name)`` of the first tensor holding NaN or Inf over the ``(group, {name:
    tensor})`` pairs, in order, or ``None``: one host sync for all.

    Example:
        >>> a, b = {"w": torch.ones(2)}, {"x": torch.zeros(1), "y": torch.tensor([1.0, float("nan")])}
        >>> first_non_finite_in([("v", a), ("result", b)])
        ('result', 'y')
    """
    tensors = [t for _, values in groups for t in values.values()]
    if not tensors:
        return None
    # A finite sum proves every entry finite (a NaN, or +Inf and -Inf, make it NaN; an Inf
    # alone makes it ±Inf); a non-finite one may be an overflow, so then every tensor is asked
    # exactly, in order. The small tensors of one dtype and device are summed as one.
    sums = []
    small: dict = {}
    for t in tensors:
        if t.numel() < SMALL:
            small.setdefault((t.dtype, t.device), []).append(t)
        else:
            sums.append(_sum(t))
    for part in small.values():
        sums.append(_sum(_flatten(part)) if len(part) > 1 else _sum(part[0]))
    if bool(torch.stack(sums).isfinite().all()):  # (stack promotes to the widest dtype)
        return None
    where = [(g, n) for g, values in groups for n in values]
    for w, t in zip(where, tensors):
        if not bool(torch.isfinite(t).all()):
            return w
    return None


def parse(v, selected: list[tuple[str, nn.Parameter]], check_finite: bool = True) -> Vectors:
    """Check ``v`` against the selected parameters and lift it to ``[K, *shape]`` per parameter.

    Raises ``ValueError`` naming the offending parameter for a missing or extra name, a wrong shape,
    dtype or device, or (``check_finite=True``) a non-finite entry; with ``check_finite=False``
    the caller checks :meth:`Vectors.finite_parts` itself (:func:`hessfast.api.hvp` does so
    together with the result's check).

    Example:
        >>> lin = torch.nn.Linear(2, 1)
        >>> vec = parse(torch.ones(3, 3), select_params(lin, None))  # K = 3 flat vectors
        >>> vec.k, vec.tangents["weight"].shape
        (3, torch.Size([3, 1, 2]))
    """
    if isinstance(v, torch.Tensor):
        vec = _parse_flat(v, selected)
    elif isinstance(v, dict):
        vec = _parse_dict(v, selected)
    else:
        raise ValueError(
            f"v must be a dict {{name: tensor}} or a flat tensor, not {type(v).__name__}"
        )
    if check_finite:
        vec.check_finite()
    return vec


def _parse_dict(v: dict, selected: list[tuple[str, nn.Parameter]]) -> Vectors:
    if len(v) != len(selected) or any(n not in v for n, _ in selected):
        names = [n for n, _ in selected]
        missing = [n for n in names if n not in v]
        extra = [n for n in v if n not in names]
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra} (not among the differentiated parameters)")
        raise ValueError("v does not match the differentiated parameters: " + "; ".join(parts))
    batched = None
    k = None
    out = {}
    for n, p in selected:
        t = v[n]
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"v[{n!r}] must be a tensor, not {type(t).__name__}")
        shape = t.shape
        if shape == p.shape:
            b = False
        elif len(shape) == p.dim() + 1 and shape[1:] == p.shape:
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
        if t.dtype != p.dtype or t.device != p.device:
            _check_like(n, t, p)
        if b:
            if k is None:
                k = shape[0]
            elif shape[0] != k:
                raise ValueError(f"v[{n!r}] has K={shape[0]} vectors, others have K={k}")
            out[n] = t
        else:
            out[n] = t.unsqueeze(0)
    if k == 0:
        raise ValueError(_NO_VECTORS)
    return Vectors(out, 1 if k is None else k, bool(batched), False)


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
    return Vectors(out, vv.shape[0], batched, True, {"": v})


def format_like(values: dict[str, torch.Tensor], vec: Vectors, batched: bool | None = None):
    """Return ``values`` (``[K, *shape]`` per name, or ``[*shape]`` when not batched) in the
    caller's structure: a dict or a flat tensor, with or without the K axis."""
    batched = vec.batched if batched is None else batched
    if vec.flat:
        lead = 1 if batched else 0
        flat = torch.cat([values[n].flatten(lead) for n in vec.tangents], dim=lead)
        return flat
    return {n: values[n] for n in vec.tangents}
