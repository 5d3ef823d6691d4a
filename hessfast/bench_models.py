"""Benchmark workloads: the built-in models of ``hessfast bench`` / ``hessfast profile``, and users'.

The architectures are :mod:`hessfast.zoo`'s; this module holds their size presets, their
synthetic data, and the loading of users' ``module:function`` workloads.

Built-in models (float32 unless asked otherwise, eval mode, cross-entropy loss, random init,
synthetic data), each at three sizes: ``tiny`` (seconds on a 2-core CPU), ``small`` (a CPU
benchmark, seconds per method) and ``full`` (the shapes of the H200 baselines):

- ``mlp``: GELU MLP; tiny 64-128-128-10 at batch 64; small 784-256-256-10 at batch 256;
  full 784-4096-4096-4096-10 at batch 8192.
- ``resnet18``: torchvision's ResNet-18 layout, 32×32 inputs, eval-mode BatchNorm, 10 classes;
  tiny width 8 at batch 4; small width 16 at batch 16; full width 64 at batch 256.
- ``gpt2``: GPT-2 layout with ``F.scaled_dot_product_attention`` and an untied head; tiny 1 layer,
  d=32, 2 heads, vocab 128, T=16, batch 2; small 2 layers, d=128, 4 heads, vocab 1000, T=64,
  batch 2; full (GPT-2 small) 12 layers, d=768, 12 heads, vocab 50304, T=1024, batch 4.

``batch_size`` overrides every model's batch, ``seq_len`` the GPT's T.

A user's model is named ``module:function`` (``module`` importable, or a path to a ``.py`` file):
``function(**kw)`` returns ``(model, loss_fn, inputs, targets)`` and is passed those of ``size``,
``device``, ``dtype``, ``batch_size``, ``seq_len`` and ``seed`` it declares (or all of them if it
takes ``**kwargs``). Extra batches of the same shapes (the benchmark rotates its inputs) come from
calling it again with ``seed=1, 2, …`` when it accepts ``seed``; otherwise from rolling every input
and target tensor along their common leading (batch) axis, or, where they have none, from copies.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .zoo import (  # noqa: F401  (the classes were defined here; their old names still import)
    GPT,
    BasicBlock,
    Block,
    CausalSelfAttention,
    ResNet18,
    mlp_model,
)

SIZES = ("tiny", "small", "full")


# ---------------------------------------------------------------------------- built-in presets

_MLP = {
    "tiny": ([64, 128, 128, 10], 64),
    "small": ([784, 256, 256, 10], 256),
    "full": ([784, 4096, 4096, 4096, 10], 8192),
}
_RESNET = {"tiny": (8, 4), "small": (16, 16), "full": (64, 256)}  # width, batch (32×32 inputs)
_GPT = {  # vocab, d, heads, layers, T, batch
    "tiny": (128, 32, 2, 1, 16, 2),
    "small": (1000, 128, 4, 2, 64, 2),
    "full": (50304, 768, 12, 12, 1024, 4),
}


def _check_size(size: str) -> None:
    if size not in SIZES:
        raise ValueError(f"size {size!r}: choose one of {', '.join(SIZES)}")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(1000 + seed)


def _mlp_parts(size, batch_size=None, seq_len=None):
    _check_size(size)
    dims, batch = _MLP[size]
    batch = batch_size or batch

    def data(seed, device):
        g = _gen(seed)
        x = torch.randn(batch, dims[0], generator=g)
        y = torch.randint(0, dims[-1], (batch,), generator=g)
        return (x.to(device),), y.to(device)

    desc = f"MLP {'-'.join(map(str, dims))}, GELU, batch {batch}"
    return (lambda: mlp_model(dims)), data, desc


def _resnet_parts(size, batch_size=None, seq_len=None):
    _check_size(size)
    width, batch = _RESNET[size]
    batch = batch_size or batch

    def data(seed, device):
        g = _gen(seed)
        x = torch.randn(batch, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        return (x.to(device),), y.to(device)

    desc = f"ResNet-18 layout, width {width}, 32x32 inputs, batch {batch}, eval-mode BatchNorm"
    return (lambda: ResNet18(width=width)), data, desc


def _gpt_parts(size, batch_size=None, seq_len=None):
    _check_size(size)
    vocab, d, h, layers, t, b = _GPT[size]
    t, b = seq_len or t, batch_size or b

    def data(seed, device):
        g = _gen(seed)
        idx = torch.randint(0, vocab, (b, t), generator=g)
        y = torch.randint(0, vocab, (b, t), generator=g)
        return (idx.to(device),), y.to(device)

    desc = (
        f"GPT-2 layout, {layers} layer(s), d={d}, {h} heads, vocab {vocab}, T={t}, batch {b}, "
        "F.scaled_dot_product_attention"
    )
    return (lambda: GPT(vocab, d, h, layers, t)), data, desc


BUILTIN: dict[str, Callable] = {"mlp": _mlp_parts, "resnet18": _resnet_parts, "gpt2": _gpt_parts}


def _builder(name: str):
    def build(
        size: str = "tiny",
        device: Any = "cpu",
        *,
        dtype: torch.dtype = torch.float32,
        batch_size: int | None = None,
        seq_len: int | None = None,
        seed: int = 0,
    ):
        make, data, _ = BUILTIN[name](size, batch_size, seq_len)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = make()
        model = model.to(device=device, dtype=dtype).eval()
        inputs, targets = data(seed, device)
        return model, F.cross_entropy, inputs, targets

    build.__name__ = name
    build.__doc__ = (
        f"The built-in ``{name}`` benchmark model: ``(model, loss_fn, inputs, targets)``."
    )
    return build


mlp = _builder("mlp")
resnet18 = _builder("resnet18")
gpt2 = _builder("gpt2")


# ---------------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    """One benchmark problem: a model, its loss, and ``len(batches)`` batches of one shape."""

    name: str
    size: str
    model: nn.Module
    loss_fn: Callable
    batches: list[tuple[tuple, Any]]  # [(inputs, targets), ...], inputs a tuple for model(*inputs)
    description: str
    extra: dict = field(default_factory=dict)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def _cast(x: Any, device, dtype) -> Any:
    """Move tensors to ``device``; floating ones also to ``dtype``."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_cast(a, device, dtype) for a in x)
    return x


