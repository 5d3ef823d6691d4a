"""Curvature operators: the Hessian or GGN of a model's loss over a whole dataset, as a ``(P, P)``
linear operator that algorithms see only through ``matmat(V) -> H @ V``.

The dataset loss is the mean over all loss terms of all batches (the terms ``mean`` divides by:
samples, or tokens not ignored, weighted by class weights — see each loss rule's
``denominator``), so ``H = Σ_b (n_b / Σ n) H_b`` and a ragged last batch is exact. With
``reduction="sum"`` the dataset loss is the plain sum over batches. ``max_batch_size`` splits
batches into micro-batches weighted the same way: it bounds memory and changes nothing beyond
round-off.

``num_data=N`` states the divisor instead: the dataset loss is then ``(1/N) Σ_b S_b`` with ``S_b``
batch ``b``'s *summed* loss (``n_b · L_b`` for a mean loss, ``n_b`` the terms it averages;
``L_b`` itself for a sum loss). For a loss that sums over micro-batches of a dataset of ``N``
samples this is the mean over the dataset; for a mean over samples with ``N`` the number of
samples it changes nothing. ``op.gradient_and_loss()`` / ``op.gradient()`` return the gradient
and loss of the same dataset loss, weighted as the products are.

A custom ``loss_fn`` (a lambda, any callable hessfast does not recognise) hides its reduction: the
operator finds it once, from the loss on the model's output for the first batch and on that batch
duplicated (a sum doubles, a mean does not; a mean must also be the row-weighted average of the
batch's halves), and refuses with a ``ValueError`` when the values decide neither. Pass
``reduction="sum"`` (batches added) or ``"mean"`` (batches weighted by their number of target
elements) to state it instead.

Bad data: a batch with no sample counts zero, and so does a batch whose every target is
``ignore_index`` under a ``mean`` (both are skipped; data with nothing left is a ``ValueError``).
``data`` must be re-iterable — a one-shot iterator such as a generator is refused at construction
(pass ``list(...)`` or a ``DataLoader``).

Determinism: an operator must be the same matrix on every pass. A shuffled ``DataLoader`` with
``drop_last=True``, BatchNorm in training mode over batches that change, dropout, or random
augmentation make each pass a different matrix, and Lanczos, CG and SLQ then never converge. So
the first product runs twice (two passes over the data) whenever the data has more than one batch
or the model has train-mode BatchNorm or dropout, and a difference beyond rounding is a
``ValueError`` naming the likely cause (``check_deterministic=False`` skips it; curvlinops'
``check_deterministic`` is the same idea). ``op.deterministic`` says what happened.

Data-parallel: with ``process_group`` (by default the default group whenever
``torch.distributed`` is initialised) every rank holds the model and its shard of the data, and a
product sums the ranks' weighted partial products and loss-term counts in one all-reduce, so
``H`` is exactly the curvature over the union of the shards, and every rank gets the same
result; see :mod:`hessfast.distributed`.

``backend=`` (``"auto"``, ``"cuda"``, ``"triton"``, ``"torch"``) picks the rule implementations of
every product this operator computes, as on :func:`hessfast.hvp` (see :mod:`hessfast.backends`);
``compile=`` (``None``: traced graphs; ``"interpret"``, ``"inductor"``, ``"cudagraphs"``) how they
run (see :mod:`hessfast.traced`).

Example:
    >>> import torch, torch.nn.functional as F, hessfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> data = [(torch.randn(5, 3), torch.randint(0, 2, (5,))) for _ in range(3)]
    >>> H = hessfast.HessianOperator(model, F.cross_entropy, data)
    >>> H.shape
    (26, 26)
    >>> (H @ torch.randn(26, 4)).shape
    torch.Size([26, 4])
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import api, autograd_fallback, losses, traced
from . import distributed as _dist
from .dispatch import check_choice
from .errors import NonFiniteError
from .vectors import Vectors, first_non_finite, parse, select_params

Tensor = torch.Tensor


class CurvatureOperator:
    """A symmetric ``(P, P)`` operator: ``shape``, ``dtype``, ``device`` and ``matmat``.

    ``op @ v`` takes a flat ``[P]`` vector or a ``[P, K]`` block and returns the same shape.

    Operators combine lazily (:mod:`hessfast.operator_algebra`): ``H - G``, ``H + G``, ``a * H``,
    ``H / a``, ``-H``, ``H + λ * hessfast.IdentityOperator(P)`` or ``H.shift(λ)``, ``A @ B`` (an
    operator times an operator), ``H.T``; each is again an operator. ``symmetric`` says whether
    the operator is known to be symmetric (a product of different operators is not).

    >>> import torch, hessfast
    >>> A = hessfast.DenseOperator(torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)))
    >>> ((A - 0.5 * A.shift(1.0)) @ torch.ones(2, dtype=torch.float64)).tolist()
    [1.0, 0.0]
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    symmetric: bool = True
    __array_ufunc__ = None  # NumPy scalars defer to __rmul__: np.float64(2) * H is an operator

    def matmat(self, V: Tensor) -> Tensor:
        raise NotImplementedError

    def matvec(self, v: Tensor) -> Tensor:
        return self.matmat(v[:, None])[:, 0]

    def __matmul__(self, v):
        if isinstance(v, torch.Tensor):
            if v.dim() == 1:
                return self.matvec(v)
            if v.dim() == 2:
                return self.matmat(v)
            raise ValueError(f"operator @ v: v must be [P] or [P, K], got {list(v.shape)}")
        if isinstance(v, CurvatureOperator):
            from . import operator_algebra

            return operator_algebra.compose(self, v)
        return NotImplemented

    def __add__(self, other):
        from . import operator_algebra

        if isinstance(other, CurvatureOperator):
            return operator_algebra.add(self, other)
        if _is_zero(other):  # sum([H, G]) starts from 0
            return self
        if isinstance(other, (numbers.Number, torch.Tensor)):
            raise TypeError(
                f"operator + {type(other).__name__}: adding a number to an operator is "
                "ambiguous; for H + λI write H.shift(λ) or H + λ * hessfast.IdentityOperator(P)"
            )
        return NotImplemented

    __radd__ = __add__

    def __sub__(self, other):
        if isinstance(other, CurvatureOperator):
            return self + (-other)
        if _is_zero(other):
            return self
        return self.__add__(other)

    def __rsub__(self, other):
        return (-self).__add__(other)

    def __neg__(self):
        return self * -1.0

    def __pos__(self):
        return self

    def __mul__(self, alpha):
        from . import operator_algebra

        if isinstance(alpha, CurvatureOperator):
            raise TypeError("operator * operator: use A @ B for the product of two operators")
        return operator_algebra.scale(self, operator_algebra.scalar(alpha, "operator * a"))

    __rmul__ = __mul__

    def __truediv__(self, alpha):
        from . import operator_algebra

        a = operator_algebra.scalar(alpha, "operator / a")
        if a == 0.0:
            raise ZeroDivisionError("operator / 0: division of an operator by zero")
        return operator_algebra.scale(self, 1.0 / a)

    def shift(self, lam: float) -> CurvatureOperator:
        """``self + lam·I``, the identity taking this operator's size, dtype and device.

        >>> import torch, hessfast
        >>> A = hessfast.DenseOperator(torch.eye(2, dtype=torch.float64))
        >>> (A.shift(0.5) @ torch.ones(2, dtype=torch.float64)).tolist()
        [1.5, 1.5]
        """
        from . import operator_algebra

        lam = operator_algebra.scalar(lam, "operator.shift(λ)")
        return self + lam * operator_algebra.identity_like(self)

    def adjoint(self) -> CurvatureOperator:
        """The adjoint (transpose): the operator itself when it is symmetric."""
        if self.symmetric:
            return self
        raise TypeError(f"{type(self).__name__} is not symmetric and defines no adjoint()")

    @property
    def T(self) -> CurvatureOperator:
        """The transpose, :meth:`adjoint`."""
        return self.adjoint()

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 NumPy in and out) over this operator;
        its ``rmatvec`` is the adjoint's product."""
        import numpy as np

        try:
            from scipy.sparse.linalg import LinearOperator
        except ImportError as e:
            raise ImportError("to_scipy() needs SciPy: pip install scipy") from e

        def product(op):
            def mm(X):
                X = np.asarray(X)
                one = X.ndim == 1
                T = torch.as_tensor(X.reshape(X.shape[0], -1)).to(self.device, self.dtype)
                out = op.matmat(T).to("cpu", torch.float64).numpy()
                return out[:, 0] if one else out

            return mm

        mm, rmm = product(self), product(self.adjoint())
        return LinearOperator(
            self.shape, matvec=mm, matmat=mm, rmatvec=rmm, rmatmat=rmm, dtype=np.float64
        )

    def check_symmetric(self, num_probes: int = 2, seed: int = 0, rtol: float | None = None):
        """Raise ``ValueError`` unless ``⟨u, H v⟩ = ⟨H u, v⟩`` on ``num_probes`` random probe
        pairs (one product of ``2 · num_probes`` columns); the error names the likely causes."""
        P = self.shape[0]
        if self.shape[0] != self.shape[1]:
            raise ValueError(f"operator is not square: shape {self.shape}")
        g = torch.Generator().manual_seed(seed)
        U = torch.randn(P, 2 * num_probes, generator=g).to(self.device, self.dtype)
        HU = self.matmat(U)
        u, v = U[:, :num_probes], U[:, num_probes:]
        hu, hv = HU[:, :num_probes], HU[:, num_probes:]
        a = (u * hv).sum(0).double()
        b = (hu * v).sum(0).double()
        if rtol is not None:
            tol = rtol
        else:
            tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(self.dtype, 5e-2)
        scale = (hu.double().norm(dim=0) * v.double().norm(dim=0)).clamp_min(1e-300)
        scale = scale + (u.double().norm(dim=0) * hv.double().norm(dim=0))
        if ((a - b).abs() > tol * scale).any():
            raise ValueError(
                f"operator is not symmetric: <u, Hv> - <Hu, v> = {(a - b).abs().max():.3g} on "
                f"random probes (tolerance {tol:g} relative), and the symmetric algorithms "
                "(Lanczos, CG, SLQ) would return meaningless numbers. "
                + (
                    "It is a product of different operators, which is symmetric only when they "
                    "commute: use A @ A, A @ B @ A or (A @ B + B @ A) / 2. "
                    if getattr(self, "symmetric", True) is False
                    else ""
                )
                + "Likely causes: randomness "
                "in forward (dropout, noise, sampling), a model or loss that is not twice "
                "differentiable where it is evaluated, a tensor changed between products, or an "
                "op whose custom autograd formula treats a value as constant on one side only. "
                "Pass check_symmetric=False to skip this probe."
            )


