"""The public functions: :func:`hvp`, :func:`ggn_vp` and :func:`grad`."""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.fx._pytree import tree_flatten_spec

from . import autograd_fallback, capture, dispatch, engine, losses, replay, traced
from .dispatch import use_backend
from .errors import CaptureError, NonFiniteError
from .vectors import Vectors, first_non_finite_in, format_like, parse, select_params

Params = str | Sequence[str] | None

log = logging.getLogger("hessfast")


def _as_tuple(inputs: Any) -> tuple:
    """Positional inputs: a tensor is ``(inputs,)``, a tuple or list itself (a mapping is
    :func:`split_inputs`' business)."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs)
    raise ValueError(
        f"inputs must be a tensor, a tuple of tensors passed as model(*inputs) or a dict "
        f"passed as model(**inputs), not {type(inputs).__name__}"
    )


def split_inputs(inputs: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with which the model is called: a mapping (a dict, ``UserDict``, a
    tokenizer's ``BatchEncoding``) is ``model(**inputs)``, anything else ``model(*inputs)``."""
    if isinstance(inputs, Mapping):
        bad = [k for k in inputs if not isinstance(k, str)]
        if bad:
            raise ValueError(f"dict inputs are passed as model(**inputs): keys must be str: {bad}")
        return (), dict(inputs)
    return _as_tuple(inputs), {}


def compute(
    model,
    loss_fn,
    inputs,
    targets,
    selected,
    vec: Vectors | None,
    mode,
    strict,
    profiler=None,
    backend=None,
    compile=None,
    output=None,
    info: list | None = None,
    grads: bool = True,
    fingerprint: capture.Fingerprint | None = None,
    before: Callable[[], None] | None = None,
    result: list | None = None,
):
    """``(loss, grads, products)`` of one engine run: what ``hvp``/``ggn_vp``/``grad`` and the
    operators, the profiler and the benchmarks call (``mode``: ``"hvp"``, ``"ggn"``, ``"grad"`` or
    ``"residual"``, see :mod:`hessfast.engine`).
    With ``info`` (a list) the run's :class:`~hessfast.dispatch.ProductInfo` is appended to it;
    the ``hessfast`` logger gets it as one DEBUG line either way. ``grads=False`` (``"hvp"``
    mode): the caller does not read the gradient, and it is ``None`` in the result; the
    parameters' primal cotangents are not computed (one GEMM per linear weight, half of a
    convolution's stacked weight gradient: :attr:`hessfast.rules.base.Call.unread`). ``fingerprint``:
    :func:`hessfast.capture.fingerprint` of ``model`` taken by the caller since its last change
    (``None``: taken here). ``before``: a check of the inputs run before anything but a replay of
    a traced product (:func:`hessfast.traced.run`); the caller checks the inputs of a replay
    afterwards (:func:`hvp` does, with the result's check). ``result`` (a list): the run's
    :class:`~hessfast.engine.Result` is appended to it (a traced replay's finiteness probe,
    which :func:`_check_finite` reads instead of passing over ``v`` and the results again, and
    what :mod:`hessfast.replay` records).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from hessfast.vectors import select_params
        >>> model, x, y = torch.nn.Linear(3, 2), torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
        >>> loss, g, _ = compute(model, F.cross_entropy, x, y, select_params(model, None),
        ...                      None, "grad", False)
        >>> g["weight"].shape
        torch.Size([2, 3])
    """
    traced.check_mode(compile)
    with use_backend(backend) as requested, dispatch.recording() as rec:
        res = _compute_on(
            model,
            loss_fn,
            inputs,
            targets,
            selected,
            vec,
            mode,
            strict,
            profiler,
            compile,
            output,
            grads,
            fingerprint,
            before,
        )
    if result is not None:
        result.append(res)
    if res.trace is not None and rec.traced:  # reported for the trace's replays
        res.trace.dispatch_choices = Counter(rec.traced)
    if info is not None or log.isEnabledFor(logging.DEBUG):
        what = dispatch.product_info(rec, mode, requested, res.fallback_ops, res.trace)
        if isinstance(res, _Whole):
            what.path = "autograd"
        log.debug("hessfast: %s", what)
        if info is not None:
            info.append(what)
    return res.loss, res.grads if grads else None, res.products


