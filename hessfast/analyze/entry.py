"""What ``hessfast analyze`` is given: ``module:function`` entry points, the device, the loss,
the data batches, a checkpoint, each checked, and :class:`UsageError` (exit code 2) when bad."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LOSSES: dict[str, Callable] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
    "nll": F.nll_loss,
    "bce_with_logits": F.binary_cross_entropy_with_logits,
}


CLASSIFICATION = ("cross_entropy", "nll")


DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


class UsageError(ValueError):
    """Bad input to ``hessfast analyze`` (entry point, checkpoint, device, shapes): exit code 2."""


def load_entry_point(spec: str, flag: str) -> Callable:
    """``module:function`` or ``path/to/file.py:function`` to the function; ``UsageError`` with the
    reason otherwise. The current directory is importable, as with ``python -m``."""
    from ..bench_models import load_function

    mod, sep, fn = spec.rpartition(":")
    if not sep or not mod or not fn:
        raise UsageError(f"{flag} {spec!r}: give module:function or path/to/file.py:function")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return load_function(spec)
    except ModuleNotFoundError as e:
        raise UsageError(f"{flag} {spec!r}: cannot import {mod} ({e})") from e
    except ValueError as e:
        raise UsageError(f"{flag} {e}") from e
    except Exception as e:  # an error while importing the user's module
        raise UsageError(f"{flag} {spec!r}: importing {mod} failed: {type(e).__name__}: {e}") from e


def call_entry_point(fn: Callable, spec: str, flag: str) -> Any:
    """``fn()``, any exception turned into a ``UsageError`` naming ``flag`` and ``spec``."""
    try:
        return fn()
    except Exception as e:
        raise UsageError(f"{flag} {spec!r}: {fn.__name__}() raised {type(e).__name__}: {e}") from e


def resolve_device(name: str) -> torch.device:
    """The torch device ``name``, or ``UsageError`` when it does not exist on this machine."""
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"--device {name}: not a torch device ({e})") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: torch sees no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {name}: torch sees {torch.cuda.device_count()} CUDA device(s)"
            )
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UsageError(f"--device {name}: torch sees no MPS device")
    elif dev.type != "cpu":
        try:
            torch.empty(1, device=dev)
        except Exception as e:
            raise UsageError(f"--device {name}: not usable here ({e})") from e
    return dev


def resolve_loss(spec: str) -> Callable:
    if spec in LOSSES:
        return LOSSES[spec]
    if ":" in spec:
        return load_entry_point(spec, "--loss")
    raise UsageError(
        f"--loss {spec!r}: one of {', '.join(LOSSES)}, or module:function (output, targets) -> loss"
    )


def _cast(x: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device, dtype) if x.is_floating_point() else x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(_cast(t, device, dtype) for t in x)
    return x


class CastBatches:
    """A re-iterable view of ``(inputs, targets)`` batches moved to ``device`` (floating tensors
    also cast to ``dtype``) as they are read; one-shot iterators are read once into a list."""

    def __init__(self, data: Iterable, device: torch.device, dtype: torch.dtype):
        if iter(data) is data:  # a generator or iterator: it could be read only once
            data = list(data)
        self.data = data
        self.device, self.dtype = device, dtype

    def __iter__(self):
        for batch in self.data:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise UsageError(
                    "--data: each batch must be an (inputs, targets) pair, got "
                    + (
                        f"{len(batch)} items"
                        if isinstance(batch, (tuple, list))
                        else type(batch).__name__
                    )
                )
            yield _cast(tuple(batch), self.device, self.dtype)

    def __len__(self) -> int:
        return len(self.data)


def _shape(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return str(list(x.shape))
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(_shape(t) for t in x) + ")"
    return type(x).__name__


def check_model_data(
    model: nn.Module,
    loss_fn: Callable,
    data: Iterable,
    loss_name: str,
    allow_empty: bool = False,
):
    """One forward pass and one loss on the first batch (no gradients); ``UsageError`` naming the
    shapes when the model does not take the inputs or the loss does not take its output and the
    targets. Returns ``(output_shape or None, number of batches or None)``."""
    try:
        first = next(iter(data))
    except StopIteration:
        if allow_empty:
            return None, 0
        raise UsageError("--data: the data is empty (no batch)") from None
    inputs, targets = first
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    with torch.no_grad():
        try:
            out = model(*args)
        except Exception as e:
            raise UsageError(
                f"shape mismatch: the model does not accept the data's inputs of shape "
                f"{_shape(inputs)}: {type(e).__name__}: {e}"
            ) from e
        if not isinstance(out, torch.Tensor):
            raise UsageError(
                f"the model returns {type(out).__name__}, not one tensor: wrap it so that forward "
                "returns the logits"
            )
        try:
            loss = loss_fn(out, targets)
        except Exception as e:
            raise UsageError(
                f"shape mismatch: the loss {loss_name} does not take the model's output of shape "
                f"{list(out.shape)} with targets of shape {_shape(targets)}: "
                f"{type(e).__name__}: {e}"
            ) from e
    if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
        raise UsageError(
            f"the loss {loss_name} returned {_shape(loss)}, not a scalar: use reduction='mean'"
        )
    try:
        nb = len(data)  # type: ignore[arg-type]
    except TypeError:
        nb = None
    return tuple(out.shape), nb


def load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a state dict (or a dict holding one under ``state_dict`` / ``model_state_dict`` /
    ``model``) into ``model``; ``UsageError`` for a missing file or keys that do not match."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--checkpoint {path}: no such file")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--checkpoint {path}: cannot load it: {type(e).__name__}: {e}") from e
    if isinstance(state, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"--checkpoint {path}: not a state dict of tensors")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {list(state[k].shape)} vs {list(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:

        def few(xs):
            return ", ".join(xs[:5]) + (f", ... ({len(xs)} in all)" if len(xs) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {few(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches (checkpoint vs model): {few(shapes)}")
        raise UsageError(f"--checkpoint {path} does not match the model: " + "; ".join(parts))
    model.load_state_dict(state)