class DenseOperator(CurvatureOperator):
    """A dense symmetric matrix as an operator (tests, small problems, and known spectra).

    >>> import torch
    >>> A = DenseOperator(torch.diag(torch.tensor([3.0, 1.0])))
    >>> A @ torch.ones(2)
    tensor([3., 1.])
    """

    def __init__(self, matrix: Tensor):
        if matrix.dim() != 2:
            raise ValueError(f"DenseOperator needs a matrix, got shape {list(matrix.shape)}")
        self.matrix = matrix
        self.shape = tuple(matrix.shape)
        self.dtype = matrix.dtype
        self.device = matrix.device
        self.products = 0  # columns multiplied so far (tests count products with it)

    def matmat(self, V: Tensor) -> Tensor:
        self.products += V.shape[1]
        return self.matrix @ V


def _is_single_batch(data: Any) -> bool:
    """One ``(inputs, targets)`` pair (targets a tensor) rather than an iterable of pairs."""
    return isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], torch.Tensor)


def _split(x: Any, size: int) -> list:
    """Split model inputs — a tensor, a tuple or list of them, or a dict of them (passed as
    ``model(**x)``) — along the tensors' first axis into chunks of ``size``; other entries are
    repeated in every chunk."""
    if isinstance(x, torch.Tensor):
        return list(torch.split(x, size))
    if isinstance(x, Mapping):
        keys = list(x)
        return [dict(zip(keys, vals)) for vals in _split([x[k] for k in keys], size)]
    parts = [_split(t, size) if isinstance(t, torch.Tensor) else None for t in x]
    n = max(len(p) for p in parts if p is not None)
    return [tuple(p[i] if p is not None else t for p, t in zip(parts, x)) for i in range(n)]