def _compute_on(
    model,
    loss_fn,
    inputs,
    targets,
    selected,
    vec,
    mode,
    strict,
    profiler,
    compile,
    output,
    grads,
    fingerprint,
    before,
):
    """The engine's result (``loss``, ``grads``, ``products``, ``fallback_ops`` and ``trace``,
    the traced product that ran or was traced; ``None``: interpreted)."""
    inputs, kwargs = split_inputs(inputs)
    if fingerprint is None:  # (taking one checked the model)
        _check_module(model)
    names = frozenset(n for n, _ in selected)
    tangents = vec.tangents if vec is not None else None
    k = vec.k if vec is not None else 0
    custom = not losses.is_closed_form(loss_fn)
    try:
        prog = capture.capture(model, inputs, kwargs, output, custom, fingerprint)
    except CaptureError as e:
        if strict:
            raise
        warnings.warn(
            f"hessfast could not capture {type(model).__name__} with torch.export ({e}); "
            "computing the whole loss with autograd double backward instead, which costs "
            "several gradients per vector and keeps the autograd graph in memory. "
            "Pass strict=True to make this an error.",
            stacklevel=3,
        )
        rule = losses.resolve(loss_fn, targets)
        if before is not None:
            before()
        loss, grads, prods = autograd_fallback.run(
            model, rule, inputs, selected, tangents, k, mode, kwargs=kwargs, output=output
        )
        return _Whole(loss, grads, prods)
    # parameters as they are (traced.run detaches where autograd could record)
    values: dict[str, Any] = dict(prog.state(model))
    values.update(prog.constants)
    values.update(zip(prog.user_inputs, tree_flatten_spec((inputs, kwargs), prog.in_spec)))
    out_meta = prog.output.meta.get("val")
    out_shape = tuple(out_meta.shape) if out_meta is not None else None
    resolved = losses.resolve(loss_fn, targets, out_shape)
    _, rule = losses.read_output(resolved, prog.out_spec, output)
    if profiler is not None:  # the per-rule view needs the interpreter
        if before is not None:
            before()
        values = traced.detached(values)
        return engine.run(
            prog, names, values, tangents, k, rule, mode, profiler=profiler, grads=grads
        )
    res = traced.run(prog, names, values, tangents, k, rule, mode, compile, grads, before)
    if res.flat is not None:
        res.classes = losses.class_range(resolved, out_shape)
        if custom:
            res.lowering = (out_shape, prog.out_spec, output, prog.output.meta.get("val"))
    return res


