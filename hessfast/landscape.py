"""Loss landscapes: the dataset loss on 1-D and 2-D slices through the parameters.

:func:`landscape` evaluates ``L(θ + α d₁)`` or ``L(θ + α d₁ + β d₂)`` on a grid, where ``L`` is the
loss over the whole dataset exactly as :class:`hessfast.HessianOperator` defines it (every batch,
weighted by the number of loss terms it averages; ``max_batch_size``, ``reduction`` and
``output`` as there), beside the quadratic model ``L₀ + gᵀ(Da) + ½ aᵀ (DᵀHD) a`` that the
curvature predicts (along the top eigenvector: ``L₀ + g₁ t + ½ λ t²``). Directions:

- ``"top"``: the top one or two eigenvectors of the Hessian (:func:`hessfast.eigsh`, or
  ``eigenpairs=`` computed before); unit vectors, so the axes are distances in parameter space.
  With ``curvature="ggn"`` the GGN's eigenvectors, and the quadratic model is the Gauss-Newton
  model ``L₀ + g₁ t + ½ λ_GGN t²`` (the loss on the grid is the same).
- ``"random"``: filter-normalised Gaussian directions (Li, Xu, Taylor, Studer and Goldstein,
  "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018): each filter (row along the
  first axis) of a weight scaled to the norm of the same filter of ``θ``; parameters with at most
  one axis (biases, normalisation scales) get no component, as in the paper's default. Seeded.
- user vectors: a flat ``[P]`` or ``[k, P]`` tensor, a dict ``{name: tensor}``, or a list of
  either (one or two directions).

Points are evaluated K at a time (``points_per_pass``) by ``torch.func.vmap`` over
``torch.func.functional_call`` where the model allows it, one at a time otherwise (train-mode
BatchNorm, ops without a batching rule); ``Landscape.evaluation`` says which. Every forward runs
on a copy of the parameters and buffers: the model is never written, and its parameters and
buffers are checked afterwards and put back bitwise (the same objects, the same bits) whatever
happens, an exception or Ctrl-C included.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import api, losses
from .autograd_fallback import check_no_training_dropout
from .operators import GGNOperator, HessianOperator
from .penalties import call_loss

Tensor = torch.Tensor

__all__ = ["landscape", "Landscape", "filter_normalized_directions", "loss_operator", "auto_span"]


class ModelGuard:
    """Context manager: on exit, every parameter and buffer of ``model`` is the same object with
    the same bits as on entry (restored if anything changed them, on any exit)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> ModelGuard:
        self.saved = []
        for mod in self.model.modules():
            for store in (mod._parameters, mod._buffers):
                for name, t in store.items():
                    if t is not None:
                        self.saved.append((store, name, t, t.detach().clone()))
        return self

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for store, name, t, copy in self.saved:
                if store.get(name) is not t:
                    store[name] = t
                if not _same_bits(t.detach(), copy):
                    t.detach().copy_(copy)


def _same_bits(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() and a.element_size() in (2, 4, 8):
        ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))
    return torch.equal(a, b)


def loss_operator(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    *,
    curvature: str = "hessian",
    params: str | Sequence[str] | None = None,
    max_batch_size: int | None = None,
    reduction: str | None = None,
    output: str | int | None = None,
) -> HessianOperator | GGNOperator:
    """The local (``process_group=False``) Hessian or GGN operator of ``loss_fn`` over ``data``
    that :func:`landscape` and :func:`hessfast.sharpness` read the loss, the gradient and the
    curvature from; ``ValueError`` for a ``curvature`` other than ``"hessian"`` or ``"ggn"``.

    >>> import torch, torch.nn.functional as F
    >>> from hessfast.landscape import loss_operator
    >>> model = torch.nn.Linear(3, 2)
    >>> loss_operator(model, F.cross_entropy, (torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))).shape
    (8, 8)
    """
    ops = {"hessian": HessianOperator, "ggn": GGNOperator}
    if curvature not in ops:
        raise ValueError(f'curvature={curvature!r}: "hessian" or "ggn"')
    return ops[curvature](
        model,
        loss_fn,
        data,
        params=params,
        max_batch_size=max_batch_size,
        process_group=False,
        reduction=reduction,
        output=output,
    )


