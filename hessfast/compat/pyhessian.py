"""A drop-in for PyHessian's ``hessian`` class on hessfast's exact, K-batched products.

Change one import::

    from pyhessian import hessian                    # before
    from hessfast.compat.pyhessian import hessian    # after

    hessian_comp = hessian(model, criterion, data=(inputs, targets), cuda=True)
    top_eigenvalues, top_eigenvectors = hessian_comp.eigenvalues(top_n=5)
    trace = hessian_comp.trace()                     # list of Hutchinson samples: np.mean(trace)
    density_eigen, density_weight = hessian_comp.density(iter=100, n_v=1)

Same arguments, return types and conventions as PyHessian 0.1:

- ``hessian(model, criterion, data=None, dataloader=None, cuda=True)``: exactly one of ``data``
  (one ``(inputs, targets)`` batch) or ``dataloader`` (an iterable of batches, whose Hessians are
  averaged weighted by batch size — hessfast weights by loss terms, the same thing for per-sample
  losses and exact for ``ignore_index`` or token-level losses); ``cuda=True`` moves the data to
  ``"cuda"`` (PyHessian's default: pass ``cuda=False`` on a CPU) — the model must already be
  there. ``params``, ``max_batch_size``: hessfast extensions (a parameter subset; micro-batches).
- ``eigenvalues(maxIter=100, tol=1e-3, top_n=1)`` → ``(eigenvalues, eigenvectors)``: a list of
  ``top_n`` floats and a list of ``top_n`` lists of tensors shaped like the parameters. PyHessian
  runs power iteration with deflation, which finds the eigenvalues **largest in magnitude**
  (a large negative eigenvalue comes first if it dominates); this is what is returned, in
  decreasing ``|λ|`` order, computed by block Lanczos (:func:`hessfast.eigsh`, ``which="LM"``) to a
  residual tolerance ``tol`` — far more accurate than power iteration's relative change, in a
  small fraction of the products. ``which="LA"`` (largest algebraic, decreasing) or ``"SA"``
  (smallest algebraic, increasing) is a hessfast extension. ``maxIter`` bounds the products at
  ``maxIter · top_n`` as PyHessian's does.
- ``trace(maxIter=100, tol=1e-3)`` → the list of Hutchinson samples ``vᵀHv`` with PyHessian's
  stopping rule (stop once the running mean changes by less than ``tol`` relative); the estimate
  is ``np.mean`` of it. The Rademacher vectors are drawn as PyHessian draws them (one
  ``torch.randint_like`` per parameter from the global generator), so under the same
  ``torch.manual_seed`` the samples are PyHessian's; they are multiplied 8 to 64 at a time (one
  K-batched product), so a few more are drawn than used and the generator ends in another state.
- ``density(iter=100, n_v=1)`` → ``(eigen_list_full, weight_list_full)``: per probe, the ``iter``
  Ritz values of stochastic Lanczos quadrature (ascending) and their weights (squared first
  components, summing to 1), as lists of floats. The probes are drawn as PyHessian draws them
  and all ``n_v`` run together (one product with ``n_v`` columns per step), with full
  reorthogonalisation and the tridiagonal eigenproblem in float64. (PyHessian 0.1's own
  ``density`` calls ``torch.eig``, which torch 2 no longer has.)

Differences, on purpose:

- **The model's mode is left alone.** PyHessian calls ``model.eval()`` silently (and leaves the
  model in eval mode); hessfast computes the curvature in the model's current mode and changes
  nothing (no ``.grad`` either: PyHessian leaves the gradient graph in ``.grad``). When the model is
  in training mode and has BatchNorm or dropout, constructing a ``hessian`` warns: BatchNorm then
  uses batch statistics, and dropout in training mode is refused (``hessfast.DropoutError``).
  Call ``model.eval()`` first to get PyHessian's numbers.
- No ``gradsH`` attribute (no gradient graph is kept); ``params`` is there, as in PyHessian.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..algorithms import eigsh
from ..algorithms.recurrences import batched_lanczos
from ..operators import HessianOperator

__all__ = ["hessian"]


def _mode_sensitive(model: nn.Module) -> list[str]:
    kinds = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            kinds.append("BatchNorm")
        elif isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            kinds.append("dropout")
    return sorted(set(kinds))


class _OnDevice:
    """Re-iterable: the loader's batches moved to ``device`` as they are read (like PyHessian)."""

    def __init__(self, loader: Iterable, device: str):
        self.loader = list(loader) if iter(loader) is loader else loader
        self.device = device

    def __iter__(self):
        for inputs, targets in self.loader:
            yield inputs.to(self.device), targets.to(self.device)