def has_active_dropout(model: nn.Module) -> bool:
    """Whether a dropout module of ``model`` is in training mode with ``p > 0`` (the loss is then
    random: no fixed operator).

    >>> has_active_dropout(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1)).eval())
    False
    """
    return any(
        isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
        for m in model.modules()
    )


def has_train_batchnorm(model: nn.Module) -> bool:
    """Whether a BatchNorm module of ``model`` is in training mode (the loss of a sample then
    depends on its batch).

    >>> has_train_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))
    True
    """
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()
    )


class ModelOperator(CurvatureOperator):
    """The curvature of a model's loss over a dataset: what :class:`HessianOperator`,
    :class:`GGNOperator`, :class:`ResidualOperator` and the Fisher operators share (batching,
    weighting by loss terms, the determinism check, the engine ``mode`` a subclass sets)."""

    mode = "hvp"
    kind = "Hessian"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Any,
        params: str | Sequence[str] | None = None,
        max_batch_size: int | None = None,
        progress: bool = False,
        *,
        process_group: Any = None,
        backend: str | None = None,
        reduction: str | None = None,
        compile: str | None = None,
        output: str | int | None = None,
        check_deterministic: bool = True,
        num_data: int | None = None,
    ):
        if num_data is not None and (
            isinstance(num_data, bool) or not isinstance(num_data, numbers.Integral) or num_data < 1
        ):
            raise ValueError(
                f"num_data must be a positive integer (the N the dataset loss divides by), "
                f"got {num_data!r}"
            )
        #: the divisor of the dataset loss when given (see the module docstring), else None
        self.num_data = None if num_data is None else int(num_data)
        if backend is not None:
            check_choice(backend, f"{type(self).__name__}(backend=...)")
        traced.check_mode(compile)
        self.compile = compile
        self.output = output
        self.check_deterministic = bool(check_deterministic)
        #: the determinism check's outcome: None (not run yet), "passed", "skipped"
        #: (check_deterministic=False) or "not needed" (one fixed batch, no train-mode BatchNorm
        #: or dropout)
        self.deterministic: str | None = None if check_deterministic else "skipped"
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, not {type(model).__name__}")
        losses.check_loss_fn(loss_fn)
        if reduction not in (None, "mean", "sum"):
            raise ValueError(
                f"reduction={reduction!r}: 'mean' (batches weighted by their number of target "
                "elements), 'sum' (batches added) or None (found from loss_fn)"
            )
        self.backend = backend
        self.model = model
        self.loss_fn = loss_fn
        self.reduction = reduction
        self._probed: str | None = None  # how a custom loss_fn reduces, once found
        self.single = _is_single_batch(data)
        self.data = data
        if not self.single and not isinstance(data, Iterable):
            raise ValueError(
                "data must be one (inputs, targets) batch or an iterable of such batches "
                f"(a DataLoader), not {type(data).__name__}"
            )
        if not self.single and isinstance(data, Iterator):
            raise ValueError(
                f"data is a one-shot iterator ({type(data).__name__}): an operator reads the "
                "data once per product, and a second product would find it exhausted. Pass "
                "something re-iterable: a list (data=list(batches)) or a DataLoader"
            )
        self.params = params
        self.selected = select_params(model, params)
        self.names = [n for n, _ in self.selected]
        self.sizes = [p.numel() for _, p in self.selected]
        P = sum(self.sizes)
        self.shape = (P, P)
        first = self.selected[0][1]
        self.dtype, self.device = first.dtype, first.device
        if max_batch_size is not None:
            if (
                isinstance(max_batch_size, bool)
                or not isinstance(max_batch_size, numbers.Integral)
                or max_batch_size < 1
            ):
                raise ValueError(
                    f"max_batch_size must be a positive integer, got {max_batch_size!r}"
                )
            max_batch_size = int(max_batch_size)
            if has_train_batchnorm(model):
                raise ValueError(
                    "max_batch_size would change the batch statistics of BatchNorm in training "
                    "mode, and with them the curvature: call model.eval() or drop max_batch_size"
                )
        self.max_batch_size = max_batch_size
        self.progress = progress
        self.process_group = _dist.resolve_group(process_group)
        if self.process_group is not None:
            backend = str(torch.distributed.get_backend(self.process_group))
            if backend == "nccl" and self.device.type != "cuda":
                raise ValueError(
                    f"process_group uses NCCL, which needs the model on a CUDA device, but its "
                    f"parameters are on {self.device}: move the model to the GPU of this rank, "
                    "or use a gloo group for a CPU model"
                )

    @property
    def world_size(self) -> int:
        """Processes whose shards this operator sums (1 for a local operator)."""
        pg = self.process_group
        return 1 if pg is None else torch.distributed.get_world_size(pg)

    @property
    def rank(self) -> int:
        """This process's rank in the operator's process group (0 for a local operator)."""
        pg = self.process_group
        return 0 if pg is None else torch.distributed.get_rank(pg)

    def block(self, params: str | Sequence[str]) -> ModelOperator:
        """The diagonal block of a parameter subset (names or glob patterns), itself an operator."""
        sub = select_params(self.model, params)
        outside = [n for n, _ in sub if n not in self.names]
        if outside:
            raise ValueError(
                f"block {params!r} selects parameters outside this operator: {outside}"
            )
        return type(self)(
            self.model,
            self.loss_fn,
            self.data,
            [n for n, _ in sub],
            self.max_batch_size,
            self.progress,
            process_group=self.process_group if self.process_group is not None else False,
            backend=self.backend,
            reduction=self.reduction or self._probed,
            compile=self.compile,
            output=self.output,
            check_deterministic=self.check_deterministic,
            **self._options(),
        )

    def _options(self) -> dict[str, Any]:
        """Keyword options a subclass adds, passed on to :meth:`block`."""
        return {"num_data": self.num_data}

    def groups(self, by: str | Sequence[str] = "module") -> dict[str, list[tuple[int, int]]]:
        """Partition of the flat parameter vector into labelled groups of ``(start, stop)`` ranges.

        ``by="module"`` groups parameters by the module that owns them (``blocks.0.fc.weight`` and
        ``blocks.0.fc.bias`` → ``blocks.0.fc``); ``"parameter"`` gives each tensor its own group;
        a list of names/glob patterns gives one group per pattern (each parameter in the first
        pattern that matches it).
        """
        import fnmatch

        offsets, off = {}, 0
        for n, size in zip(self.names, self.sizes):
            offsets[n] = (off, off + size)
            off += size
        out: dict[str, list[tuple[int, int]]] = {}
        if isinstance(by, str) and by in ("module", "parameter"):
            for n in self.names:
                label = n.rsplit(".", 1)[0] if by == "module" and "." in n else n
                out.setdefault(label, []).append(offsets[n])
            return out
        patterns = [by] if isinstance(by, str) else list(by)
        taken = set()
        for pat in patterns:
            hits = [n for n in self.names if n not in taken and fnmatch.fnmatchcase(n, pat)]
            if not hits:
                raise ValueError(f"group pattern {pat!r} matches no parameter of this operator")
            taken.update(hits)
            out[pat] = [offsets[n] for n in hits]
        return out

    def batches(self):
        it = [self.data] if self.single else self.data
        if self.progress:
            try:
                from tqdm.auto import tqdm

                it = tqdm(it, desc=f"{self.kind} product", leave=False)
            except ImportError:
                pass
        for batch in it:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise ValueError("each batch must be an (inputs, targets) pair")
            inputs, targets = batch
            if self.max_batch_size is None:
                yield inputs, targets
                continue
            n = len(targets) if isinstance(targets, torch.Tensor) else None
            if n is None or n <= self.max_batch_size:
                yield inputs, targets
                continue
            ins = _split(inputs, self.max_batch_size)
            yield from zip(ins, torch.split(targets, self.max_batch_size))

    def _vectors(self, V: Tensor) -> Vectors:
        if V.dim() != 2 or V.shape[0] != self.shape[0]:
            raise ValueError(f"V must be [P, K] with P={self.shape[0]}, got {list(V.shape)}")
        Vt = V.T
        if Vt.stride() != (Vt.shape[1], 1):
            # one canonical layout of the K tangent rows: the traced product is specialised on
            # strides, and a [P, 1] column (strides (1, 1) once transposed, as SciPy's vectors
            # come) traced a second, slower graph (measured 1.7x on a small ResNet). A contiguous
            # column is that row already, viewed; copying it took 8 ms at P = 1.2 M on a CPU
            # (the copy kernel's path for those strides), 16% of the product
            if V.shape[1] == 1 and V.is_contiguous():
                Vt = V.view(1, V.shape[0])
            else:
                Vt = torch.empty(Vt.shape, dtype=V.dtype, device=V.device).copy_(Vt)
        return parse(Vt, self.selected)

    def _weighs_batches(self) -> bool:
        """Whether batches may be more than one, or ``num_data`` divides their summed losses, so
        that their weights matter."""
        return (
            not self.single
            or self.max_batch_size is not None
            or self.process_group is not None
            or self.num_data is not None
        )

    def _model_output(self, inputs: Any) -> Any:
        """One plain forward without gradients; buffers (BatchNorm statistics) and the RNG state
        are left as they were."""
        args, kwargs = api.split_inputs(inputs)
        saved = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                return self.model(*args, **kwargs)
        finally:
            with torch.no_grad():
                for n, b in self.model.named_buffers():
                    b.copy_(saved[n])

    def _custom_reduction(self, inputs: Any, targets: Any) -> str | None:
        """How a custom ``loss_fn`` reduces over a batch (``"sum"``/``"mean"``; ``None`` when it
        does not matter): ``reduction=`` if given, else probed once on the model's output for the
        first batch (:func:`hessfast.losses.probe_reduction`), which also refuses a model output
        that is not one tensor."""
        if self.reduction is not None:
            return self.reduction
        if self._probed is None:
            out = self._model_output(inputs)
            z, rule = autograd_fallback.select_output(
                out, losses.FuncLoss(self.loss_fn, targets), self.output
            )
            if not self._weighs_batches():
                return None
            self._probed = losses.probe_reduction(rule.loss_fn, z, targets)
        return self._probed

    def _weighted_batches(self) -> Iterator[tuple[Any, Any, float | None]]:
        """``(inputs, targets, w)`` of every batch that counts: ``w`` is the batch's weight in
        the dataset loss (its loss ``mean`` divides by, so that ``w · L_b`` is its summed loss),
        ``None`` for a batch whose loss is a sum. Empty batches (targets with no sample) and, for
        a mean, batches with nothing to count (every target ``ignore_index``) are skipped and
        recorded in ``self._skipped``."""
        self._skipped = []
        for inputs, targets in self.batches():
            if losses.is_empty_batch(targets):
                self._skipped.append("empty")
                continue
            rule = losses.resolve(self.loss_fn, targets)
            w = rule.denominator()
            if w == 0:  # a mean over no counted target (all ignore_index): nothing to add
                self._skipped.append("ignored")
                continue
            if isinstance(rule, losses.FuncLoss):
                if self._custom_reduction(inputs, targets) == "sum":
                    w = None
            yield inputs, targets, w

    def _partial(self, vec: Vectors) -> tuple[Tensor | None, float, int]:
        """This process's ``(Σ_b w_b · H_b V [K, P] or None, Σ_b w_b, number of batches)``
        (``w_b`` from :meth:`_weighted_batches`; a sum batch adds ``H_b V`` and no weight); one
        mean batch without ``num_data`` or a process group is ``(H_b V, 0.0, 1)``: the quotient
        itself, with nothing left to divide by (not multiplied by ``w_b`` and divided again)."""
        total = None
        pending = None  # the first batch's weight, not yet applied
        weight_sum = 0.0
        seen = 0
        for inputs, targets, w in self._weighted_batches():
            seen += 1
            _, _, prods = api.compute(
                self.model,
                self.loss_fn,
                inputs,
                targets,
                self.selected,
                vec,
                self.mode,
                False,
                backend=self.backend,
                compile=self.compile,
                output=self.output,
                grads=False,
            )
            flat = torch.cat([prods[n].reshape(vec.k, -1) for n in self.names], dim=1)
            # weights applied in place on the new tensors cat returned: no further [K, P]
            # allocation per batch
            if w is not None:
                weight_sum += w
            if total is None:
                total, pending = flat, w
                continue
            if pending is not None:
                total.mul_(pending)
                pending = None
            if w is not None:
                flat.mul_(w)
            total.add_(flat)
        if pending is not None:
            if self.process_group is None and self.num_data is None:
                # one mean batch: w · H_b / w is H_b itself (two passes over [K, P] saved)
                return total, 0.0, seen
            total.mul_(pending)
        return total, weight_sum, seen

    def _normalise(self, total: Tensor, weight_sum: float, inplace: bool = False) -> Tensor:
        """The dataset quantity from the summed batch terms: divided by ``num_data`` when
        given, else by the summed weights of the mean batches (none: a sum, left as it is);
        ``inplace``: into ``total`` itself."""
        if self.num_data is not None:
            d = self.num_data
        elif weight_sum:
            d = weight_sum
        else:
            return total
        return total.div_(d) if inplace else total / d

    def _pass(self, V: Tensor, vec: Vectors) -> tuple[Tensor | None, float, int]:
        if self.process_group is None:
            return self._partial(vec)
        return _dist.all_reduce_product(
            self.process_group,
            V,
            lambda: self._partial(vec),
            self.kind,
            params=self.model.parameters(),
        )

    def _needs_determinism_check(self) -> bool:
        """Whether two passes could differ: more than one batch (a DataLoader may shuffle, drop
        a ragged last batch, or augment), or train-mode BatchNorm or dropout. Always under a
        process group: every rank must make the same number of all-reduces."""
        if not self.single or self.process_group is not None:
            return True
        return has_train_batchnorm(self.model) or has_active_dropout(self.model)

    def matmat(self, V: Tensor) -> Tensor:
        return self.matmat_norms(V)[0]

    #: what :class:`~hessfast.algorithms.krylov.Products` checks before calling
    #: :meth:`matmat_norms` instead of ``matmat`` (a subclass or instance that replaces
    #: ``matmat`` keeps being called through it)
    _matmat_is_norms = matmat

    def matmat_norms(self, V: Tensor) -> tuple[Tensor, Tensor]:
        """``(H @ V, its column norms)``: the norms (float32 or wider, ``[K]``) are the result's
        finiteness check, so an algorithm that needs both (Lanczos reads every product's column
        norms) gets them without a second pass over ``[P, K]``.

        >>> import torch, torch.nn.functional as F, hessfast
        >>> model = torch.nn.Linear(3, 2)
        >>> H = hessfast.HessianOperator(model, F.mse_loss, (torch.randn(4, 3), torch.randn(4, 2)))
        >>> HV, norms = H.matmat_norms(torch.randn(8, 2))
        >>> bool(torch.allclose(norms, HV.norm(dim=0)))
        True
        """
        vec = self._vectors(V)
        total, weight_sum, seen = self._pass(V, vec)
        if self.deterministic is None:
            if not self._needs_determinism_check():
                self.deterministic = "not needed"
            elif seen:
                first = self._normalise(total, weight_sum)
                total, weight_sum, seen = self._pass(V, vec)
                second = self._normalise(total, weight_sum)
                self._check_same(first, second)
                self.deterministic = "passed"
        if not seen:
            self._no_batch_error()
        total = self._normalise(total, weight_sum, inplace=True).to(self.dtype)
        wide = torch.promote_types(total.dtype, torch.float32)
        norms = torch.linalg.vector_norm(total, dim=1, dtype=wide)
        # finite norms mean finite entries; an infinite one may be an overflow: asked exactly
        if not bool(torch.isfinite(norms).all()) and first_non_finite({"product": total}):
            raise NonFiniteError(
                f"a {self.kind}-vector product over the data contains NaN or Inf: check the data, "
                "the loss scale and the dtype"
            )
        return total.T, norms

    def gradient_and_loss(self) -> tuple[Tensor, Tensor]:
        """The gradient ``[P]`` (flat, in ``named_parameters()`` order over this operator's
        parameters) and the loss (a 0-d tensor) of the dataset loss whose curvature the operator
        is: the batches weighted exactly as in its products (ragged batches, ``ignore_index``,
        class weights, a custom loss's reduction, ``num_data``, the shards of a process group),
        so that ``newton_step(H, H.gradient())`` needs no hand weighting. One pass over the data
        (``hessfast.grad``'s engine per batch); raises ``ValueError`` as a product does when no
        batch counts.

        >>> import torch, torch.nn.functional as F, hessfast
        >>> model = torch.nn.Linear(3, 2)
        >>> data = [(torch.randn(4, 3), torch.randint(0, 2, (4,))), (torch.randn(1, 3), torch.tensor([1]))]
        >>> H = hessfast.GGNOperator(model, F.cross_entropy, data)
        >>> g, loss = H.gradient_and_loss()
        >>> x, y = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
        >>> bool(torch.allclose(loss, F.cross_entropy(model(x), y)))
        True
        """
        P = self.shape[0]

        def partial() -> tuple[Tensor | None, float, int]:
            total, weight_sum, seen = None, 0.0, 0
            for inputs, targets, w in self._weighted_batches():
                seen += 1
                loss, grads, _ = api.compute(
                    self.model,
                    self.loss_fn,
                    inputs,
                    targets,
                    self.selected,
                    None,
                    "grad",
                    False,
                    backend=self.backend,
                    compile=self.compile,
                    output=self.output,
                )
                row = torch.cat(
                    [grads[n].reshape(-1) for n in self.names] + [loss.detach().reshape(1)]
                )[None].to(torch.promote_types(self.dtype, torch.float32))
                if w is not None:
                    weight_sum += w
                    row = row * w
                total = row if total is None else total + row
            return total, weight_sum, seen

        if self.process_group is None:
            total, weight_sum, seen = partial()
        else:
            marker = torch.zeros(P + 1, 1, dtype=self.dtype, device=self.device)
            total, weight_sum, seen = _dist.all_reduce_product(
                self.process_group, marker, partial, "gradient", params=self.model.parameters()
            )
        if not seen:
            self._no_batch_error()
        row = self._normalise(total[0], weight_sum)
        if first_non_finite({"gradient": row}) is not None:
            raise NonFiniteError(
                "the gradient or loss over the data contains NaN or Inf: check the data, the "
                "loss scale and the dtype"
            )
        return row[:P].to(self.dtype), row[P].to(self.dtype)

    def gradient(self) -> Tensor:
        """The gradient ``[P]`` of the dataset loss: :meth:`gradient_and_loss` without the loss.

        >>> import torch, torch.nn.functional as F, hessfast
        >>> H = hessfast.HessianOperator(torch.nn.Linear(3, 2), F.mse_loss,
        ...                              (torch.randn(5, 3), torch.randn(5, 2)))
        >>> H.gradient().shape
        torch.Size([8])
        """
        return self.gradient_and_loss()[0]

    def _no_batch_error(self) -> None:
        """Raise the ``ValueError`` of a pass over the data in which no batch counted."""
        skipped = getattr(self, "_skipped", [])
        if skipped and all(s == "empty" for s in skipped):
            why = f"every batch is empty ({len(skipped)} batches with no sample)"
        elif skipped:
            why = (
                "no batch has a target that counts (every target equals ignore_index, or the "
                "batch is empty): the mean loss over the data is undefined"
            )
        else:
            why = "data is empty: the operator needs at least one batch"
        raise ValueError(why + (" (on every rank)" if self.process_group is not None else ""))

    def _check_same(self, first: Tensor | None, second: Tensor | None) -> None:
        """Raise ``ValueError`` naming the likely cause unless two passes over the data gave the
        same product (relative to the dtype: rounding from a different batch order passes)."""
        if first is None or second is None:
            return
        a, b = first.double(), second.double()
        diff = float((a - b).norm())
        scale = max(float(a.norm()), float(b.norm()), 1e-300)
        tol = {torch.float64: 1e-10, torch.float32: 1e-4}.get(self.dtype, 5e-2)
        if diff <= tol * scale or not math.isfinite(diff) or not math.isfinite(scale):
            return  # the same, or not finite: the finiteness check below says so
        causes = []
        loader = self.data
        sampler = getattr(loader, "sampler", None)
        shuffled = isinstance(sampler, torch.utils.data.RandomSampler)
        if shuffled and getattr(loader, "drop_last", False):
            causes.append(
                "a DataLoader with shuffle=True and drop_last=True (each pass drops different "
                "samples): use drop_last=False or shuffle=False"
            )
        if has_train_batchnorm(self.model) and (shuffled or not self.single):
            causes.append(
                "BatchNorm in training mode over batches that change between passes (its "
                "statistics, and so H, depend on which samples share a batch): call model.eval() "
                "or pass a DataLoader with shuffle=False"
            )
        elif has_train_batchnorm(self.model):
            causes.append("BatchNorm in training mode")
        if shuffled and not causes:
            causes.append(
                "a shuffled DataLoader (shuffle=True) whose batches change from pass to pass"
            )
        if has_active_dropout(self.model):
            causes.append("dropout in training mode (call model.eval())")
        causes.append(
            "random data augmentation in the dataset, or randomness in forward (noise, sampling)"
        )
        raise ValueError(
            f"the {self.kind} is not deterministic: two passes over the data gave products that "
            f"differ by {diff / scale:.3g} (relative; tolerance {tol:g}), so H is a different "
            "matrix on each pass and eigsh, CG and SLQ would burn their budget on noise. Likely "
            "causes: " + "; ".join(causes) + ". Pass check_deterministic=False to skip this "
            "check."
        )

    def __matmul__(self, v):
        if isinstance(v, dict):
            vec = parse(v, self.selected)
            flat = torch.cat([vec.tangents[n].reshape(vec.k, -1) for n in self.names], dim=1)
            out = self.matmat(flat.T).T
            res, off = {}, 0
            for n, size in zip(self.names, self.sizes):
                shape = vec.tangents[n].shape[1:]
                piece = out[:, off : off + size].reshape(vec.k, *shape)
                res[n] = piece if vec.batched else piece[0]
                off += size
            return res
        return super().__matmul__(v)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(P={self.shape[0]:,}, params={len(self.names)} tensors, "
            f"dtype={self.dtype}, device={self.device}"
            + (f", rank={self.rank} of {self.world_size}" if self.process_group is not None else "")
            + ")"
        )


