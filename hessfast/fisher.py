"""Fisher operators: the empirical Fisher and the Monte Carlo Fisher of a model over a dataset.

Both are ``(P, P)`` operators over the same data, batches and weighting as
:class:`~hessfast.HessianOperator` (see :mod:`hessfast.operators`): the dataset loss is
``L = (1/D) Σ_i ℓ_i``, where ``ℓ_i`` is sample ``i``'s share of its batch's *summed* loss (for a
mean loss, the batch loss times what ``mean`` divides by: the class weights of its counted
targets, its elements, ...), and ``D`` is the sum of those divisors over the data (``1`` for a sum
loss, ``num_data`` when given). A sample is a row of the batch (the first axis of the targets and
of the model output: for a sequence model, a whole sequence).

With ``z_i`` the model output of sample ``i``, ``J_i = ∂z_i/∂θ`` and ``r_i = ∂ℓ_i/∂z_i``, the
per-sample gradient is ``g_i = J_iᵀ r_i``, and

- :class:`EmpiricalFisherOperator`: ``F_emp = (1/D) Σ_i g_i g_iᵀ`` (uncentred: the mean gradient
  is not subtracted) — curvlinops' ``EFLinearOperator``;
- :class:`MCFisherOperator`: ``F_MC = (1/(D M)) Σ_i Σ_m J_iᵀ r̂_im r̂_imᵀ J_i`` with ``r̂_im`` the
  output gradient at a target ``ŷ_im`` drawn from the model's predictive distribution — curvlinops'
  ``FisherMCLinearOperator``.

The exact Fisher ``E_{ŷ~p(·|z)}[∇ℓ ∇ℓᵀ]`` equals the GGN ``(1/D) Σ_i J_iᵀ (∂²ℓ_i/∂z_i²) J_i``
for the two losses that are negative log-likelihoods of an exponential family in their natural
parameters: cross-entropy (softmax; ``E[r̂ r̂ᵀ] = diag(p) − ppᵀ``, also with label smoothing or
soft targets, which do not change the output Hessian) and the squared error (a Gaussian of
variance ½ per element: ``r̂ = √2 ε``, ``E[r̂ r̂ᵀ] = 2 I``). So ``F_MC`` is an unbiased estimate of
:class:`~hessfast.GGNOperator`'s matrix, and its error falls as ``1/√M``. The empirical Fisher
uses the data's targets instead and is *not* the GGN: it is a different matrix (close to the
Fisher only where the model fits the data's distribution; Kunstner, Balles and Hennig, "Limitations
of the empirical Fisher approximation", NeurIPS 2019).

Cost: hessfast has no rule for these, so they are computed with ``torch.func``: per batch and
product, one forward with its ``vjp``, ``K`` forward-mode ``jvp``s (``J V``, vmapped) and ``K``
``vjp``s (``Jᵀ C``, vmapped) — about a GGN product through ``torch.func`` — without forming a
per-sample gradient (``g_iᵀ v = r_iᵀ (J v)_i``). Memory: ``K`` (``K·M`` for the MC Fisher) copies
of the model output. ``backend=`` and ``compile=`` do not apply.

Per-sample gradients need samples that do not interact: BatchNorm in training mode and active
dropout are refused (call ``model.eval()``). ``process_group``, ``max_batch_size``,
``check_deterministic``, ``reduction`` (of a custom loss), ``output`` and ``num_data`` are those of
:class:`~hessfast.HessianOperator`; ``op.gradient_and_loss()`` is the dataset gradient, the
mean of the ``g_i`` weighted as above.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap
from torch.utils import _pytree as pytree

from . import api, losses
from .capture import choose_output
from .operators import ModelOperator, has_active_dropout, has_train_batchnorm
from .vectors import Vectors

Tensor = torch.Tensor

__all__ = ["EmpiricalFisherOperator", "MCFisherOperator"]


class _PerSampleOperator(ModelOperator):
    """``(1/D) Σ_i J_iᵀ (Σ_m r_im r_imᵀ / M) J_i`` over the data for output gradients ``r_im``
    (:meth:`_residuals`), computed with ``torch.func``."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Any,
        params: Any = None,
        max_batch_size: int | None = None,
        progress: bool = False,
        **options: Any,
    ):
        super().__init__(model, loss_fn, data, params, max_batch_size, progress, **options)
        name = type(self).__name__
        if self.backend is not None or self.compile is not None:
            raise ValueError(
                f"{name} is computed with torch.func: backend= and compile= do not apply"
            )
        if has_train_batchnorm(model) or has_active_dropout(model):
            raise ValueError(
                f"{name} needs per-sample gradients, and BatchNorm or dropout in training mode "
                "makes the samples of a batch depend on each other (or on chance): call "
                "model.eval()"
            )

    def _output_fn(self, inputs: Any, targets: Any) -> tuple[Callable, Callable]:
        """``(z(params), loss(z))``: the output the loss reads as a function of the selected
        parameters, and the batch loss as ``loss_fn`` computes it from that output."""
        args, kwargs = api.split_inputs(inputs)
        fixed = {n: p.detach() for n, p in self.model.named_parameters()}
        fixed.update(dict(self.model.named_buffers()))
        closed = losses.is_closed_form(self.loss_fn)
        picked: dict[str, Any] = {}  # which output leaf the loss reads, found at the first call

        def z(p: dict[str, Tensor]) -> Tensor:
            out = functional_call(self.model, {**fixed, **p}, args, kwargs, tie_weights=True)
            leaves, spec = pytree.tree_flatten(out)
            if not picked:
                picked["idx"], picked["rebuild"] = choose_output(spec, self.output, not closed)
            return leaves[picked["idx"]]

        def loss(zz: Tensor) -> Tensor:
            if picked["rebuild"] is not None:
                return self.loss_fn(pytree.tree_unflatten([zz], picked["rebuild"]), targets)
            if closed and _classes_last(zz, targets):
                return self.loss_fn(zz.flatten(0, -2), targets.flatten())
            return self.loss_fn(zz, targets)

        return z, loss

    def _residuals(self, z: Tensor, targets: Any, loss: Callable, w: float | None) -> Tensor:
        """``[M, *z.shape]``: the output gradients ``r_im`` of the batch's summed loss."""
        raise NotImplementedError

    def _start_pass(self) -> None:
        """Called before each pass over the data (the MC Fisher reseeds its sampler)."""

    def _partial(self, vec: Vectors) -> tuple[Tensor | None, float, int]:
        total, weight_sum, seen = None, 0.0, 0
        self._start_pass()
        primal = {n: p.detach() for n, p in self.selected}
        for inputs, targets, w in self._weighted_batches():
            seen += 1
            z_fn, loss = self._output_fn(inputs, targets)
            z, pull = vjp(z_fn, primal)
            z = z.detach()
            R = self._residuals(z, targets, loss, w)  # [M, *z.shape]
            JV = vmap(lambda t: jvp(z_fn, (primal,), (t,))[1])(vec.tangents)  # [K, *z.shape]
            rows = _rows(z, targets)
            Rr = R.reshape(R.shape[0], rows, -1)
            a = torch.einsum("mnc,knc->mkn", Rr, JV.reshape(JV.shape[0], rows, -1))
            C = torch.einsum("mkn,mnc->knc", a, Rr) / R.shape[0]
            prods = vmap(pull)(C.reshape(JV.shape))[0]
            flat = torch.cat([prods[n].reshape(vec.k, -1) for n in self.names], dim=1)
            if w is not None:
                weight_sum += w
            total = flat if total is None else total + flat
        return total, weight_sum, seen


