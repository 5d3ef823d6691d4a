"""Newton-type steps from a curvature operator: Hessian-free conjugate gradient and the
saddle-free Newton step built on the Lanczos eigenbasis.

Both see the operator only through ``matmat``; CG spends one product per iteration, saddle-free
the products of one :func:`~hessfast.algorithms.lanczos.eigsh` run (or none when it is given the
eigenpairs of an earlier run).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from .krylov import Products, check_operator, run_symmetry_check
from .lanczos import EigshInfo, eigsh

Tensor = torch.Tensor

METHODS = ("cg", "saddle_free")


@dataclass
class NewtonStep:
    """Result of :func:`newton_step`.

    Attributes:
        step: the step ``s`` (a flat ``[P]`` tensor, or a dict like ``g`` when ``g`` was a dict),
            in the operator's dtype and on its device.
        method: ``"cg"`` or ``"saddle_free"``.
        iterations: CG iterations, or Lanczos steps of the eigsh run (0 with ``eigenpairs=``).
        products: products of the operator spent.
        residual: ``"cg"``: ``‖(H + damping·I) s + g‖ / ‖g‖`` from the CG recurrence;
            ``"saddle_free"``: the largest ``‖H v − λ v‖ / |λ|`` of the eigenpairs used (0 with
            ``eigenpairs=``).
        converged: ``"cg"``: the residual reached ``tol`` (false after negative curvature);
            ``"saddle_free"``: eigsh converged.
        negative_curvature: ``"cg"`` met a direction ``p`` with ``pᵀ (H + damping·I) p ≤ 0`` and
            stopped there.
        direction: that direction ``p`` (flat), else ``None``: a direction of non-positive
            curvature along which the quadratic model decreases from ``step``
            (``pᵀ((H + damping·I) s + g) < 0``), useful to escape a saddle.
        curvature: ``pᵀ (H + damping·I) p / pᵀp`` of ``direction``, else ``None``.
        eigenvalues, eigenvectors: ``"saddle_free"``: the eigenpairs used.
        seconds_in_products, seconds_total: wall time in the products and in all.
        eigsh_info: ``"saddle_free"``: the :class:`~hessfast.algorithms.lanczos.EigshInfo`.
    """

    step: Tensor | dict = field(repr=False)
    method: str
    iterations: int
    products: int
    residual: float
    converged: bool
    negative_curvature: bool = False
    direction: Tensor | None = field(default=None, repr=False)
    curvature: float | None = None
    eigenvalues: Tensor | None = None
    eigenvectors: Tensor | None = field(default=None, repr=False)
    seconds_in_products: float = 0.0
    seconds_total: float = 0.0
    eigsh_info: EigshInfo | None = field(default=None, repr=False)


def _flatten(g, op, P: int) -> tuple[Tensor, list | None]:
    """``g`` as a flat ``[P]`` tensor in the operator's dtype and device, and how to unflatten."""
    if isinstance(g, dict):
        names = getattr(op, "names", None)
        if names is None:
            raise ValueError(
                "g is a dict but the operator has no parameter names (op.names); pass a flat "
                "[P] tensor"
            )
        if set(g) != set(names):
            missing = [n for n in names if n not in g]
            extra = [n for n in g if n not in names]
            raise ValueError(
                f"g's keys differ from the operator's parameters: missing {missing}, extra {extra}"
            )
        sizes = getattr(op, "sizes", None) or [g[n].numel() for n in names]
        layout = []
        for n, size in zip(names, sizes):
            if g[n].numel() != size:
                raise ValueError(
                    f"g[{n!r}] has {g[n].numel()} entries, the operator's parameter has {size}"
                )
            layout.append((n, tuple(g[n].shape)))
        flat = torch.cat([g[n].reshape(-1).to(op.device, op.dtype) for n in names])
        return flat, layout
    if not isinstance(g, torch.Tensor) or g.dim() != 1 or g.shape[0] != P:
        shape = list(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
        raise ValueError(f"g must be a flat [P] tensor with P={P} (or a dict), got {shape}")
    return g.to(op.device, op.dtype), None


def _unflatten(s: Tensor, layout: list | None):
    if layout is None:
        return s
    out, off = {}, 0
    for n, shape in layout:
        size = math.prod(shape)
        out[n] = s[off : off + size].reshape(shape)
        off += size
    return out


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.dot(a.double(), b.double()))


