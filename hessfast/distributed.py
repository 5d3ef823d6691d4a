"""Data-parallel curvature on ``torch.distributed``: process groups, data shards, and the one
all-reduce of a distributed product.

Every rank holds the whole model and its own shard of the data. A
:class:`~hessfast.HessianOperator` or :class:`~hessfast.GGNOperator` built with a process group
(by default the default group whenever ``torch.distributed`` is initialised) multiplies its local
batches, then sums the ranks' weighted partial products — and their loss-term counts — in **one
all-reduce per K-batched product**, and divides by the global count. The product is therefore the
curvature of the mean loss over the union of the shards, exact for ragged shards (a rank with
fewer samples, or none at all); every rank gets the same bits back, so the Lanczos-type
algorithms (:func:`~hessfast.eigsh`, :func:`~hessfast.trace`, ...), which draw their random
vectors from a seeded CPU generator and solve their small problems in float64 on the host, run
unchanged and return the same result on every rank.

Failures never hang the job: the all-reduced buffer carries a status slot and room for a
160-character message per rank, so when a rank raises inside a product it still joins the
all-reduce (no extra collective, failure or not), re-raises its own error, and every other rank
raises :class:`DistributedError` ("rank r failed inside a Hessian product: ...") —
or ``torch.OutOfMemoryError`` when that rank ran out of memory, so the algorithms that halve
their column blocks on out-of-memory do so on every rank together. A rank that crashes, or hangs,
or stops calling products, makes the collective fail on the others: at once when its process is
gone (gloo), otherwise after the process group's timeout — set it with
``torch.distributed.init_process_group(timeout=datetime.timedelta(seconds=...))`` (torch's
defaults: 30 min for gloo, 10 min for NCCL) or :func:`init_from_env` ``(timeout=...)``. With
gloo the others then raise :class:`DistributedError`; with NCCL torch's watchdog ends their
processes (and ``torchrun`` the job). The same
buffer also carries a fingerprint (a sum and a norm) of every rank's input block and model
parameters: ranks that multiply different vectors (rank-dependent random vectors, diverged
control flow) or hold different weights (a model initialised without a common seed) make every
rank raise :class:`DistributedError` instead of silently summing products that do not belong
together.

Launch with ``torchrun --nproc-per-node N script.py``; in the script::

    hessfast.distributed.init_from_env()            # NCCL on GPUs, gloo on CPUs
    data = hessfast.distributed.shard(loader)       # rank r: samples r, r+N, r+2N, ...
    H = hessfast.HessianOperator(model, loss_fn, data)   # process_group=None: the default group
    evals, _ = hessfast.eigsh(H, k=5)               # the same on every rank
    if hessfast.distributed.is_main_process():
        print(evals)

Everything here is importable, and works (as a single process), without ``torch.distributed``
being initialised.

>>> shard(list(range(7)), rank=1, world_size=3)
[1, 4]
>>> rank(), world_size(), is_main_process()
(0, 1, True)
"""

from __future__ import annotations

import datetime
import itertools
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from .errors import HessfastError

Tensor = torch.Tensor

__all__ = [
    "DistributedError",
    "resolve_group",
    "is_initialized",
    "rank",
    "world_size",
    "is_main_process",
    "shard",
    "init_from_env",
    "all_reduce_product",
]


class DistributedError(HessfastError, RuntimeError):
    """Another rank failed inside a product, the collective failed or timed out, or the ranks
    multiplied different vectors."""


def is_initialized() -> bool:
    """``torch.distributed`` is available and its default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def resolve_group(process_group: Any = None):
    """The process group an operator uses, or ``None`` for a local (single-process) operator.

    ``None``: the default group when ``torch.distributed`` is initialised, local otherwise;
    ``False``: local, even inside a distributed job; a ``ProcessGroup``: that group (this process
    must belong to it). A group of one process still goes through the all-reduce (a no-op copy),
    so one process under ``torchrun`` runs the same code as many.

    >>> resolve_group(None) is None and resolve_group(False) is None
    True
    """
    if process_group is False:
        return None
    if process_group is None:
        if not is_initialized():
            return None
        group = dist.group.WORLD
    elif process_group is True or isinstance(process_group, (str, int, float)):
        raise TypeError(
            "process_group must be None (the default group when torch.distributed is "
            "initialised), False (local) or a torch.distributed ProcessGroup, got "
            f"{process_group!r}"
        )
    else:
        if not is_initialized():
            raise ValueError(
                "process_group was given but torch.distributed is not initialised: call "
                "torch.distributed.init_process_group (or hessfast.distributed.init_from_env) first"
            )
        group = process_group
    if dist.get_rank(group) < 0:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of process_group"
        )
    return group


def _group_or_default(group: Any):
    if group is None:
        return dist.group.WORLD if is_initialized() else None
    return resolve_group(group)


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (default: the default group); 0 outside a distributed
    job."""
    g = _group_or_default(group)
    return 0 if g is None else dist.get_rank(g)