def _first(targets: Any) -> Tensor | None:
    leaves = pytree.tree_leaves(targets)
    return next((t for t in leaves if isinstance(t, torch.Tensor)), None)


def _rows(z: Tensor, targets: Any) -> int:
    """The samples of a batch: the targets' first axis, which the output must share (a scalar
    target: the whole output is one sample)."""
    t = _first(targets)
    if t is None or t.dim() == 0:
        return 1
    if z.dim() == 0 or z.shape[0] != t.shape[0]:
        raise ValueError(
            f"per-sample gradients need the model output to share the targets' first (sample) "
            f"axis: output {list(z.shape)}, targets {list(t.shape)}"
        )
    return int(t.shape[0])


def _classes_last(z: Tensor, targets: Any) -> bool:
    """hessfast's sequence layout of class-index targets: logits ``[B, T, C]``, targets
    ``[B, T]`` (torch's own functions read the class axis as dim 1)."""
    return (
        isinstance(targets, torch.Tensor)
        and z.dim() >= 3
        and not targets.is_floating_point()
        and tuple(targets.shape) == tuple(z.shape[:-1])
    )


class EmpiricalFisherOperator(_PerSampleOperator):
    """The empirical Fisher ``(1/D) Σ_i g_i g_iᵀ`` of the dataset loss: the uncentred second
    moment of the per-sample loss gradients ``g_i`` at the data's targets, weighted as the loss
    weights its terms (see :mod:`hessfast.fisher` for ``D``, the relation to the GGN and the
    cost). Any loss hessfast accepts (a custom callable's reduction is found or given as for
    :class:`~hessfast.HessianOperator`).

    ``EmpiricalFisherOperator(model, loss_fn, data, params=None, max_batch_size=None,
    progress=False, process_group=None, reduction=None, output=None, check_deterministic=True,
    num_data=None)``.

    >>> import torch, torch.nn.functional as F, hessfast
    >>> model = torch.nn.Linear(3, 2)
    >>> x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    >>> E = hessfast.EmpiricalFisherOperator(model, F.cross_entropy, (x, y))
    >>> E.shape, (E @ torch.randn(8, 2)).shape
    ((8, 8), torch.Size([8, 2]))
    """

    mode = "empirical_fisher"
    kind = "empirical Fisher"

    def _residuals(self, z: Tensor, targets: Any, loss: Callable, w: float | None) -> Tensor:
        r = grad(loss)(z)
        return (r if w is None else r * w)[None]