class DataLoss:
    """The dataset loss of an operator's model and data, at shifted parameters, weighted exactly
    as the operator weights batches (used by :func:`landscape` and :func:`hessfast.sharpness`)."""

    def __init__(self, op: HessianOperator):
        self.op = op
        self.model = op.model
        self.names = list(op.names)
        self.params = [p for _, p in op.selected]
        self.sizes = list(op.sizes)
        check_no_training_dropout(self.model)

    def batches(self):
        """``(args, kwargs, targets, weight or None)`` for every batch that counts."""
        op = self.op
        for inputs, targets in op.batches():
            if losses.is_empty_batch(targets):
                continue
            rule = losses.resolve(op.loss_fn, targets)
            w = rule.denominator()
            if w == 0:
                continue
            if isinstance(rule, losses.FuncLoss) and op._custom_reduction(inputs, targets) == "sum":
                w = None
            args, kwargs = api.split_inputs(inputs)
            yield args, kwargs, targets, w

    def split(self, flat: Tensor) -> list[Tensor]:
        """``[..., P]`` into the parameters' shapes (leading axes kept)."""
        lead = flat.shape[:-1]
        out, off = [], 0
        for p, n in zip(self.params, self.sizes):
            out.append(flat[..., off : off + n].reshape(*lead, *p.shape))
            off += n
        return out

    def _buffers(self) -> dict[str, Tensor]:
        return {n: b.clone() for n, b in self.model.named_buffers()}

    def _one(self, args, kwargs, targets, shifted: list[Tensor]) -> Tensor:
        over = self._buffers()
        over.update(zip(self.names, shifted))
        out = torch.func.functional_call(self.model, over, args, kwargs)
        loss = call_loss(self.op.loss_fn, out, targets, self.op.output)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ValueError("loss_fn must return a scalar tensor")
        return loss

    def value_and_grad(self, shift: Tensor | None = None) -> tuple[float, Tensor]:
        """``(L(θ + shift), ∇L(θ + shift))``, the gradient flat ``[P]`` in float64."""
        total, grad, wsum, seen = 0.0, None, 0.0, 0
        shifts = self.split(shift) if shift is not None else None
        for args, kwargs, targets, w in self.batches():
            with torch.enable_grad():
                pts = [p.detach().requires_grad_(True) for p in self.params]
                shifted = pts if shifts is None else [p + s for p, s in zip(pts, shifts)]
                loss = self._one(args, kwargs, targets, shifted)
                g = torch.autograd.grad(loss, pts, allow_unused=True)
            g = torch.cat(
                [
                    (torch.zeros_like(p) if gi is None else gi).reshape(-1).double()
                    for gi, p in zip(g, pts)
                ]
            )
            scale = 1.0 if w is None else w
            wsum += 0.0 if w is None else w
            total += scale * float(loss.detach())
            grad = scale * g if grad is None else grad + scale * g
            seen += 1
        if not seen:
            raise ValueError("data has no batch that counts (empty, or every target ignored)")
        if wsum:
            total, grad = total / wsum, grad / wsum
        return total, grad

    def values(self, shifts: Tensor, chunk: int) -> tuple[np.ndarray, str]:
        """The loss at ``θ + shifts[i]`` for every row of ``shifts [N, P]``: float64 ``[N]``, and
        ``"vmap"`` or ``"sequential"``."""
        N = shifts.shape[0]
        total = torch.zeros(N, dtype=torch.float64)
        wsum, seen = 0.0, 0
        mode = "vmap" if chunk > 1 else "sequential"
        base = [p.detach() for p in self.params]
        with torch.no_grad():
            for args, kwargs, targets, w in self.batches():
                vals = torch.empty(N, dtype=torch.float64)
                for lo in range(0, N, chunk):
                    rows = shifts[lo : lo + chunk]
                    stacked = [b + s for b, s in zip(base, self.split(rows))]
                    if mode == "vmap":
                        try:
                            vals[lo : lo + len(rows)] = self._vmapped(
                                args, kwargs, targets, stacked
                            )
                            continue
                        except Exception as e:  # no batching rule, in-place buffer update, ...
                            warnings.warn(
                                f"landscape: evaluating one point at a time ({type(e).__name__} "
                                f"under torch.func.vmap: {str(e).splitlines()[0][:200]})",
                                RuntimeWarning,
                                stacklevel=3,
                            )
                            mode = "sequential"
                    for i in range(len(rows)):
                        loss = self._one(args, kwargs, targets, [s[i] for s in stacked])
                        vals[lo + i] = float(loss)
                scale = 1.0 if w is None else w
                wsum += 0.0 if w is None else w
                total += scale * vals
                seen += 1
        if not seen:
            raise ValueError("data has no batch that counts (empty, or every target ignored)")
        if wsum:
            total /= wsum
        return total.numpy(), mode

    def _vmapped(self, args, kwargs, targets, stacked: list[Tensor]) -> Tensor:
        bufs = self._buffers()

        def f(*ps):
            over = dict(bufs)
            over.update(zip(self.names, ps))
            out = torch.func.functional_call(self.model, over, args, kwargs)
            return call_loss(self.op.loss_fn, out, targets, self.op.output)

        return torch.func.vmap(f)(*stacked).double().cpu()