def _as_tuple(inputs: Any) -> tuple:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def load_function(spec: str) -> Callable:
    """``module:function`` (or ``path/to/file.py:function``) to the function."""
    mod_name, sep, fn_name = spec.rpartition(":")
    if not sep or not mod_name or not fn_name:
        raise ValueError(f"{spec!r}: name a built-in model or give module:function")
    if mod_name.endswith(".py") or "/" in mod_name:
        path = Path(mod_name)
        if not path.exists():
            raise ValueError(f"{spec!r}: no file {path}")
        key = "hessfast_user_" + re.sub(r"\W", "_", str(path.resolve()))
        module = sys.modules.get(key)
        if module is None:
            spec_ = importlib.util.spec_from_file_location(key, path)
            module = importlib.util.module_from_spec(spec_)
            sys.modules[key] = module
            spec_.loader.exec_module(module)
    else:
        module = importlib.import_module(mod_name)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"{spec!r}: {mod_name} has no function {fn_name}")
    return fn


def _call_user(fn: Callable, offered: dict) -> tuple:
    sig = inspect.signature(fn)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        kw = dict(offered)
    else:
        kw = {k: v for k, v in offered.items() if k in sig.parameters}
    out = fn(**kw)
    if not (isinstance(out, (tuple, list)) and len(out) == 4):
        raise ValueError(
            f"{fn.__module__}.{fn.__name__} must return (model, loss_fn, inputs, targets), "
            f"got {type(out).__name__}"
        )
    return tuple(out)


def _rolled(inputs: tuple, targets: Any, shift: int) -> tuple[tuple, Any]:
    leaves = [
        t for t in torch.utils._pytree.tree_leaves((inputs, targets)) if isinstance(t, torch.Tensor)
    ]
    n = leaves[0].shape[0] if leaves and leaves[0].dim() > 0 else None
    if n is None or n < 2 or any(t.dim() == 0 or t.shape[0] != n for t in leaves):
        shift = 0  # no common batch axis: plain copies (new storage, same values)

    def f(t):
        if not isinstance(t, torch.Tensor):
            return t
        return torch.roll(t, shift % n, 0) if shift else t.clone()

    return torch.utils._pytree.tree_map(f, (inputs, targets))


def build(
    name: str,
    size: str = "tiny",
    device: Any = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    batch_size: int | None = None,
    seq_len: int | None = None,
    n_batches: int = 3,
) -> Workload:
    """The workload ``name`` (built-in or ``module:function``) with ``n_batches`` input batches."""
    device = torch.device(device)
    if name in BUILTIN:
        make, data, desc = BUILTIN[name](size, batch_size, seq_len)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = make()
        model = model.to(device=device, dtype=dtype).eval()
        batches = [_cast(data(i, device), device, dtype) for i in range(n_batches)]
        return Workload(name, size, model, F.cross_entropy, batches, desc)
    fn = load_function(name)
    offered = dict(
        size=size, device=device, dtype=dtype, batch_size=batch_size, seq_len=seq_len, seed=0
    )
    model, loss_fn, inputs, targets = _call_user(fn, offered)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{name}: the model must be a torch.nn.Module")
    model = model.to(device=device, dtype=dtype)
    first = (_cast(_as_tuple(inputs), device, dtype), _cast(targets, device, dtype))
    batches = [first]
    takes_seed = "seed" in inspect.signature(fn).parameters
    for i in range(1, n_batches):
        if takes_seed:
            _, _, x, y = _call_user(fn, {**offered, "seed": i})
            batches.append((_cast(_as_tuple(x), device, dtype), _cast(y, device, dtype)))
        else:
            batches.append(_rolled(*first, i))
    desc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else f"{name}"
    return Workload(name, size, model, loss_fn, batches, desc)


#: The old ``benchmarks/model_zoo.py`` interface: ``MODELS[name](size, device)``.
MODELS = {"mlp": mlp, "resnet18": resnet18, "gpt2": gpt2}