def world_size(group: Any = None) -> int:
    """The number of processes in ``group`` (default: the default group); 1 outside a
    distributed job."""
    g = _group_or_default(group)
    return 1 if g is None else dist.get_world_size(g)


def is_main_process(group: Any = None) -> bool:
    """Rank 0 of ``group``: the one process that writes reports and prints (``True`` outside a
    distributed job)."""
    return rank(group) == 0


def init_from_env(backend: str | None = None, timeout: float | datetime.timedelta = 300.0) -> bool:
    """Initialise the default process group from ``torchrun``'s environment variables.

    Does nothing and returns ``False`` when the variables are absent (a plain single-process run)
    or the group is already initialised (returns ``True`` then). ``backend``: default NCCL when
    CUDA is available (each process then uses GPU ``LOCAL_RANK``), gloo otherwise. ``timeout``
    (seconds or a ``timedelta``, default 5 min): how long a collective waits for a rank that hangs
    before failing on the others.
    """
    if is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if not dist.is_available():
        raise RuntimeError("torchrun started this process but torch.distributed is not available")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not isinstance(timeout, datetime.timedelta):
        timeout = datetime.timedelta(seconds=float(timeout))
    device_id = None
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device_id = torch.device("cuda", local)
    dist.init_process_group(backend=backend, timeout=timeout, device_id=device_id)
    return True


# ----------------------------------------------------------------------------------------------
# shards


def _is_single_batch(data: Any) -> bool:
    return isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], torch.Tensor)


def _take(x: Any, r: int, w: int) -> Any:
    if isinstance(x, Tensor):
        return x[r::w]
    if isinstance(x, (tuple, list)):
        return type(x)(_take(t, r, w) for t in x)
    return x


class _Strided:
    """Items ``r, r+w, r+2w, ...`` of a re-iterable, lazily, each time it is iterated."""

    def __init__(self, source: Iterable, r: int, w: int):
        self.source, self.r, self.w = source, r, w

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.source), self.r, None, self.w)

    def __len__(self) -> int:
        n = len(self.source)  # TypeError when the source has no length, as for any iterable
        return max(0, (n - self.r + self.w - 1) // self.w)

    def __repr__(self) -> str:
        return f"_Strided({self.source!r}, rank={self.r}, world_size={self.w})"


class _StridedSampler(torch.utils.data.Sampler):
    """Indices ``r, r+w, ...`` of ``range(n)``: ``DistributedSampler`` without its padding (which
    repeats samples) and without shuffling (the curvature does not depend on the order)."""

    def __init__(self, n: int, r: int, w: int):
        self.n, self.r, self.w = n, r, w

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.r, self.n, self.w))

    def __len__(self) -> int:
        return len(range(self.r, self.n, self.w))


def _shard_loader(loader: torch.utils.data.DataLoader, r: int, w: int):
    ds = loader.dataset
    if isinstance(ds, torch.utils.data.IterableDataset) or (
        loader.batch_size is None and loader.batch_sampler is not None
    ):
        # an iterable dataset or a custom batch sampler: keep batches r, r+w, ... (each rank
        # still iterates the whole loader)
        return _Strided(loader, r, w)
    kwargs = dict(
        batch_size=loader.batch_size,
        sampler=_StridedSampler(len(ds), r, w),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device,
    )
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    return torch.utils.data.DataLoader(ds, **kwargs)