def filter_normalized_directions(
    model: nn.Module,
    num: int = 2,
    seed: int = 0,
    params: str | Sequence[str] | None = None,
) -> Tensor:
    """``num`` filter-normalised random directions ``[num, P]`` (Li et al. 2018) over the
    selected parameters, in ``named_parameters()`` order: Gaussian, each filter (slice along the
    first axis) of a weight of two or more axes rescaled to the norm of that filter of ``θ``;
    parameters with at most one axis (biases, normalisation) are zero. Drawn from a CPU
    generator seeded with ``seed`` in float64: the same seed gives the same directions.

    >>> import torch
    >>> from hessfast.landscape import filter_normalized_directions
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> d = filter_normalized_directions(model, num=2, seed=0)
    >>> d.shape
    torch.Size([2, 26])
    >>> w = model[0].weight
    >>> bool(torch.allclose(d[0, :12].view(4, 3).norm(dim=1), w.norm(dim=1)))
    True
    """
    from .vectors import select_params

    selected = select_params(model, params)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num):
        parts = []
        for _, p in selected:
            d = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.dim() <= 1:
                d.zero_()
            else:
                w = p.detach().to("cpu", torch.float64)
                wn = w.reshape(w.shape[0], -1).norm(dim=1)
                dn = d.reshape(d.shape[0], -1).norm(dim=1)
                d *= (wn / (dn + 1e-10)).reshape(-1, *([1] * (p.dim() - 1)))
            parts.append(d.reshape(-1))
        rows.append(torch.cat(parts))
    first = selected[0][1]
    return torch.stack(rows).to(first.device, first.dtype)


