"""Curvature over training: :class:`HessianMonitor` records ``λ_max``, the trace and more at regular
steps of a training loop, to a JSONL file, and plots them.

A sharpness that keeps rising to ``2 / learning rate`` (the edge of stability), a trace that
explodes, or negative curvature that grows are optimisation-health signals; the monitor measures
them on a fixed probe set with exact Hessian-vector products, at a cost of a few dozen products
per record.

Example:
    >>> import torch, torch.nn.functional as F, hessfast, tempfile, os
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> probe = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
    >>> path = os.path.join(tempfile.mkdtemp(), "curvature.jsonl")
    >>> monitor = hessfast.HessianMonitor(model, F.cross_entropy, probe, every=10, path=path)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> for step in range(21):
    ...     loss = F.cross_entropy(model(probe[0]), probe[1])
    ...     opt.zero_grad(); loss.backward(); opt.step()
    ...     record = monitor.step(step)  # None between records
    >>> [r["step"] for r in monitor.records], sorted(monitor.records[0])
    ([0, 10, 20], ['lambda_max', 'products', 'seconds', 'step', 'trace', 'trace_stderr'])
    >>> len(open(path).read().splitlines())
    3
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import DropoutError

__all__ = ["HessianMonitor"]

METRICS = ("lambda_max", "lambda_min", "trace", "kappa")


def _json_float(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


class HessianMonitor:
    """Records Hessian (or GGN) metrics of ``model`` on ``probe_data`` every ``every`` steps.

    Call :meth:`step` (or the monitor itself) with the step index from a training loop: when
    ``step % every == 0`` it computes ``metrics``, appends one JSON line to ``path`` and returns
    the record, a dict such as ``{"step": 500, "lambda_max": 41.2, "trace": 1.9e3,
    "trace_stderr": 40.1, "products": 58, "seconds": 0.41}``; otherwise it returns ``None``.
    ``force=True`` records at any step. :attr:`records` holds the records of this monitor,
    :meth:`plot` draws them, :meth:`read` loads a JSONL file.

    Metrics (any of):

    - ``"lambda_max"``: the largest eigenvalue (Lanczos, :func:`hessfast.eigsh`, ``which="LA"``),
      warm-started from the previous record's eigenvector (``warm_start``), so a record usually
      costs a handful of products; its ``lambda_max_residual`` goes with it when it did not
      converge to ``tol`` within ``max_iter`` steps.
    - ``"lambda_min"``: the smallest eigenvalue (``which="SA"``), warm-started the same way.
    - ``"trace"``: Hutch++ with ``num_matvecs`` products (``trace_stderr`` with it). The probe
      vectors are the same at every record (drawn from ``seed``), so changes between records are
      not probe noise.
    - ``"kappa"``: the condition number ``λ_max / λ_min`` over the two computed ends (it records
      both); ``None`` (JSON ``null``) when ``λ_min ≤ 0``, as for most Hessians of non-convex
      losses — then ``lambda_min`` itself shows how much negative curvature there is. With
      ``curvature="ggn"`` (positive semidefinite) ``λ_min`` is ≥ 0 but often ≈ 0.

    **Model mode.** The curvature is computed in the model's *current* mode, as it is when
    ``step`` is called: BatchNorm in training mode uses the probe batch's statistics, and dropout
    in training mode is refused by hessfast (``DropoutError``: the curvature of a random loss is not
    defined). Inside a training loop the model is usually in training mode, so either call
    ``model.eval()`` around the monitor or pass ``eval_mode=True``: the monitor then switches the
    model to eval mode for the measurement and restores every module's mode afterwards.

    **Nothing else changes**: parameters, their ``.grad``, buffers (BatchNorm running statistics),
    ``requires_grad`` flags and the global random state are as before the call; the algorithms use
    their own random generators.

    Args:
        model, loss_fn: as for :class:`hessfast.HessianOperator`.
        probe_data: one ``(inputs, targets)`` batch or an iterable of them (a fixed set: the
            metrics are comparable across records only on the same data).
        every: record when ``step % every == 0``.
        metrics: a subset of ``("lambda_max", "lambda_min", "trace", "kappa")``.
        path: the JSONL file; truncated at the first record unless ``append=True``; ``None`` keeps
            the records in memory only.
        curvature: ``"hessian"`` or ``"ggn"``.
        seed: seeds the Lanczos start vectors and the trace probes.
        params, max_batch_size: as for :class:`hessfast.HessianOperator`.
        eval_mode: switch the model to eval mode for each measurement (and back).
        tol, max_iter: Lanczos tolerance and step limit of ``λ_max`` / ``λ_min``.
        num_matvecs, trace_method: the trace estimator (:func:`hessfast.trace`).
        warm_start: start Lanczos from the previous record's eigenvectors.
        process_group: ``False`` (default): each process measures its own ``probe_data``
            locally, so a monitor called on one rank only never waits for the others. Pass
            ``None`` (the default group) or a group to sum the probe data of every rank — then
            every rank must call the monitor at the same steps.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        probe_data: Any,
        every: int = 100,
        metrics: Sequence[str] = ("lambda_max", "trace"),
        path: str | os.PathLike | None = "hessian_monitor.jsonl",
        curvature: str = "hessian",
        seed: int = 0,
        *,
        params: str | Sequence[str] | None = None,
        max_batch_size: int | None = None,
        eval_mode: bool = False,
        append: bool = False,
        tol: float = 1e-3,
        max_iter: int = 200,
        num_matvecs: int = 30,
        trace_method: str = "hutch++",
        warm_start: bool = True,
        process_group: Any = False,
    ):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
        bad = [m for m in metrics if m not in METRICS]
        if bad or not metrics:
            raise ValueError(f"metrics must be a non-empty subset of {METRICS}, got {metrics!r}")
        if curvature not in ("hessian", "ggn"):
            raise ValueError(f"curvature must be 'hessian' or 'ggn', got {curvature!r}")
        if num_matvecs < 1 or max_iter < 1:
            raise ValueError("num_matvecs and max_iter must be positive")
        self.model = model
        self.loss_fn = loss_fn
        self.probe_data = probe_data
        self.every = every
        self.metrics = metrics
        self.path = Path(path) if path is not None else None
        self.curvature = curvature
        self.seed = int(seed)
        self.params = params
        self.max_batch_size = max_batch_size
        self.eval_mode = eval_mode
        self.tol = tol
        self.max_iter = max_iter
        self.num_matvecs = num_matvecs
        self.trace_method = trace_method
        self.process_group = process_group
        self.warm_start = warm_start
        self.records: list[dict[str, Any]] = []
        self._truncate = not append
        self._v: dict[str, torch.Tensor] = {}
        # bad input (a loss class, a generator as probe_data, a fractional max_batch_size) is an
        # error here rather than at the first record; an empty probe batch fails at the first one
        self._operator()

    # -------------------------------------------------------------------------------------

    def __call__(
        self, step: int, force: bool = False, loss: float | torch.Tensor | None = None
    ) -> dict[str, Any] | None:
        return self.step(step, force, loss)

    def due(self, step: int) -> bool:
        """Whether :meth:`step` would record at ``step``."""
        return step % self.every == 0

    @contextlib.contextmanager
    def _mode(self):
        if not self.eval_mode:
            yield
            return
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training

    def _operator(self):
        from .operators import GGNOperator, HessianOperator

        cls = GGNOperator if self.curvature == "ggn" else HessianOperator
        op = cls(
            self.model,
            self.loss_fn,
            self.probe_data,
            params=self.params,
            max_batch_size=self.max_batch_size,
            process_group=self.process_group,
            # the probe data and the monitor's mode are the same at every record: checking that
            # two passes agree (one more product) once is enough
            check_deterministic=not getattr(self, "_deterministic_checked", False),
        )
        return op

    def _end(self, op, which: str) -> tuple[float, float, bool, int]:
        from .algorithms import eigsh

        v0 = self._v.get(which) if self.warm_start else None
        if v0 is not None and v0.shape[0] != op.shape[0]:
            v0 = None
        evals, evecs, info = eigsh(
            op,
            k=1,
            which=which,
            tol=self.tol,
            max_iter=self.max_iter,
            seed=self.seed,
            v0=v0,
            return_info=True,
            warn=False,
        )
        self._v[which] = evecs[:, 0].detach().clone()
        if getattr(op, "deterministic", None) in ("passed", "not needed"):
            self._deterministic_checked = True
        return float(evals[0]), float(info.residuals[0]), bool(info.converged), info.products

    def step(
        self, step: int, force: bool = False, loss: float | torch.Tensor | None = None
    ) -> dict[str, Any] | None:
        """Record the metrics if ``step % every == 0`` (or ``force``); returns the record or
        ``None``. ``loss`` (the training loss at this step, a number or a scalar tensor) is kept
        in the record as ``"loss"`` and drawn above the curvature by :meth:`plot`."""
        if not force and not self.due(step):
            return None
        from .algorithms import trace

        t0 = time.perf_counter()
        rec: dict[str, Any] = {"step": int(step)}
        if loss is not None:
            value = loss.detach().item() if isinstance(loss, torch.Tensor) else loss
            rec["loss"] = float(value)
        products = 0
        try:
            with self._mode(), torch.enable_grad():
                op = self._operator()
                want = set(self.metrics)
                if want & {"lambda_max", "kappa"}:
                    lam, res, ok, n = self._end(op, "LA")
                    rec["lambda_max"] = lam
                    if not ok:
                        rec["lambda_max_residual"] = res
                    products += n
                if want & {"lambda_min", "kappa"}:
                    lam, res, ok, n = self._end(op, "SA")
                    rec["lambda_min"] = lam
                    if not ok:
                        rec["lambda_min_residual"] = res
                    products += n
                if "kappa" in want:
                    lo = rec["lambda_min"]
                    rec["kappa"] = rec["lambda_max"] / lo if lo > 0 else None
                if "trace" in want:
                    est = trace(
                        op,
                        num_matvecs=min(self.num_matvecs, op.shape[0]),
                        method=self.trace_method,
                        seed=self.seed,
                    )
                    rec["trace"] = est.estimate
                    rec["trace_stderr"] = est.stderr
                    products += est.num_matvecs
        except DropoutError as e:
            raise DropoutError(
                f"{e} — HessianMonitor computes the curvature in the model's current mode: pass "
                "eval_mode=True to measure it in eval mode (the mode is restored afterwards)"
            ) from e
        rec["products"] = products
        rec["seconds"] = time.perf_counter() - t0
        rec = {k: _json_float(v) if isinstance(v, float) else v for k, v in rec.items()}
        self.records.append(rec)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "w" if self._truncate else "a") as f:
                f.write(json.dumps(rec, allow_nan=False) + "\n")
            self._truncate = False
        return rec

    # -------------------------------------------------------------------------------------

    @staticmethod
    def read(path: str | os.PathLike) -> list[dict[str, Any]]:
        """The records of a JSONL file written by a monitor."""
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def plot(
        self,
        path: str | os.PathLike = "hessian_monitor.png",
        records: list[dict[str, Any]] | None = None,
    ) -> Path:
        """A PNG with one panel per metric against the training step (log scale where every value
        is positive), the training loss on top where the records carry it (``step(...,
        loss=...)``); returns ``path``. ``records`` defaults to this monitor's."""
        from matplotlib.figure import Figure

        recs = self.records if records is None else records
        if not recs:
            raise ValueError("no records to plot yet: call step() first")
        keys = [m for m in ("loss", *METRICS) if any(r.get(m) is not None for r in recs)]
        fig = Figure(figsize=(6.5, 2.2 * len(keys) + 0.6), dpi=110)
        labels = {
            "loss": "training loss",
            "lambda_max": "λ_max",
            "lambda_min": "λ_min",
            "trace": "trace",
            "kappa": "κ = λ_max / λ_min",
        }
        for i, key in enumerate(keys):
            ax = fig.add_subplot(len(keys), 1, i + 1)
            pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", ms=3, lw=1.2, color=f"C{i}")
            if key == "trace" and any(r.get("trace_stderr") for r in recs):
                err = [r.get("trace_stderr") or 0.0 for r in recs if r.get(key) is not None]
                lo = [y - e for y, e in zip(ys, err)]
                hi = [y + e for y, e in zip(ys, err)]
                ax.fill_between(xs, lo, hi, color=f"C{i}", alpha=0.2, lw=0)
            if all(y > 0 for y in ys):
                ax.set_yscale("log")
            ax.set_ylabel(labels[key])
            ax.grid(alpha=0.3)
            if i == len(keys) - 1:
                ax.set_xlabel("step")
        kind = "GGN" if self.curvature == "ggn" else "Hessian"
        fig.suptitle(f"{kind} curvature over training", fontsize=10)
        fig.tight_layout()
        fig.savefig(path)
        return Path(path)