def shard(
    data: Any,
    group: Any = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
) -> Any:
    """This rank's shard of ``data``: a ``DistributedSampler``-style split, rank ``r`` of ``W``
    taking items ``r, r+W, r+2W, ...`` (no padding: every sample is used exactly once, so the
    distributed operator is exactly the single-process one over all of ``data``).

    - a ``DataLoader`` over a map-style dataset: a new loader with the same batch size, collate
      function, workers, ... over samples ``r, r+W, ...`` (in order; ``drop_last`` then applies
      per rank). A loader over an ``IterableDataset`` or with a custom ``batch_sampler``: its
      batches ``r, r+W, ...`` (each rank still loads every batch);
    - a map-style ``Dataset``: a ``Subset`` of samples ``r, r+W, ...``;
    - one ``(inputs, targets)`` batch: a list holding the batch of samples ``r, r+W, ...`` of
      every tensor (an empty list when there are fewer samples than ranks);
    - a list or tuple of batches: batches ``r, r+W, ...``; any other iterable: the same, lazily
      (re-iterable when ``data`` is).

    ``group``: the process group (default: the default group when ``torch.distributed`` is
    initialised; outside a distributed job ``data`` comes back unchanged). ``rank`` and
    ``world_size`` override the group (tests, custom launchers).

    >>> import torch
    >>> x, y = torch.arange(5.0)[:, None], torch.arange(5)
    >>> [b[1].tolist() for b in shard((x, y), rank=0, world_size=2)]
    [[0, 2, 4]]
    >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=2)
    >>> [b[1].tolist() for b in shard(loader, rank=1, world_size=2)]
    [[1, 3]]
    """
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither")
    if rank is None:
        g = _group_or_default(group)
        if g is None:
            return data
        r, w = dist.get_rank(g), dist.get_world_size(g)
    else:
        r, w = int(rank), int(world_size)
        if w < 1 or not 0 <= r < w:
            raise ValueError(
                f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            )
    if w == 1:
        return data
    if isinstance(data, torch.utils.data.DataLoader):
        return _shard_loader(data, r, w)
    if _is_single_batch(data):
        inputs, targets = data
        if r >= len(targets):
            return []
        return [(_take(inputs, r, w), targets[r::w])]
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(
        data, torch.utils.data.IterableDataset
    ):
        return torch.utils.data.Subset(data, range(r, len(data), w))
    if isinstance(data, (list, tuple)):
        return data[r::w]
    if isinstance(data, Iterable):
        return _Strided(data, r, w)
    raise TypeError(f"cannot shard {type(data).__name__}: give a DataLoader, Dataset or iterable")


# ----------------------------------------------------------------------------------------------
# the all-reduce of a distributed product