@dataclass
class Landscape:
    """The result of :func:`landscape`.

    ``coords``: one float64 array of step coefficients per axis; ``loss``: the dataset loss on the
    grid, ``[steps]`` or ``[steps₁, steps₂]`` (first index the first direction); ``quadratic``: the
    quadratic model on the same grid; ``loss0``, ``slope`` (``Dᵀ∇L``), ``curvature`` (``DᵀCD``
    for the curvature ``C``, ``diag(λ)`` for its eigenvectors): its terms; ``operator``: which
    curvature (``"Hessian"`` or ``"GGN"``: the quadratic model along GGN eigenvectors is the
    Gauss-Newton model); ``eigenvalues``: the top eigenvalues for ``"top"``; ``directions``:
    ``[k, P]`` (``None`` in a landscape read back by :meth:`from_dict`); ``norms``: each
    direction's norm; ``kind``; ``evaluation``: ``"vmap"`` or ``"sequential"``;
    ``points``/``seconds``: cost; ``png``, ``json``: the files written.
    """

    kind: str
    coords: list[np.ndarray]
    loss: np.ndarray
    quadratic: np.ndarray
    loss0: float
    slope: np.ndarray
    curvature: np.ndarray
    directions: Tensor | None
    norms: list[float]
    eigenvalues: list[float] | None = None
    evaluation: str = "vmap"
    points: int = 0
    seconds: float = 0.0
    png: Path | None = None
    json: Path | None = None
    operator: str = "Hessian"
    extra: dict = field(default_factory=dict)

    @property
    def ndim(self) -> int:
        return len(self.coords)

    @property
    def axes(self) -> list[str]:
        """The axis labels of the plot, one per direction."""
        return _axis_names(self.kind, self.ndim, self.operator)

    def to_dict(self) -> dict:
        """Everything but the direction vectors, as JSON-ready Python values (lists, floats;
        a non-finite loss, e.g. an overflow far from ``θ``, becomes ``None``); the files by
        name. :meth:`from_dict` reads it back.

        >>> import torch, torch.nn.functional as F, hessfast
        >>> model = torch.nn.Linear(3, 2)
        >>> data = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> d = hessfast.landscape(model, F.cross_entropy, data, steps=3).to_dict()
        >>> d["kind"], d["operator"], len(d["coords"][0]), len(d["eigenvalues"]), d["files"]
        ('top', 'Hessian', 3, 1, {})
        """
        files = {k: Path(v).name for k, v in (("png", self.png), ("json", self.json)) if v}
        d = {
            "kind": self.kind,
            "operator": self.operator,
            "ndim": self.ndim,
            "axes": self.axes,
            "coords": [c.tolist() for c in self.coords],
            "loss": self.loss.tolist(),
            "quadratic": self.quadratic.tolist(),
            "loss0": self.loss0,
            "slope": self.slope.tolist(),
            "curvature": self.curvature.tolist(),
            "eigenvalues": self.eigenvalues,
            "direction_norms": self.norms,
            "evaluation": self.evaluation,
            "points": self.points,
            "seconds": self.seconds,
            "files": files,
            **self.extra,
        }
        return _finite_or_none(d)

    @classmethod
    def from_dict(cls, d: dict) -> Landscape:
        """The landscape of a :meth:`to_dict` record (a ``report.json`` section), without its
        direction vectors: enough to :meth:`plot` it again (``None`` reads back as NaN)."""
        known = {
            "kind", "operator", "ndim", "axes", "coords", "loss", "quadratic", "loss0", "slope",
            "curvature", "eigenvalues", "direction_norms", "evaluation", "points", "seconds",
            "files",
        }  # fmt: skip

        def arr(x: Any) -> np.ndarray:
            return np.array(_none_to_nan(x), dtype=np.float64)

        return cls(
            kind=d["kind"],
            coords=[arr(c) for c in d["coords"]],
            loss=arr(d["loss"]),
            quadratic=arr(d["quadratic"]),
            loss0=float("nan") if d["loss0"] is None else float(d["loss0"]),
            slope=arr(d["slope"]),
            curvature=arr(d["curvature"]),
            directions=None,
            norms=list(d.get("direction_norms") or []),
            eigenvalues=d.get("eigenvalues"),
            evaluation=d.get("evaluation", "vmap"),
            points=int(d.get("points", 0)),
            seconds=float(d.get("seconds") or 0.0),
            operator=d.get("operator", "Hessian"),
            extra={k: v for k, v in d.items() if k not in known},
        )

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as strict JSON (no NaN) to ``path``."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n")
        return path

    def plot(self, path: str | os.PathLike) -> Path:
        """A PNG: 1-D, the loss and the quadratic model against the step; 2-D, filled contours
        of the loss, dashed contours of the quadratic model and the eigen-directions of
        ``DᵀCD`` (for ``"top"``: the two axes) marked from the centre with their eigenvalues.
        The title names the curvature (Hessian or GGN) whose eigenvectors or quadratic model
        are shown."""
        from matplotlib.figure import Figure

        names = self.axes
        ggn = self.operator == "GGN"
        model_name = "Gauss-Newton model" if ggn else "quadratic model"
        fig = Figure(figsize=(6.4, 4.6) if self.ndim == 1 else (6.4, 5.4), dpi=110)
        ax = fig.add_subplot(1, 1, 1)
        if self.ndim == 1:
            t = self.coords[0]
            lam = float(self.curvature[0, 0])
            ax.plot(
                t, self.loss, color="C0", lw=1.6, marker="o", ms=2.5, label="loss over the data"
            )
            sym = "λ" if self.kind == "top" else ("dᵀGd" if ggn else "dᵀHd")
            ax.plot(
                t,
                self.quadratic,
                color="C3",
                ls="--",
                lw=1.2,
                label=f"{model_name} L₀ + g·t + ½{sym}t², {sym} = {lam:.4g}",
            )
            finite = self.loss[np.isfinite(self.loss)]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
            pad = 0.1 * (hi - lo) if hi > lo else 1.0
            ax.set_ylim(lo - pad, hi + pad)
            ax.set_xlabel(names[0])
            ax.set_ylabel("loss")
            ax.legend(loc="best", fontsize=8)
            ax.grid(alpha=0.3)
        else:
            a, b = self.coords
            Z = self.loss.T  # rows: second axis
            cs = ax.contourf(a, b, Z, levels=30, cmap="viridis")
            fig.colorbar(cs, ax=ax, label="loss over the data")
            ax.contour(
                a, b, self.quadratic.T, levels=12, colors="w", linestyles="--", linewidths=0.7
            )
            C = np.asarray(self.curvature, dtype=np.float64)
            evals, evecs = np.linalg.eigh((C + C.T) / 2)
            reach = 0.45 * min(a[-1] - a[0], b[-1] - b[0])
            for i in range(2)[::-1]:
                u = evecs[:, i] * reach
                ax.annotate(
                    "",
                    xy=(u[0], u[1]),
                    xytext=(0, 0),
                    arrowprops={"arrowstyle": "->", "color": "C3" if i == 1 else "C1", "lw": 1.5},
                )
                ax.text(
                    0.6 * u[0],
                    0.6 * u[1],
                    f"λ = {evals[i]:.4g}",
                    fontsize=8,
                    ha="center",
                    va="bottom",
                    bbox={"boxstyle": "round", "fc": "w", "alpha": 0.75, "lw": 0},
                )
            ax.plot([0], [0], marker="+", color="w", ms=10)
            ax.set_xlabel(names[0])
            ax.set_ylabel(names[1])
        title = {
            "top": f"top {self.operator} eigenvector",
            "random": "filter-normalised random",
        }.get(self.kind, "given")
        title += " direction" + ("s" if self.ndim == 2 else "")
        if self.ndim == 2:
            cur = "DᵀGD" if ggn else "DᵀHD"
            title += f"\n(dashed: {model_name}; arrows: eigen-directions of {cur})"
        elif ggn and self.kind != "top":
            title += " (curvature: GGN)"
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(path)
        return Path(path)