class hessian:  # noqa: N801 - PyHessian's name
    """PyHessian's ``hessian`` on hessfast (see the module docstring).

    >>> import torch, hessfast
    >>> from hessfast.compat.pyhessian import hessian
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> data = (torch.randn(16, 3), torch.randint(0, 2, (16,)))
    >>> comp = hessian(model, torch.nn.CrossEntropyLoss(), data=data, cuda=False)
    >>> vals, vecs = comp.eigenvalues(top_n=2)
    >>> len(vals), [tuple(t.shape) for t in vecs[0]]
    (2, [(4, 3), (4,), (2, 4), (2,)])
    >>> samples = comp.trace()
    >>> isinstance(samples, list) and isinstance(samples[0], float)
    True
    """

    def __init__(
        self,
        model: nn.Module,
        criterion,
        data: Any = None,
        dataloader: Iterable | None = None,
        cuda: bool = True,
        *,
        params: str | Sequence[str] | None = None,
        max_batch_size: int | None = None,
    ):
        if (data is None) == (dataloader is None):
            raise ValueError(
                "pass exactly one of data=(inputs, targets) and dataloader=... (as PyHessian)"
            )
        if cuda and not torch.cuda.is_available():
            raise RuntimeError(
                "cuda=True (PyHessian's default) but torch sees no CUDA device: pass cuda=False"
            )
        kinds = _mode_sensitive(model)
        if model.training and kinds:
            warnings.warn(
                f"hessfast.compat.pyhessian: the model is in training mode and has "
                f"{' and '.join(kinds)}. PyHessian would call model.eval() silently; hessfast "
                "leaves the model's mode as it is and computes the curvature in training mode "
                "(BatchNorm with batch statistics; dropout in training mode is refused). Call "
                "model.eval() first to get PyHessian's numbers.",
                UserWarning,
                stacklevel=2,
            )
        self.model = model
        self.criterion = criterion
        self.device = "cuda" if cuda else "cpu"
        if data is not None:
            inputs, targets = data
            if cuda:
                inputs, targets = inputs.cuda(), targets.cuda()
            self.inputs, self.targets = inputs, targets
            self.data = (inputs, targets)
            self.full_dataset = False
            batches: Any = self.data
        else:
            self.data = dataloader
            self.full_dataset = True
            batches = _OnDevice(dataloader, self.device)
        # PyHessian is single-process: stay local even inside a torch.distributed job
        self.operator = HessianOperator(
            model,
            criterion,
            batches,
            params=params,
            max_batch_size=max_batch_size,
            process_group=False,
        )
        named = dict(model.named_parameters())
        self.params = [named[n] for n in self.operator.names]

    # ------------------------------------------------------------------------------------------

    def _split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, off = [], 0
        for p in self.params:
            out.append(flat[off : off + p.numel()].reshape(p.shape).detach().clone())
            off += p.numel()
        return out

    def _rademacher(self, n: int) -> torch.Tensor:
        """``n`` probes drawn as PyHessian draws them, flattened: ``[P, n]``."""
        cols = []
        for _ in range(n):
            v = [torch.randint_like(p, high=2, device=p.device) for p in self.params]
            for v_i in v:
                v_i[v_i == 0] = -1
            cols.append(torch.cat([v_i.reshape(-1) for v_i in v]))
        return torch.stack(cols, 1).to(self.operator.dtype)

    def eigenvalues(
        self, maxIter: int = 100, tol: float = 1e-3, top_n: int = 1, *, which: str = "LM"
    ) -> tuple[list[float], list[list[torch.Tensor]]]:
        """The ``top_n`` eigenvalues largest in magnitude (PyHessian's convention; ``which="LA"``
        / ``"SA"`` for the largest / smallest algebraic ones) and their eigenvectors, as lists."""
        if top_n < 1:
            raise ValueError(f"top_n must be at least 1, got {top_n}")
        if which not in ("LM", "LA", "SA"):
            raise ValueError(f"which must be 'LM', 'LA' or 'SA', got {which!r}")
        b = min(top_n, 8)
        max_iter = max(math.ceil(maxIter * top_n / b), math.ceil(top_n / b))
        # the start block comes from the global generator, as PyHessian's random start vectors do
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        evals, evecs = eigsh(
            self.operator, k=top_n, which=which, tol=tol, max_iter=max_iter, seed=seed
        )
        if which == "LM":
            order = torch.argsort(evals.abs(), descending=True, stable=True)
        elif which == "LA":
            order = torch.argsort(evals, descending=True, stable=True)
        else:
            order = torch.argsort(evals, stable=True)
        values = [float(evals[i]) for i in order]
        vectors = [self._split(evecs[:, int(i)]) for i in order]
        return values, vectors

    def trace(self, maxIter: int = 100, tol: float = 1e-3) -> list[float]:
        """Hutchinson samples ``vᵀHv`` until the running mean changes by less than ``tol``
        relative (PyHessian's rule) or ``maxIter`` samples; ``np.mean`` of the list is the
        estimate."""
        samples: list[float] = []
        trace = 0.0
        chunk = 8
        while len(samples) < maxIter:
            n = min(chunk, maxIter - len(samples))
            Z = self._rademacher(n)
            HZ = self.operator.matmat(Z)
            for val in (Z.double() * HZ.double()).sum(0).tolist():
                samples.append(float(val))
                mean = float(np.mean(samples))
                if abs(mean - trace) / (trace + 1e-6) < tol:
                    return samples
                trace = mean
            chunk = min(2 * chunk, 64)
        return samples

    def density(self, iter: int = 100, n_v: int = 1) -> tuple[list[list[float]], list[list[float]]]:  # noqa: A002
        """Stochastic Lanczos quadrature from ``n_v`` Rademacher probes, ``iter`` steps each:
        ``(eigen_list_full, weight_list_full)``, one list of ``iter`` nodes (ascending) and one of
        their weights per probe."""
        if iter < 1 or n_v < 1:
            raise ValueError(f"iter and n_v must be at least 1, got {iter} and {n_v}")
        start = self._rademacher(n_v)
        out = batched_lanczos(self.operator, start, iter)
        nodes, weights = out.quadrature()
        return [[float(x) for x in row] for row in nodes], [
            [float(x) for x in row] for row in weights
        ]