def _native(dtype: torch.dtype) -> torch.dtype:
    """The dtype to reduce in: float32 and float64 as they are (fast kernels), others in float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _fingerprint(V: Tensor) -> tuple[Tensor, Tensor]:
    """Two numbers that identify ``V`` ([P, K]) up to round-off: a column-weighted sum and the
    Frobenius norm (reduced in V's dtype, no copy of ``V``)."""
    K = V.shape[1]
    w = torch.arange(1, K + 1, dtype=torch.float64, device=V.device)
    s = (V.sum(0, dtype=_native(V.dtype)).double() * w).sum()
    n = torch.linalg.vector_norm(V, dtype=_native(V.dtype)).double()
    return s, n


def _params_fingerprint(params, device) -> tuple[Tensor, Tensor]:
    """The sum and the norm of all ``params``."""
    s = torch.zeros((), dtype=torch.float64, device=device)
    n2 = torch.zeros((), dtype=torch.float64, device=device)
    with torch.no_grad():
        for p in params:
            if p.is_floating_point():
                s += p.sum(dtype=_native(p.dtype)).double().to(device)
                n2 += torch.linalg.vector_norm(p, dtype=_native(p.dtype)).double().to(device) ** 2
    return s, n2.sqrt()


def _differ(sums: Tensor, norms: Tensor, tol: float, sum_scale: float, eps: float) -> list[int]:
    """Ranks whose (sum, norm) fingerprint differs from rank 0's by more than round-off."""
    scale = float(norms.abs().max())
    big = float(sums.abs().max())
    ts = tol * scale * sum_scale + 4 * eps * big  # eps: the buffer's rounding of the sums
    tn = tol * scale + 4 * eps * scale
    return [
        i
        for i in range(sums.numel())
        if abs(float(sums[i] - sums[0])) > ts or abs(float(norms[i] - norms[0])) > tn
    ]


_MSG = 160  # characters of a failing rank's message carried in the product's buffer


def _message(e: BaseException) -> str:
    text = str(e).strip() or "(no message)"
    return f"{type(e).__name__}: {text}"


def _encode(text: str, n: int = _MSG) -> Tensor:
    """``text`` as ``n`` character codes (ASCII; others become ``?``), ``…``-truncated."""
    if len(text) > n:
        text = text[: n - 3] + "..."
    codes = [c if c < 128 else 63 for c in text.encode("ascii", "replace")]
    return torch.tensor(codes + [0] * (n - len(codes)), dtype=torch.float64)


def _decode(codes: Tensor) -> str:
    out = []
    for c in codes.round().to(torch.int64).tolist():
        if c <= 0 or c >= 128:
            break
        out.append(chr(c))
    return "".join(out)


def all_reduce_product(
    group,
    V: Tensor,
    compute,
    kind: str = "Hessian",
    params: Any = (),
) -> tuple[Tensor, float, int]:
    """Sum ``compute()`` over the ranks of ``group`` in one all-reduce (the core of a distributed
    operator product; see the module docstring for the failure behaviour).

    ``compute()`` returns this rank's ``(partial [K, P] or None, weight, batches)``: the weighted
    sum of its batch products (``None`` when it has no batch), the sum of the weights and the
    number of batches. ``V`` (``[P, K]``) is the block being multiplied and ``params`` the
    model's parameters: both are fingerprinted (a sum and a norm, in slots of the same
    buffer) to check that every rank multiplies the same vectors with the same model. Returns
    ``(sum of partials [K, P], sum of weights, sum of batches)``, the first in at least float32
    (float64 for a float64 operator).
    """
    P, K = V.shape
    W, r = dist.get_world_size(group), dist.get_rank(group)
    acc = torch.promote_types(V.dtype, torch.float32)
    n = K * P
    status = n + 2  # then W slots each: status, V sum, V norm, parameter sum, parameter norm
    msg = status + 5 * W  # then _MSG characters per rank: the message of a failing rank
    buf = torch.zeros(msg + _MSG * W, dtype=acc, device=V.device)
    error: BaseException | None = None
    try:
        partial, weight, batches = compute()
        if partial is not None:
            buf[:n].view(K, P).copy_(partial)
        buf[n] = float(weight)
        buf[n + 1] = float(batches)
    except Exception as e:  # join the all-reduce anyway, so that the other ranks do not hang
        error = e
        buf.zero_()
        buf[status + r] = 2.0 if isinstance(e, torch.OutOfMemoryError) else 1.0
        buf[msg + r * _MSG : msg + (r + 1) * _MSG] = _encode(_message(e))
    fps = (*_fingerprint(V), *_params_fingerprint(params, V.device))
    for i, f in enumerate(fps):
        buf[status + (i + 1) * W + r] = f
    try:
        dist.all_reduce(buf, group=group)
    except Exception as e:
        if error is not None:
            raise error from e
        raise DistributedError(
            f"rank {r} of {W}: the all-reduce of a distributed {kind} product failed ({e}). "
            "Another rank crashed, hangs or stopped calling products (every rank must multiply "
            "the same blocks in the same order), or the collective timed out: set the timeout "
            "with torch.distributed.init_process_group(timeout=...)"
        ) from e
    codes = buf[status : status + W].tolist()
    failed = [i for i, c in enumerate(codes) if c != 0]
    if failed:
        if error is not None:
            raise error
        first = failed[0]
        message = _decode(buf[msg + first * _MSG : msg + (first + 1) * _MSG].cpu())
        text = f"rank {first} failed inside a {kind} product: {message}" + (
            f" (ranks {failed} failed)" if len(failed) > 1 else ""
        )
        if any(codes[i] == 2 for i in failed):
            raise torch.OutOfMemoryError(text)
        raise DistributedError(text)
    slots = buf[status + W : status + 5 * W].double().view(4, W).cpu()
    tol = torch.finfo(V.dtype).eps ** 0.5 if V.dtype.is_floating_point else 1e-6
    eps = torch.finfo(acc).eps
    bad = _differ(slots[2], slots[3], tol, 1.0, eps)
    if bad:
        raise DistributedError(
            f"the ranks' models differ in a distributed {kind} product (the parameters of ranks "
            f"{bad} differ from rank 0's): every rank must hold the same weights (load the same "
            "checkpoint, or call torch.manual_seed with the same seed before building the model)"
        )
    bad = _differ(slots[0], slots[1], tol, float(K), eps)
    if bad:
        raise DistributedError(
            f"the ranks multiplied different vectors in a distributed {kind} product (the inputs "
            f"of ranks {bad} differ from rank 0's): every rank must pass the same block, e.g. "
            "random vectors drawn from a generator seeded the same on every rank"
        )
    return buf[:n].view(K, P), float(buf[n]), int(round(float(buf[n + 1])))