def _finite_or_none(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite_or_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_or_none(v) for v in x]
    return x


def _none_to_nan(x: Any) -> Any:
    if x is None:
        return float("nan")
    if isinstance(x, list):
        return [_none_to_nan(v) for v in x]
    return x


def _axis_names(kind: str, ndim: int, operator: str = "Hessian") -> list[str]:
    if kind == "top":
        return [
            f"t along v₁ (top {operator} eigenvector)",
            f"t along v₂ (second {operator} eigenvector)",
        ][:ndim]
    return [f"α along d{'₁₂'[i]}" for i in range(ndim)]


def _user_directions(directions: Any, op: HessianOperator) -> Tensor:
    from .vectors import parse

    items = directions if isinstance(directions, (list, tuple)) else [directions]
    rows = []
    P = op.shape[0]
    for d in items:
        if isinstance(d, dict):
            vec = parse(d, op.selected)
            flat = torch.cat([vec.tangents[n].reshape(vec.k, -1) for n in op.names], dim=1)
            rows.extend(flat)
        elif isinstance(d, torch.Tensor):
            t = d if d.dim() == 2 else d.reshape(1, -1)
            if t.shape[1] != P:
                raise ValueError(f"a direction must have P={P} entries, got {list(d.shape)}")
            rows.extend(t)
        else:
            raise ValueError(
                'directions must be "top", "random", a tensor [P] or [k, P], a dict '
                f"{{name: tensor}} or a list of them, not {type(d).__name__}"
            )
    D = torch.stack([r.to(op.device, op.dtype) for r in rows])
    if D.shape[0] not in (1, 2):
        raise ValueError(f"one or two directions, got {D.shape[0]}")
    if not torch.isfinite(D).all() or (D.norm(dim=1) == 0).any():
        raise ValueError("directions must be finite and non-zero")
    return D