class HessianOperator(ModelOperator):
    """The exact Hessian of the dataset loss (see the module docstring).

    ``HessianOperator(model, loss_fn, data, params=None, max_batch_size=None, progress=False,
    process_group=None, backend=None, reduction=None, compile=None, output=None,
    check_deterministic=True, num_data=None)``: ``num_data`` divides the summed batch losses by
    ``N`` (module docstring); ``check_deterministic`` runs the first product twice where two
    passes could differ and raises ``ValueError`` naming the likely cause if they do (module
    docstring); ``reduction`` states how a custom
    ``loss_fn`` reduces over a batch (``"mean"``/``"sum"``; ``None``: found from ``loss_fn``,
    see the module docstring). ``process_group=None`` sums the shards of all ranks of the default
    group when ``torch.distributed`` is initialised (``data`` is then this rank's shard, see
    :func:`hessfast.distributed.shard`) and is local otherwise; ``False`` is local even inside a
    distributed job; a ``ProcessGroup`` sums over that group. The same holds for
    :class:`GGNOperator`.
    """

    mode = "hvp"
    kind = "Hessian"


class GGNOperator(ModelOperator):
    """The generalised Gauss-Newton ``Jᵀ H_L J`` of the dataset loss (positive semidefinite for
    convex losses)."""

    mode = "ggn"
    kind = "GGN"


