"""Per-layer curvature: λ_max, λ_min and trace of every diagonal block ``H_gg`` in one batched pass.

Each parameter group ``g`` (a module, a parameter tensor, or any set of index ranges) gets its own
columns in the *same* product: a column that belongs to group ``g`` is zero outside ``g``, and of
the product ``H X`` the group keeps only its own rows, which is exactly ``H_gg x``. So one Lanczos
step for all groups is one K-batched product of the model, with ``K = #groups × k``.

Traces: Hutchinson. With ``trace_probes="shared"`` (default) ``num_trace_probes`` Rademacher
probes ``z`` cover all groups at once and group ``g`` takes ``z_gᵀ (H z)_g``, whose mean is
``tr(H_gg)`` (the couplings to other groups average out; they add ``‖H_{g,rest}‖_F²`` to the
variance); ``trace_probes="block"`` gives every group its own probes, zero outside the group
(plain Hutchinson on ``H_gg``, ``#groups`` times the columns). A group with ``|g| ≤
num_trace_probes`` gets its exact trace from ``|g|`` unit columns instead.

Cost, with ``k`` vectors per group and ``G_L`` groups run by Lanczos: ``lanczos_steps`` products
of ``G_L × k`` columns; the first product also carries the trace columns (``num_trace_probes``,
or ``#groups × num_trace_probes`` with ``"block"``, plus the unit columns of small groups) and the
unit columns of the groups formed densely (below). ``max_columns`` splits every product into
``matmat`` calls of at most that many columns. Memory: the Lanczos bases hold
``lanczos_steps × k × Σ_g |g|`` numbers (≤ ``lanczos_steps × k × P``).

Small groups (``|g| ≤ lanczos_steps × k``) are cheaper to form densely: their ``|g|`` unit columns
go into the first product, and their eigenvalues and trace are exact (``method="dense"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .diagonal import diagonal
from .krylov import Operator, Products, as_operator, check_positive_int, rademacher, work_dtype
from .recurrences import lanczos_runs
from .trace import standard_error

Tensor = torch.Tensor

__all__ = ["layerwise", "layerwise_diagonal", "BlockSpectrum", "WHICH"]

WHICH = ("lambda_max", "lambda_min", "trace")


@dataclass
class BlockSpectrum:
    """Curvature of one diagonal block ``H_gg`` (see :func:`layerwise`).

    ``lambda_max`` / ``lambda_min``: the largest / smallest Ritz value of the block (``None`` when
    not asked for); ``residual_max`` / ``residual_min``: their residual norms ``‖H_gg y − θ y‖``
    (Lanczos estimates; 0 for a dense block): there is an eigenvalue within the residual of each
    Ritz value. ``top`` / ``bottom``: the ``k`` largest (descending) / smallest (ascending) Ritz
    values, with ``residuals_top`` / ``residuals_bottom``. ``trace`` with ``trace_stderr`` (0 when
    exact), ``trace_method``: ``"exact"`` or ``"hutchinson"``. ``size``: number of parameters
    in the group. ``method``: how the group was computed: ``"lanczos"``, ``"dense"`` (the whole
    block from unit columns: exact eigenvalues and trace) or ``"hutchinson"`` (trace only).
    ``steps``: Lanczos steps run (0 otherwise).

    >>> import torch
    >>> from hessfast.algorithms.layerwise import layerwise
    >>> r = layerwise(torch.diag(torch.tensor([2.0, -1.0, 5.0], dtype=torch.float64)),
    ...               groups={"all": [(0, 3)]})["all"]
    >>> r.lambda_max, r.lambda_min, r.trace, r.to_dict()["size"]
    (5.0, -1.0, 6.0, 3)
    """

    label: str
    size: int
    method: str
    lambda_max: float | None = None
    lambda_min: float | None = None
    trace: float | None = None
    trace_stderr: float | None = None
    trace_method: str | None = None
    residual_max: float | None = None
    residual_min: float | None = None
    top: list[float] = field(default_factory=list)
    bottom: list[float] = field(default_factory=list)
    residuals_top: list[float] = field(default_factory=list)
    residuals_bottom: list[float] = field(default_factory=list)
    steps: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _resolve_groups(op: Operator, groups: Any) -> dict[str, list[tuple[int, int]]]:
    P = op.shape[0]
    if isinstance(groups, dict):
        raw = groups
    else:
        fn = getattr(op, "groups", None)
        if not callable(fn):
            raise ValueError(
                f"groups={groups!r} needs an operator with .groups() (a HessianOperator or "
                "GGNOperator); for other operators pass a dict {label: [(start, stop), ...]}"
            )
        raw = fn(groups)
    if not raw:
        raise ValueError("groups is empty: give at least one group")
    out: dict[str, list[tuple[int, int]]] = {}
    for label, ranges in raw.items():
        if (
            isinstance(ranges, tuple)
            and len(ranges) == 2
            and all(isinstance(x, (int, np.integer)) for x in ranges)
        ):
            ranges = [ranges]
        rs = []
        for r in ranges:
            try:
                a, b = (int(x) for x in r)
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"group {label!r}: each range must be a (start, stop) pair, got {r!r}"
                ) from e
            if not 0 <= a <= b <= P:
                raise ValueError(f"group {label!r}: range ({a}, {b}) is outside 0..{P}")
            if b > a:
                rs.append((a, b))
        if not rs:
            raise ValueError(f"group {label!r} is empty: it covers no parameter")
        rs.sort()
        merged = [rs[0]]
        for a, b in rs[1:]:
            if a < merged[-1][1]:
                raise ValueError(f"group {label!r}: ranges overlap at index {a}")
            if a == merged[-1][1]:
                merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        out[str(label)] = merged
    return out


def _rows(ranges: list[tuple[int, int]], device: torch.device) -> slice | Tensor:
    if len(ranges) == 1:
        return slice(*ranges[0])
    return torch.cat([torch.arange(a, b, device=device) for a, b in ranges])


def _index(ranges: list[tuple[int, int]]) -> Tensor:
    return torch.cat([torch.arange(a, b) for a, b in ranges])


def _ranges(index: Tensor) -> list[tuple[int, int]]:
    """Sorted unique indices as maximal ``(start, stop)`` runs."""
    breaks = (torch.nonzero(index[1:] - index[:-1] != 1)[:, 0] + 1).tolist()
    edges = [0, *breaks, index.numel()]
    return [(int(index[a]), int(index[b - 1]) + 1) for a, b in zip(edges[:-1], edges[1:])]


def _which(which: Any) -> set[str]:
    items = [which] if isinstance(which, str) else list(which)
    bad = [w for w in items if w not in WHICH]
    if bad or not items:
        raise ValueError(f"which must be a non-empty subset of {WHICH}, got {which!r}")
    return set(items)


def layerwise(
    H: Operator | Tensor,
    groups: Any = "module",
    k: int = 1,
    which: Sequence[str] | str = WHICH,
    lanczos_steps: int = 30,
    num_trace_probes: int = 16,
    seed: int = 0,
    *,
    trace_probes: str = "shared",
    max_columns: int | None = None,
    basis_dtype: torch.dtype | None = None,
    offload: bool = False,
    tol: float | None = None,
) -> dict[str, BlockSpectrum]:
    """λ_max, λ_min and trace of each diagonal block ``H_gg``, all groups in the same products.

    ``groups``: a dict ``{label: [(start, stop), ...]}`` of index ranges into the flat parameter
    vector, or anything ``H.groups(...)`` accepts when ``H`` has it (``"module"``,
    ``"parameter"``, a list of glob patterns). ``k``: how many extreme eigenvalues per block at each
    end; each group runs a block Lanczos recurrence with ``k`` vectors (so eigenvalues of
    multiplicity up to ``k`` are found) for ``lanczos_steps`` steps, with full reorthogonalisation,
    the projected problem in float64, and residual norms for every Ritz value. Trace per block:
    Hutchinson with ``num_trace_probes`` Rademacher probes, shared by the groups
    (``trace_probes="shared"``) or per group (``"block"``), in the first product (exact, from
    ``|g|`` unit columns, when ``|g| ≤ num_trace_probes``); see the module docstring.
    ``which`` restricts what is computed (trace only: one product). See the module docstring for
    the cost and for small groups, which are formed densely and exactly.

    Reproducible from ``seed`` (all random vectors are drawn on the CPU). ``basis_dtype``,
    ``offload`` and ``tol`` as in :func:`hessfast.algorithms.slq.spectral_density` (a breakdown
    here restarts the group's recurrence with random vectors orthogonal to its basis).

    Returns ``{label: BlockSpectrum}`` in the order of ``groups``. Raises ``ValueError`` for
    ``k``, ``lanczos_steps`` or ``num_trace_probes`` < 1, an empty or overlapping group, or a
    non-square operator; ``NonFiniteError`` when a product has NaN or Inf.

    >>> import torch, hessfast
    >>> from hessfast.algorithms.layerwise import layerwise
    >>> A = torch.diag(torch.arange(1.0, 9.0, dtype=torch.float64))
    >>> out = layerwise(A, groups={"a": [(0, 3)], "b": [(3, 8)]}, lanczos_steps=5)
    >>> out["b"].lambda_max, out["b"].lambda_min, out["b"].trace, out["b"].method
    (8.0, 4.0, 30.0, 'dense')
    """
    op = as_operator(H)
    k = check_positive_int("k", k)
    steps = check_positive_int("lanczos_steps", lanczos_steps)
    t = check_positive_int("num_trace_probes", num_trace_probes)
    want = _which(which)
    want_lam = bool(want & {"lambda_max", "lambda_min"})
    want_tr = "trace" in want
    if trace_probes not in ("shared", "block"):
        raise ValueError(f"trace_probes must be 'shared' or 'block', got {trace_probes!r}")
    groups_ = _resolve_groups(op, groups)
    work = work_dtype(op.dtype, basis_dtype)
    work_device = torch.device("cpu") if offload else op.device
    gen = torch.Generator().manual_seed(int(seed))

    labels = list(groups_)
    sizes = {lab: sum(b - a for a, b in groups_[lab]) for lab in labels}
    rows = {lab: _rows(groups_[lab], op.device) for lab in labels}
    dense, unit, hutch, lanczos = [], [], [], []  # unit: exact trace from unit columns
    for lab in labels:
        n = sizes[lab]
        if want_lam and n <= steps * k or not want_lam and n <= t:
            dense.append(lab)
            continue
        if want_lam:
            lanczos.append(lab)
        if want_tr:
            (unit if n <= t else hutch).append(lab)

    extra = []
    for lab in dense + unit:
        extra.append((rows[lab], torch.eye(sizes[lab], dtype=work, device=work_device)))
    # Hutchinson probes: per group (zero outside it), or t probes shared by all those groups
    union = loc = None
    if hutch and trace_probes == "shared":
        idx = {lab: _index(groups_[lab]) for lab in hutch}
        union = torch.unique(torch.cat(list(idx.values())))  # sorted
        loc = {lab: torch.searchsorted(union, idx[lab]).to(work_device) for lab in hutch}
        Z = torch.stack([rademacher(union.numel(), gen) for _ in range(t)], 1)
        urows = _rows(_ranges(union), op.device)
        extra.append((urows, Z.to(work_device, work)))
    else:
        for lab in hutch:
            Z = torch.stack([rademacher(sizes[lab], gen) for _ in range(t)], 1)
            extra.append((rows[lab], Z.to(work_device, work)))
    starts = [
        torch.randn(sizes[lab], k, generator=gen, dtype=torch.float64).to(work_device, work)
        for lab in lanczos
    ]
    products = Products(op, max_columns)
    if lanczos:
        runs, extra_out = lanczos_runs(
            op,
            [rows[lab] for lab in lanczos],
            starts,
            steps,
            restart=True,
            tol=tol,
            work_dtype=work,
            offload=offload,
            generator=gen,
            products=products,
            extra=extra,
        )
    else:
        runs, extra_out = [], products(extra, work, work_device)

    results: dict[str, BlockSpectrum] = {}
    for lab in labels:
        results[lab] = BlockSpectrum(lab, sizes[lab], "hutchinson" if lab in hutch else "dense")

    def fill(res: BlockSpectrum, theta: np.ndarray, resid: np.ndarray) -> None:
        res.top = [float(x) for x in theta[::-1][:k]]
        res.residuals_top = [float(x) for x in resid[::-1][:k]]
        res.bottom = [float(x) for x in theta[:k]]
        res.residuals_bottom = [float(x) for x in resid[:k]]
        if "lambda_max" in want:
            res.lambda_max, res.residual_max = res.top[0], res.residuals_top[0]
        if "lambda_min" in want:
            res.lambda_min, res.residual_min = res.bottom[0], res.residuals_bottom[0]

    for lab, M in zip(dense, extra_out[: len(dense)]):
        M = M.double().cpu()
        res = results[lab]
        res.method = "dense"
        if want_lam:
            theta = torch.linalg.eigvalsh((M + M.T) / 2).numpy()
            fill(res, theta, np.zeros_like(theta))
        if want_tr:
            res.trace, res.trace_stderr = float(M.diagonal().sum()), 0.0
            res.trace_method = "exact"
    nd = len(dense) + len(unit)
    for lab, M in zip(unit, extra_out[len(dense) : nd]):
        res = results[lab]
        res.trace, res.trace_stderr = float(M.double().diagonal().sum()), 0.0
        res.trace_method = "exact"
    if union is not None:
        Z, HZ = extra[nd][1], extra_out[nd]
        pairs = [(lab, Z[loc[lab]], HZ[loc[lab]]) for lab in hutch]
    else:
        pairs = [(lab, Z, HZ) for lab, HZ, (_, Z) in zip(hutch, extra_out[nd:], extra[nd:])]
    for lab, Z, HZ in pairs:
        samples = (Z.double() * HZ.double()).sum(0)
        res = results[lab]
        res.trace, res.trace_stderr = float(samples.mean()), standard_error(samples)
        res.trace_method = "hutchinson"
    for lab, run in zip(lanczos, runs):
        theta, _, resid = run.ritz()
        res = results[lab]
        res.method, res.steps = "lanczos", run.steps
        fill(res, theta, resid)
    return results


def layerwise_diagonal(
    H: Operator | Tensor,
    groups: Any = "module",
    num_matvecs: int = 100,
    method: str = "xdiag",
    seed: int = 0,
    block_size: int | None = None,
) -> dict[str, Tensor]:
    """The diagonal of ``H`` split by group: ``{label: diag(H)[group]}``, each a 1-D tensor of
    the group's entries in the order of its index ranges (for ``groups="parameter"``, reshape
    with the parameter's shape).

    The diagonal of a block ``H_gg`` is the diagonal of ``H`` on ``g``, so one
    :func:`~hessfast.algorithms.diagonal.diagonal` run over the whole operator serves every
    group; ``num_matvecs``, ``method``, ``seed`` and ``block_size`` are passed to it (its
    estimators' errors per entry are those of the whole-operator estimate). ``groups`` as in
    :func:`layerwise`.

    >>> import torch
    >>> from hessfast.algorithms.layerwise import layerwise_diagonal
    >>> A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    >>> out = layerwise_diagonal(A, groups={"a": [(0, 2)], "b": [(2, 5)]}, method="exact")
    >>> out["a"].tolist(), out["b"].tolist()
    ([1.0, 2.0], [3.0, 4.0, 5.0])
    """
    op = as_operator(H)
    groups_ = _resolve_groups(op, groups)
    d = diagonal(op, num_matvecs, method, seed, block_size).diagonal
    return {lab: d[_index(ranges).to(d.device)] for lab, ranges in groups_.items()}