def check_span(span: Any) -> tuple[float, float] | None:
    """``(lo, hi)`` of ``span``, or ``None`` for ``"auto"``; ``ValueError`` otherwise."""
    if isinstance(span, str) and span == "auto":
        return None
    bad = f'span must be a positive number, a (lo, hi) pair or "auto", got {span!r}'
    if isinstance(span, (int, float)) and not isinstance(span, bool):
        lo, hi = -float(span), float(span)
    elif isinstance(span, (tuple, list)) and len(span) == 2:
        try:
            lo, hi = float(span[0]), float(span[1])
        except (TypeError, ValueError):
            raise ValueError(bad) from None
    else:
        raise ValueError(bad)
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(bad)
    return lo, hi


def check_steps(steps: Any, ndim: int) -> list[int]:
    """The points per axis of ``steps`` (one number or one per axis, each an integer ≥ 2);
    ``ValueError`` otherwise."""
    counts = list(steps) if isinstance(steps, (list, tuple)) else [steps] * ndim
    if len(counts) != ndim:
        raise ValueError(f"steps: one number or {ndim}, got {steps!r}")
    for n in counts:
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"steps must be an integer ≥ 2, got {n!r}")
    return counts


def auto_span(loss0: float, lam: float | None) -> float:
    """The half-width ``s`` of ``span="auto"``: where the curvature term ``½λ₁s²`` of the
    quadratic model equals ``|L₀|`` (the loss at ``θ``; at least 1e-3), i.e.
    ``s = √(2|L₀|/λ₁)``; 1 when ``λ₁`` is unknown or not positive.

    >>> from hessfast.landscape import auto_span
    >>> auto_span(0.5, 4.0), auto_span(0.5, None)
    (0.5, 1.0)
    """
    if lam is None or not lam > 0 or not math.isfinite(lam):
        return 1.0
    return math.sqrt(2 * max(abs(loss0), 1e-3) / lam)