class ResidualOperator(ModelOperator):
    """The residual ``R = H − G`` of the Gauss-Newton decomposition: ``Σ_i (∂L/∂z_i) ∇²_θ z_i``,
    the Hessian's part from the model outputs' second derivatives (symmetric, indefinite; all of
    the Hessian's negative curvature for a convex loss). One product is one engine pass, an HVP
    pass without the loss Hessian's term, so it costs about an HVP, not an HVP and a GGN-VP.
    Same arguments as :class:`HessianOperator`.

    Example::

        >>> import torch, torch.nn.functional as F, hessfast
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> H, G = (C(model, F.cross_entropy, (x, y)) for C in (HessianOperator, GGNOperator))
        >>> R = ResidualOperator(model, F.cross_entropy, (x, y))
        >>> v = torch.randn(R.shape[0])
        >>> torch.allclose(R @ v, H @ v - G @ v, atol=1e-5)
        True
    """

    mode = "residual"
    kind = "residual (H − G)"


def bytes_needed(P: int, columns: int, dtype: torch.dtype) -> int:
    """Bytes of a ``[P, columns]`` basis in ``dtype`` (for memory errors in algorithms)."""
    return P * columns * torch.empty(0, dtype=dtype).element_size()


def is_model_operator(op: Any) -> bool:
    """Whether ``op`` is one of hessfast's curvature operators of a model (Hessian, GGN), whose
    symmetry the algorithms probe by default."""
    return isinstance(op, ModelOperator)


def _is_zero(x: Any) -> bool:
    """``x`` is the number 0 (the start of ``sum()``)."""
    return isinstance(x, numbers.Number) and not isinstance(x, bool) and x == 0