#: losses with a predictive distribution the MC Fisher samples from
_MC_LOSSES = {F.cross_entropy: "cross_entropy", F.mse_loss: "mse_loss"}


class MCFisherOperator(_PerSampleOperator):
    """The Monte Carlo Fisher: ``(1/(D M)) Σ_i Σ_m ĝ_im ĝ_imᵀ`` with ``ĝ_im`` the gradient of
    sample ``i``'s loss at a target drawn from the model's predictive distribution (softmax for
    cross-entropy, ``N(z, ½ I)`` for the squared error), ``mc_samples = M`` draws per sample
    (per token, for sequences). An unbiased estimate of the GGN (:class:`~hessfast.GGNOperator`)
    whose error falls as ``1/√M``; see :mod:`hessfast.fisher` for ``D`` and the cost.

    ``MCFisherOperator(model, loss_fn, data, params=None, max_batch_size=None, progress=False,
    *, mc_samples=1, seed=0, process_group=None, output=None, check_deterministic=True,
    num_data=None)``. ``loss_fn``: ``F.cross_entropy`` /
    ``nn.CrossEntropyLoss`` (``ignore_index``, label smoothing and soft targets allowed; class
    weights are refused: they make the output Hessian depend on the target, so the Fisher is no
    longer the GGN) or ``F.mse_loss`` / ``nn.MSELoss`` (targets of the output's shape); anything
    else is a ``ValueError``. The draws come from a CPU generator seeded with ``seed`` at the
    start of every pass over the data, so the operator is the same matrix at every product (as
    Lanczos and CG need) and the same on every device; another ``seed`` is another estimate.

    >>> import torch, torch.nn.functional as F, hessfast
    >>> model = torch.nn.Linear(3, 2)
    >>> x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    >>> Fm = hessfast.MCFisherOperator(model, F.cross_entropy, (x, y), mc_samples=4, seed=1)
    >>> v = torch.randn(8)
    >>> bool(torch.equal(Fm @ v, Fm @ v))
    True
    """

    mode = "mc_fisher"
    kind = "MC Fisher"

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Any,
        params: Any = None,
        max_batch_size: int | None = None,
        progress: bool = False,
        *,
        mc_samples: int = 1,
        seed: int = 0,
        **options: Any,
    ):
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        self.mc_samples = mc_samples
        self.seed = int(seed)
        fn, kw = losses.identify(loss_fn)
        family = _MC_LOSSES.get(fn)
        if family is None:
            raise ValueError(
                f"MCFisherOperator draws targets from the model's predictive distribution, which "
                f"hessfast knows for cross-entropy (softmax) and the squared error (Gaussian), "
                f"not for {getattr(loss_fn, '__name__', type(loss_fn).__name__)}: use "
                "F.cross_entropy or F.mse_loss (or their nn modules), or EmpiricalFisherOperator "
                "/ GGNOperator"
            )
        if kw.get("weight") is not None:
            raise ValueError(
                f"MCFisherOperator: {family} with class/element weights has an output Hessian "
                "that depends on the target, so its Fisher is not the GGN: drop weight= or use "
                "GGNOperator"
            )
        self.family = family
        self.ignore_index = kw.get("ignore_index", -100)
        super().__init__(model, loss_fn, data, params, max_batch_size, progress, **options)

    def _options(self) -> dict[str, Any]:
        return {**super()._options(), "mc_samples": self.mc_samples, "seed": self.seed}

    def _start_pass(self) -> None:
        self._gen = torch.Generator().manual_seed(self.seed)

    def _residuals(self, z: Tensor, targets: Any, loss: Callable, w: float | None) -> Tensor:
        M = self.mc_samples
        if self.family == "mse_loss":
            if tuple(targets.shape) != tuple(z.shape):
                raise ValueError(
                    f"MCFisherOperator with mse_loss needs targets of the output's shape "
                    f"{list(z.shape)}, got {list(targets.shape)} (broadcasting)"
                )
            eps = torch.randn(M, *z.shape, generator=self._gen, dtype=torch.float64)
            return (math.sqrt(2.0) * eps).to(z.device, z.dtype)
        dim = _class_dim(z, targets)
        zc = z.movedim(dim, -1)
        p = torch.softmax(zc.double(), -1)
        C = p.shape[-1]
        draws = torch.multinomial(p.reshape(-1, C).cpu(), M, replacement=True, generator=self._gen)
        onehot = F.one_hot(draws.T.to(z.device), C).to(p.dtype).reshape(M, *p.shape)
        R = p[None] - onehot
        if not targets.is_floating_point():
            valid = targets.reshape(zc.shape[:-1]) != self.ignore_index
            R = R * valid[None, ..., None].to(R.dtype)
        return R.movedim(-1, dim + 1).to(z.dtype)


def _class_dim(z: Tensor, targets: Tensor) -> int:
    """The class axis of cross-entropy logits ``z``: ``-1``-like for ``[C]``, ``[N, C]`` and
    hessfast's ``[B, T, C]`` with ``[B, T]`` targets, else torch's dim 1."""
    if z.dim() <= 2 or _classes_last(z, targets):
        return z.dim() - 1
    return 1