def landscape(
    model: nn.Module,
    loss_fn: Callable,
    data: Any,
    directions: str | Tensor | dict | Sequence = "top",
    span: float | tuple[float, float] | str = 1.0,
    steps: int | tuple[int, int] = 21,
    *,
    ndim: int | None = None,
    eigenpairs: tuple[Tensor, Tensor] | None = None,
    curvature: str = "hessian",
    seed: int = 0,
    params: str | Sequence[str] | None = None,
    points_per_pass: int = 16,
    out: str | os.PathLike | None = None,
    max_batch_size: int | None = None,
    reduction: str | None = None,
    output: str | int | None = None,
    tol: float = 1e-6,
) -> Landscape:
    """The dataset loss on a 1-D or 2-D grid through ``θ`` along ``directions``.

    Args:
        model, loss_fn, data: as for :class:`hessfast.HessianOperator` (``data`` one
            ``(inputs, targets)`` batch or an iterable of batches; every batch counts, weighted
            as the operator weights it).
        directions: ``"top"`` (top eigenvectors of the curvature), ``"random"``
            (filter-normalised, seeded) or one or two user directions (a tensor ``[P]``/``[k, P]``,
            a dict ``{name: tensor}``, or a list of them); module docstring.
        span: the coefficient range of every axis: ``s`` for ``[−s, s]``, ``(lo, hi)``, or
            ``"auto"``: ``±√(2|L₀|/λ₁)`` for ``"top"``, where the curvature term ``½λ₁t²``
            reaches the loss at ``θ`` (:func:`auto_span`; ``±1`` for other directions).
            Along unit eigenvectors the coefficient is a distance in parameter space; along
            filter-normalised directions ``1`` is a step the size of the weights.
        steps: grid points per axis (an odd number includes ``θ`` itself), or one per axis.
        ndim: 1 or 2 (default: 1 for ``"top"`` and ``"random"``, else the number of directions).
        eigenpairs: ``(eigenvalues, eigenvectors [P, k])`` as :func:`hessfast.eigsh` returns
            them, instead of computing them for ``"top"`` (of the ``curvature`` named).
        curvature: ``"hessian"`` or ``"ggn"``: whose eigenvectors ``"top"`` follows and whose
            ``DᵀCD`` is the quadratic model's curvature (the GGN's: the Gauss-Newton model).
            The loss on the grid is the same either way.
        seed: seeds :func:`hessfast.eigsh` and the random directions.
        params: names or glob patterns: the slice moves only these parameters.
        points_per_pass: grid points evaluated together under ``torch.func.vmap`` (1: one at a
            time); memory grows with it.
        out: a directory: writes ``landscape_1d.png`` and ``landscape_1d.json`` there (2-D:
            ``landscape_2d.*``). ``None``: nothing written (``Landscape.plot`` and
            ``Landscape.save_json`` write them later).
        max_batch_size, reduction, output: as for the operator.
        tol: the eigensolver's tolerance for ``"top"``.

    Returns:
        a :class:`Landscape`; the model's parameters and buffers are exactly as before (module
        docstring), also after an exception or ``KeyboardInterrupt``.

    >>> import torch, torch.nn.functional as F, hessfast
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> data = [(torch.randn(8, 3), torch.randint(0, 2, (8,))) for _ in range(2)]
    >>> ls = hessfast.landscape(model, F.cross_entropy, data, "random", steps=5, ndim=2)
    >>> ls.loss.shape, ls.coords[0].tolist()
    ((5, 5), [-1.0, -0.5, 0.0, 0.5, 1.0])
    >>> bool(abs(ls.loss[2, 2] - ls.loss0) < 1e-6)
    True
    >>> d = torch.randn(26)  # a direction of your own; "top": the top eigenvector(s)
    >>> hessfast.landscape(model, F.cross_entropy, data, d, span=0.1, steps=3).loss.shape
    (3,)
    >>> top = hessfast.landscape(model, F.cross_entropy, data, span="auto", curvature="ggn")
    >>> top.operator, bool(abs(top.quadratic[-1] - top.loss0 - top.slope[0] * top.coords[0][-1]
    ...     - abs(top.loss0)) < 1e-5)  # at the end of the auto span, ½λt² is |L₀|
    ('GGN', True)
    """
    t0 = time.perf_counter()
    op = loss_operator(
        model,
        loss_fn,
        data,
        curvature=curvature,
        params=params,
        max_batch_size=max_batch_size,
        reduction=reduction,
        output=output,
    )
    if (
        isinstance(points_per_pass, bool)
        or not isinstance(points_per_pass, int)
        or points_per_pass < 1
    ):
        raise ValueError(f"points_per_pass must be a positive integer, got {points_per_pass!r}")
    if ndim is not None and ndim not in (1, 2):
        raise ValueError(f"ndim must be 1 or 2, got {ndim!r}")
    if not isinstance(directions, str):
        D = _user_directions(directions, op)
        if ndim is not None and ndim != D.shape[0]:
            raise ValueError(f"ndim={ndim} but {D.shape[0]} directions given")
        kind, k = "user", D.shape[0]
    elif directions in ("top", "random"):
        kind, k = directions, ndim or 1
    else:
        raise ValueError(f'directions={directions!r}: "top", "random" or vectors')
    limits = check_span(span)
    counts = check_steps(steps, k)
    with ModelGuard(model):
        dl = DataLoss(op)
        eigenvalues = None
        products = 0
        if kind == "top":
            if eigenpairs is None:
                evals, evecs, info = eigsh_top(op, k, seed, tol)
                products = info.products
            else:
                evals, evecs = eigenpairs
                if evecs.dim() == 1:
                    evecs = evecs[:, None]
                if evecs.shape[1] < k:
                    raise ValueError(f"eigenpairs hold {evecs.shape[1]} vectors; {k} needed")
            order = torch.argsort(torch.as_tensor(evals, dtype=torch.float64), descending=True)[:k]
            D = evecs[:, order].T.to(op.device, op.dtype)
            eigenvalues = [float(torch.as_tensor(evals, dtype=torch.float64)[i]) for i in order]
        elif kind == "random":
            D = filter_normalized_directions(model, k, seed, params)
            if (D.norm(dim=1) == 0).any():
                raise ValueError(
                    "filter-normalised directions are zero: the selected parameters have no "
                    "weight with two or more axes (biases only); pass user directions"
                )
        loss0, g = dl.value_and_grad()
        if limits is None:
            s = auto_span(loss0, eigenvalues[0] if eigenvalues else None)
            limits = (-s, s)
        coords = [np.linspace(*limits, n) for n in counts]
        Dd = D.double().cpu()
        slope = (Dd @ g.cpu()).numpy()
        if eigenvalues is not None:
            C = np.diag(eigenvalues)
        else:
            HD = op.matmat(D.T.contiguous()).double().cpu()  # [P, k]
            products += k
            C = (Dd @ HD).numpy()
            C = (C + C.T) / 2
        mesh = np.stack(np.meshgrid(*coords, indexing="ij"), axis=-1).reshape(-1, k)  # [N, k]
        A = torch.as_tensor(mesh, dtype=torch.float64)
        shifts = (A @ Dd).to(op.device, op.dtype)
        vals, mode = dl.values(shifts, points_per_pass)
        shape = tuple(len(c) for c in coords)
        quad = loss0 + mesh @ slope + 0.5 * np.einsum("ni,ij,nj->n", mesh, C, mesh)
        res = Landscape(
            kind=kind,
            coords=coords,
            loss=vals.reshape(shape),
            quadratic=quad.reshape(shape),
            loss0=float(loss0),
            slope=np.asarray(slope, dtype=np.float64),
            curvature=np.asarray(C, dtype=np.float64),
            directions=D,
            norms=[float(n) for n in D.double().norm(dim=1)],
            eigenvalues=eigenvalues,
            evaluation=mode,
            points=int(mesh.shape[0]),
            operator=op.kind,
            extra={"products": products, "parameters": op.shape[0], "seed": seed},
        )
    res.seconds = time.perf_counter() - t0
    if out is not None:
        d = Path(out)
        d.mkdir(parents=True, exist_ok=True)
        stem = f"landscape_{k}d"
        res.png = res.plot(d / f"{stem}.png")
        res.json = d / f"{stem}.json"
        res.save_json(res.json)
    return res


def eigsh_top(op: Any, k: int, seed: int, tol: float):
    """``(eigenvalues, eigenvectors, info)`` of the ``k`` largest eigenvalues."""
    from .algorithms import eigsh

    return eigsh(op, k=k, which="LA", seed=seed, tol=tol, return_info=True)


class _CallableModule(types.ModuleType):
    """``hessfast.landscape`` is this module and, called, :func:`landscape` (as
    ``hessfast.selftest``): the name stays callable however the module is imported."""

    def __call__(self, *args: Any, **kwargs: Any) -> Landscape:
        return landscape(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