def _cg(counter, g, damping, tol, max_iter, x0):
    """CG on ``(H + damping·I) s = −g``; returns (s, iterations, rel. residual, converged,
    direction, curvature)."""
    gnorm = math.sqrt(_dot(g, g))
    s = torch.zeros_like(g) if x0 is None else x0.clone()
    if gnorm == 0.0:
        return s * 0, 0, 0.0, True, None, None
    r = -g if x0 is None else -g - (counter.matmat(s[:, None])[:, 0] + damping * s)
    p = r.clone()
    rr = _dot(r, r)
    it = 0
    while True:
        rel = math.sqrt(rr) / gnorm
        if rel <= tol:
            return s, it, rel, True, None, None
        if it >= max_iter:
            return s, it, rel, False, None, None
        Ap = counter.matmat(p[:, None])[:, 0] + damping * p
        it += 1
        pAp = _dot(p, Ap)
        if not pAp > 0:
            return s, it, rel, False, p, pAp / _dot(p, p)
        alpha = rr / pAp
        s = s + alpha * p
        r = r - alpha * Ap
        rr_new = _dot(r, r)
        p = r + (rr_new / rr) * p
        rr = rr_new


def newton_step(
    op,
    g: Tensor | dict,
    method: str = "cg",
    damping: float = 1e-3,
    tol: float = 1e-6,
    max_iter: int | None = None,
    *,
    k: int = 20,
    x0: Tensor | None = None,
    seed: int = 0,
    eigenpairs: tuple[Tensor, Tensor] | None = None,
    check_symmetric: bool | None = None,
    **eigsh_kwargs,
) -> NewtonStep:
    """A damped Newton step ``s`` for the gradient ``g`` and the curvature operator ``op``.

    ``method="cg"`` (Hessian-free): conjugate gradient on ``(H + damping·I) s = −g`` from
    ``x0`` (default zero), one product per iteration, stopping when
    ``‖(H + damping·I) s + g‖ ≤ tol·‖g‖`` or after ``max_iter`` iterations (default
    ``min(2P, 1000)``). When a search direction has ``pᵀ (H + damping·I) p ≤ 0`` the matrix is
    not positive definite: CG stops there and returns the current iterate (zero, or ``x0``, if it
    happens at the first iteration) with ``negative_curvature=True`` and the direction in
    ``.direction``.

    ``method="saddle_free"``: with ``(Λ, V)`` the ``k`` eigenpairs of largest ``|λ|`` (from
    :func:`~hessfast.algorithms.lanczos.eigsh` with ``which="LM"``, ``tol`` and ``max_iter`` passed
    on, or ``eigenpairs=(Λ, V)`` of an earlier run, which spends no product),

        ``s = −[ V (|Λ| + damping)⁻¹ Vᵀ g + (g − V Vᵀ g) / damping ]``,

    i.e. ``−|H|⁻¹ g`` on the top eigenspace, with the rest of the spectrum replaced by
    ``damping`` (which must then be positive). With ``k = P`` it is ``−(|H| + damping·I)⁻¹ g``
    exactly.

    Args:
        op: a symmetric operator (``shape``, ``dtype``, ``device``, ``matmat``).
        g: the gradient, a flat ``[P]`` tensor, or a dict over the operator's parameters when the
            operator has ``names`` (a :class:`hessfast.HessianOperator`); the step comes back in
            the same form.
        method: ``"cg"`` or ``"saddle_free"``.
        damping: ``λ ≥ 0`` added to the curvature (``"saddle_free"``: ``> 0`` unless ``k = P``).
        tol: CG relative residual, or the eigsh tolerance.
        max_iter: CG iterations, or eigsh Lanczos steps.
        k: ``"saddle_free"``: number of eigenpairs (capped at P).
        x0: ``"cg"``: a starting iterate (costs one more product).
        seed: ``"saddle_free"``: the eigsh seed.
        eigenpairs: ``"saddle_free"``: ``(eigenvalues [k], eigenvectors [P, k])`` to reuse.
        check_symmetric: probe ``⟨u, Hv⟩ = ⟨Hu, v⟩`` first, as in
            :func:`~hessfast.algorithms.lanczos.eigsh` (default: one two-column product, counted
            in ``products``, on hessfast's Hessian and GGN operators).
        **eigsh_kwargs: ``"saddle_free"``: more arguments of eigsh (``block_size``, ``ncv``, ...).

    Returns:
        A :class:`NewtonStep` (``.step``, ``.iterations``, ``.products``, ``.residual``,
        ``.converged``, ``.negative_curvature``, ...).

    >>> import torch, hessfast
    >>> from hessfast.algorithms import newton_step
    >>> H = hessfast.DenseOperator(torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)))
    >>> g = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    >>> r = newton_step(H, g, damping=0.0, tol=1e-12)
    >>> [round(x, 6) for x in r.step.tolist()], r.iterations, r.negative_curvature
    ([-1.0, -0.5, -0.25], 3, False)
    >>> r = newton_step(H, g, method="saddle_free", damping=1.0, k=3)
    >>> [round(x, 6) for x in r.step.tolist()]
    [-0.5, -0.333333, -0.2]
    """
    t0 = time.perf_counter()
    P = check_operator(op)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not damping >= 0:
        raise ValueError(f"damping must be >= 0, got {damping!r}")
    flat, layout = _flatten(g, op, P)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("g contains NaN or Inf")
    counter = Products(op)
    # CG and the Lanczos eigenbasis assume a symmetric operator (see eigsh's check_symmetric)
    run_symmetry_check(op, counter, seed, check_symmetric)
    if method == "saddle_free":
        eigsh_kwargs["check_symmetric"] = False  # probed above

    if method == "cg":
        if eigenpairs is not None or eigsh_kwargs:
            raise ValueError("eigenpairs and eigsh arguments belong to method='saddle_free'")
        if x0 is not None:
            x0, _ = _flatten(x0, op, P)
        max_iter = min(2 * P, 1000) if max_iter is None else int(max_iter)
        s, it, rel, conv, p, curv = _cg(counter, flat, float(damping), tol, max_iter, x0)
        return NewtonStep(
            step=_unflatten(s, layout),
            method=method,
            iterations=it,
            products=counter.products,
            residual=rel,
            converged=conv,
            negative_curvature=p is not None,
            direction=p,
            curvature=curv,
            seconds_in_products=counter.seconds,
            seconds_total=time.perf_counter() - t0,
        )

    if x0 is not None:
        raise ValueError("x0 belongs to method='cg'")
    info = None
    if eigenpairs is None:
        kk = min(int(k), P)
        evals, V, info = eigsh(
            op,
            k=kk,
            which="LM",
            tol=tol,
            max_iter=max_iter,
            seed=seed,
            return_info=True,
            **eigsh_kwargs,
        )
        residual = float((info.residuals / evals.abs().clamp_min(1e-300)).max())
        iterations, converged = info.iterations, info.converged
        counter.products, counter.seconds = info.products, info.seconds_in_products
    else:
        evals, V = eigenpairs
        if V.dim() != 2 or V.shape[0] != P or evals.shape != (V.shape[1],):
            raise ValueError(
                f"eigenpairs must be (eigenvalues [k], eigenvectors [P, k]) with P={P}, got "
                f"{list(evals.shape)} and {list(V.shape)}"
            )
        evals = evals.double().cpu()
        residual, iterations, converged = 0.0, 0, True
    kk = V.shape[1]
    if damping == 0 and kk < P:
        raise ValueError(
            "saddle_free with k < P needs damping > 0: it stands in for the eigenvalues outside "
            "the top-k eigenspace"
        )
    denom = evals.abs() + damping
    if not bool((denom > 0).all()):
        raise ValueError("saddle_free: an eigenvalue is 0 and damping is 0; pass damping > 0")
    Vd = V.to(op.device, op.dtype)
    c = Vd.T @ flat
    top = Vd @ (c / denom.to(c.device, c.dtype))
    s = -top if kk == P and damping == 0 else -(top + (flat - Vd @ c) / damping)
    return NewtonStep(
        step=_unflatten(s, layout),
        method=method,
        iterations=iterations,
        products=counter.products,
        residual=residual,
        converged=converged,
        eigenvalues=evals,
        eigenvectors=Vd,
        seconds_in_products=counter.seconds,
        seconds_total=time.perf_counter() - t0,
        eigsh_info=info,
    )