def _check_module(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, not {type(model).__name__}")


class _Whole:
    """The autograd whole-loss fallback's result, shaped like the engine's (no rule ran)."""

    fallback_ops = None
    trace = None
    probe = flat = active = classes = lowering = None

    def __init__(self, loss, grads, products):
        self.loss, self.grads, self.products = loss, grads, products


class _VCheck:
    """The check that ``v`` is finite, deferred: :func:`hessfast.traced.run` calls it before
    anything but a replay of a traced product runs; after a replay it runs with the result's
    check, in one host sync (:func:`_check_finite`)."""

    __slots__ = ("vec", "done")

    def __init__(self, vec: Vectors):
        self.vec, self.done = vec, False

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self.vec.check_finite()


def _check_finite(
    v: _VCheck | None,
    results: list[tuple[str, dict[str, torch.Tensor]]],
    check: bool,
    probe: torch.Tensor | None = None,
) -> None:
    """Raise ``ValueError`` naming the parameter if ``v`` (unless checked before the product) has
    a NaN or Inf entry, else, with ``check``, :class:`NonFiniteError` for the first of the
    ``(kind, values)`` results that has one; one host sync for all. ``probe``: a traced
    replay's finiteness probe (:attr:`hessfast.engine.Result.probe`); a finite one proves ``v``
    and the results finite, and nothing else is read."""
    if probe is not None and math.isfinite(probe.item()):
        return
    groups = [("v", v.vec.finite_parts())] if v is not None and not v.done else []
    if check:
        groups += results
    bad = first_non_finite_in(groups)
    if bad is None:
        return
    kind, n = bad
    if kind == "v":
        v.vec.raise_non_finite(n)
    raise NonFiniteError(
        f"the {kind} has NaN or Inf entries in parameter {n!r}: the loss or the model is "
        "not finite at these inputs (check the data, the loss scale and the dtype). Pass "
        "check_finite=False to receive the result anyway."
    )


def _replayable(params: Params, return_info: bool) -> bool:
    """Whether a call may be served, and recorded, by :mod:`hessfast.replay` (which needs the
    whole parameter set, returns no info, and logs no per-product line)."""
    return params is None and not return_info and not log.isEnabledFor(logging.DEBUG)


def _selection(model: Any, params: Params) -> tuple[capture.Fingerprint, list]:
    """The model's fingerprint (taken once per product, read again by the capture guard) and
    the differentiated parameters."""
    _check_module(model)
    fp = capture.fingerprint(model)
    return fp, select_params(model, params, fp)


def hvp(
    model: nn.Module,
    loss_fn: Callable,
    inputs: Any,
    targets: Any,
    v: dict[str, torch.Tensor] | torch.Tensor,
    *,
    params: Params = None,
    return_grad: bool = False,
    strict: bool = False,
    check_finite: bool = True,
    backend: str | None = None,
    compile: str | None = None,
    output: str | int | None = None,
    return_info: bool = False,
):
    """Exact Hessian of ``loss_fn(model(*inputs), targets)`` w.r.t. the parameters, times ``v``.

    ``v`` is a dict ``{name: tensor}`` over the differentiated parameters or a flat tensor in
    ``named_parameters()`` order, optionally with a leading K axis for K vectors at once; the
    result has the same structure. With ``return_grad=True`` returns ``(Hv, ∇L)``, the gradient in
    ``v``'s structure without the K axis. ``backend`` (``"auto"``, ``"cuda"``, ``"triton"``,
    ``"torch"``; ``None``: the current :func:`hessfast.use_backend` / ``HESSFAST_BACKEND`` choice)
    picks the rule implementations, see :mod:`hessfast.backends`. ``compile`` (``None``: the
    product's traced graph, traced on first use and replayed; ``"interpret"``: the node-by-node
    interpreter; ``"inductor"``: the traced graph through ``torch.compile``; ``"cudagraphs"``)
    picks how the product runs, see :mod:`hessfast.traced`. With ``return_info=True`` a
    :class:`~hessfast.dispatch.ProductInfo` (the implementation that ran per op family, the ops
    that fell back to ``torch.func``) is returned last.

    ``inputs`` may be a dict (or ``UserDict``, a tokenizer's ``BatchEncoding``): the model is then
    called as ``model(**inputs)``. A model may return a dict, ``ModelOutput``, tuple or list:
    ``output`` (a key such as ``"logits"``, or an index) says which tensor the loss reads
    (default: a lone tensor, else the ``logits`` entry for the built-in losses); a custom
    ``loss_fn`` of a model returning a container with one tensor receives the container.

    Example:
        >>> import torch, torch.nn.functional as F, hessfast
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
        >>> v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        >>> hv = hessfast.hvp(model, F.cross_entropy, x, y, v)
        >>> sorted(hv) == sorted(v) and hv["0.weight"].shape == (4, 3)
        True
    """
    fast = _replayable(params, return_info)
    args = (strict, backend, compile, output, check_finite)
    if fast:
        got = replay.run(("hvp", return_grad), model, loss_fn, inputs, targets, v, args)
        if got is not None:
            return (got[1], got[0]) if return_grad else got[1]
    fp, selected = _selection(model, params)
    vec = parse(v, selected, check_finite=False)
    v_check = _VCheck(vec)
    info: list | None = [] if return_info else None
    result: list = []
    _, grads, prods = compute(
        model,
        loss_fn,
        inputs,
        targets,
        selected,
        vec,
        "hvp",
        strict,
        backend=backend,
        compile=compile,
        output=output,
        info=info,
        grads=return_grad,
        fingerprint=fp,
        before=v_check,
        result=result,
    )
    results = [("Hessian-vector product", prods)]
    if return_grad:
        results.append(("gradient", grads))
    _check_finite(v_check, results, check_finite, result[0].probe)
    if fast:
        kind = ("hvp", return_grad)
        replay.record(
            kind, model, loss_fn, inputs, targets, v, args, result[0], fp, selected, vec.batched
        )
    out = (
        format_like(prods, vec)
        if vec.batched
        else format_like({n: t.squeeze(0) for n, t in prods.items()}, vec)
    )
    extra = (info[0],) if return_info else ()
    if not return_grad:
        return (out, *extra) if extra else out
    return (out, format_like(grads, vec, batched=False), *extra)


def ggn_vp(
    model: nn.Module,
    loss_fn: Callable,
    inputs: Any,
    targets: Any,
    v: dict[str, torch.Tensor] | torch.Tensor,
    *,
    params: Params = None,
    strict: bool = False,
    check_finite: bool = True,
    backend: str | None = None,
    compile: str | None = None,
    output: str | int | None = None,
    return_info: bool = False,
):
    """Generalised Gauss-Newton ``Jᵀ H_L J`` times ``v`` (J: the model's Jacobian w.r.t. the
    parameters, H_L: the loss Hessian at the output). Positive semidefinite for convex losses.
    ``v`` and the result are structured as in :func:`hvp`; ``return_info=True`` returns
    ``(result, info)`` as there.

    Example:
        >>> import torch, torch.nn.functional as F, hessfast
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
        >>> v = torch.randn(7, 8)  # K = 7 flat vectors over P = 8 parameters
        >>> hessfast.ggn_vp(model, F.cross_entropy, x, y, v).shape
        torch.Size([7, 8])
    """
    return _product(
        "ggn",
        "GGN-vector product",
        model,
        loss_fn,
        inputs,
        targets,
        v,
        params,
        strict,
        check_finite,
        backend,
        compile,
        output,
        return_info,
    )


def residual_vp(
    model: nn.Module,
    loss_fn: Callable,
    inputs: Any,
    targets: Any,
    v: dict[str, torch.Tensor] | torch.Tensor,
    *,
    params: Params = None,
    strict: bool = False,
    check_finite: bool = True,
    backend: str | None = None,
    compile: str | None = None,
    output: str | int | None = None,
    return_info: bool = False,
):
    """The Gauss-Newton residual ``R = H − G`` times ``v``: ``Σ_i (∂L/∂z_i) ∇²_θ z_i · v``, the
    Hessian's part from the model outputs' second derivatives (symmetric, indefinite). One engine
    pass (an HVP pass without the loss Hessian's term), about the cost of one :func:`hvp`, not of
    an HVP and a GGN-VP. ``v`` and the result are structured as in :func:`hvp`;
    ``return_info=True`` returns ``(result, info)`` as there.

    Example:
        >>> import torch, torch.nn.functional as F, hessfast
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
        >>> v = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        >>> r = hessfast.residual_vp(model, F.cross_entropy, x, y, v)
        >>> h, g = (f(model, F.cross_entropy, x, y, v) for f in (hessfast.hvp, hessfast.ggn_vp))
        >>> all(torch.allclose(r[n], h[n] - g[n], atol=1e-6) for n in v)
        True
    """
    return _product(
        "residual",
        "Gauss-Newton residual product",
        model,
        loss_fn,
        inputs,
        targets,
        v,
        params,
        strict,
        check_finite,
        backend,
        compile,
        output,
        return_info,
    )


def _product(
    mode,
    what,
    model,
    loss_fn,
    inputs,
    targets,
    v,
    params,
    strict,
    check_finite,
    backend,
    compile,
    output,
    return_info,
):
    """A product without a gradient (``"ggn"``, ``"residual"``) in ``v``'s structure."""
    fast = _replayable(params, return_info)
    args = (strict, backend, compile, output, check_finite)
    if fast:
        got = replay.run((mode,), model, loss_fn, inputs, targets, v, args)
        if got is not None:
            return got[1]
    fp, selected = _selection(model, params)
    vec = parse(v, selected, check_finite=False)
    v_check = _VCheck(vec)
    info: list | None = [] if return_info else None
    result: list = []
    _, _, prods = compute(
        model,
        loss_fn,
        inputs,
        targets,
        selected,
        vec,
        mode,
        strict,
        backend=backend,
        compile=compile,
        output=output,
        info=info,
        fingerprint=fp,
        before=v_check,
        result=result,
    )
    _check_finite(v_check, [(what, prods)], check_finite, result[0].probe)
    if fast:
        kind = (mode,)
        replay.record(
            kind, model, loss_fn, inputs, targets, v, args, result[0], fp, selected, vec.batched
        )
    if vec.batched:
        out = format_like(prods, vec)
    else:
        out = format_like({n: t.squeeze(0) for n, t in prods.items()}, vec)
    return (out, info[0]) if return_info else out


def grad(
    model: nn.Module,
    loss_fn: Callable,
    inputs: Any,
    targets: Any,
    *,
    params: Params = None,
    flat: bool = False,
    strict: bool = False,
    check_finite: bool = True,
    backend: str | None = None,
    compile: str | None = None,
    output: str | int | None = None,
    return_info: bool = False,
):
    """Gradient of ``loss_fn(model(*inputs), targets)`` through the same engine: a dict
    ``{name: tensor}``, or a flat tensor in ``named_parameters()`` order with ``flat=True``;
    ``return_info=True`` returns ``(gradient, info)`` as :func:`hvp` does.

    Example:
        >>> import torch, torch.nn.functional as F, hessfast
        >>> model = torch.nn.Linear(3, 2)
        >>> g = hessfast.grad(model, F.mse_loss, torch.randn(4, 3), torch.randn(4, 2))
        >>> sorted(g)
        ['bias', 'weight']
    """
    fast = _replayable(params, return_info)
    args = (strict, backend, compile, output, check_finite)
    if fast:
        got = replay.run(("grad",), model, loss_fn, inputs, targets, None, args)
        if got is not None:
            return torch.cat([g.flatten() for g in got[0].values()]) if flat else got[0]
    fp, selected = _selection(model, params)
    info: list | None = [] if return_info else None
    result: list = []
    _, grads, _ = compute(
        model,
        loss_fn,
        inputs,
        targets,
        selected,
        None,
        "grad",
        strict,
        backend=backend,
        compile=compile,
        output=output,
        info=info,
        fingerprint=fp,
        result=result,
    )
    _check_finite(None, [("gradient", grads)], check_finite, result[0].probe)
    if fast:
        kind = ("grad",)
        replay.record(
            kind, model, loss_fn, inputs, targets, None, args, result[0], fp, selected, False
        )
    if flat:
        out = torch.cat([grads[n].flatten() for n, _ in selected])
    else:
        out = {n: grads[n] for n, _ in selected}
    return (out, info[0]) if return_info else out
