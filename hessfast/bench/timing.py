"""Timing one call: CUDA events on GPU, ``time.perf_counter`` on CPU; peak memory; the
settings a measurement runs under (TF32, CPU threads); what a call that raised says."""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def sync(dev: torch.device) -> None:
    """Wait for ``dev``'s queued work (CUDA); nothing elsewhere."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free_memory(dev: torch.device) -> None:
    """On CUDA, collect garbage and return cached blocks: between methods, so that one method's
    leftovers do not count in the next one's peak memory. Elsewhere no peak memory is read and
    this does nothing (a full collection costs a third of a second with torch imported, more than
    a tiny model's whole method)."""
    if dev.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def collect_garbage() -> None:
    """One full collection before the timed rounds, on every device: the garbage of the
    preparation (references, first calls, traces) is not collected inside a timed call."""
    gc.collect()


def timed_call(fn: Callable[[], Any], dev: torch.device) -> tuple[float, Any]:
    """``(seconds, result)`` of one call: CUDA events on GPU, ``perf_counter`` on CPU."""
    if dev.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        sync(dev)
        start.record()
        out = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, out
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def peak_call(fn: Callable[[], Any], dev: torch.device) -> tuple[int | None, Any]:
    """``(peak bytes above the allocation before the call, result)``; ``None`` off CUDA."""
    if dev.type != "cuda":
        return None, fn()
    sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    out = fn()
    sync(dev)
    return torch.cuda.max_memory_allocated(dev) - base, out


def measure(fn: Callable[[], Any], dev, repeats: int):
    """``(median seconds, peak bytes or None, result)`` of ``fn()`` after one warm-up call (the
    warm-up also measures the peak memory). Kept for ``benchmarks/rule_bench.py``."""
    dev = torch.device(dev)
    peak, out = peak_call(fn, dev)
    times = [timed_call(fn, dev)[0] for _ in range(repeats)]
    return statistics.median(times), peak, out


@contextlib.contextmanager
def tf32(enabled: bool):
    """Set TF32 for CUDA matmuls and cuDNN convolutions, restoring the old setting afterwards."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@contextlib.contextmanager
def threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def describe_error(e: BaseException) -> str:
    """``"Type: first line of the message"`` (200 characters at most): a failed call in a row."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:200] if msg else ''}".strip()
