"""Partial reorthogonalisation of a (block, thick-restart) Lanczos basis: Simon's ω-recurrence.

Full reorthogonalisation reads the whole basis at every step (one GEMM pass over ``n`` vectors of
length ``P``), which on a CPU at ``P`` in the millions costs a large share of a Hessian-vector
product. In exact arithmetic the new Lanczos block is orthogonal to all but the last two blocks,
and in floating point it loses that orthogonality gradually (H. D. Simon, "The Lanczos algorithm
with partial reorthogonalization", Math. Comp. 42, 1984): the inner products ``ω = Vᵀ V − I``
obey a recurrence driven by the projected matrix ``T`` alone, so they can be *estimated* on the
host for free, and the older basis needs to be read only when the estimate crosses a threshold.

:class:`OmegaEstimate` keeps the estimate as a dense float64 matrix and updates it in matrix form,
which covers blocks and the arrow head of a thick restart alike. With ``H V = V T + Q R Eᵀ`` (each
column of ``T`` holding the coefficients the recurrence subtracted), the new block's components
along an older basis vector ``v_k`` satisfy

    ``Vᵀ W = T Ω[:, S] − Ω T[:, S]`` (rows ``k`` outside the local part),  ``Q = W R⁻¹``,

plus the rounding of this step's product and projections. That rounding is not modelled from
``eps`` alone: a float32 Hessian-vector product of a million-parameter model puts components of
about 1e-5 of its norm along the basis (measured), far above ``eps``. So the first steps after the
start *measure* it (``calibration`` full passes whose coefficients give the injected noise
``eta`` relative to the product's column norm) and every later step adds ``eta`` with the sign of
the estimate (Simon's and Larsen's convention, which keeps the estimate on the side of growth).

The rules (:meth:`OmegaEstimate.decide`): a step projects against the whole basis when the
estimate for the new block exceeds ``delta`` or when the previous step did (Simon: the two
newest vectors drive the recurrence, so both are cleaned); otherwise only against the last two
blocks. Each full pass compares the measured coefficients with the estimate: when the measured
loss exceeds ``4·max(estimate, delta)`` the estimate is unreliable for this operator and every
later step projects against the whole basis (``fallback``). When the measured noise alone is
above ``delta / 2`` partial reorthogonalisation cannot save anything and the fallback starts at
once.

>>> import torch
>>> om = OmegaEstimate(capacity=8, eps=2.0**-52, delta=1e-8)
>>> T = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
>>> T[0, 1] = T[1, 0] = T[1, 2] = T[2, 1] = 0.5
>>> X = om.estimate(T, s=2, e=3, lo=1, wcol=torch.ones(1, dtype=torch.float64))
>>> tuple(X.shape), bool(X.abs().max() < 1e-12)
((1, 1), True)
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

#: full passes at the start that measure the rounding noise the products put along the basis
CALIBRATION_STEPS = 3
#: after a projection the block is orthogonal to the vectors it was projected against to this
#: multiple of eps
FLOOR = 10.0
#: a full pass whose measured loss exceeds this multiple of max(estimate, delta) ends the estimate
UNRELIABLE = 4.0


class OmegaEstimate:
    """The estimated loss of orthogonality ``Ω ≈ Vᵀ V − I`` of a Lanczos basis of at most
    ``capacity`` vectors (float64, on the host), and the decisions it drives.

    ``eps``: unit roundoff of the basis dtype; ``delta``: the level of orthogonality to keep
    (a step reads the whole basis once the estimate exceeds it).

    Counters: ``full_passes`` (steps that read the whole basis), ``fallback`` (``None``, or the
    reason every step now reads it), ``noise`` (the measured ``eta``) and ``worst`` (the largest
    measured loss relative to the new block's norm).
    """

    def __init__(self, capacity: int, eps: float, delta: float):
        self.Om = torch.zeros(capacity, capacity, dtype=torch.float64)
        self.eps = float(eps)
        #: what a projection leaves along the vectors it projected against
        self.floor = FLOOR * float(eps)
        self.delta = float(delta)
        self.eta = float(eps)
        self.calibration = CALIBRATION_STEPS
        self.force = False
        self.fallback: str | None = None
        self.full_passes = 0
        self.worst = 0.0
        self._est = 0.0
        self._triggered = False

    @property
    def noise(self) -> float:
        return self.eta

    def estimate(self, T: Tensor, s: int, e: int, lo: int, wcol: Tensor) -> Tensor:
        """``Vt[:lo] @ W`` as the recurrence predicts it, ``[lo, b]`` float64, from ``T[:e, :e]``
        with the current block's local coefficients in ``T[:e, s:e]``; ``wcol`` ``[b]`` are the
        column norms of the product ``H V_S`` (the scale of this step's rounding)."""
        Om = self.Om
        X = T[:lo, :e] @ Om[:e, s:e] - Om[:lo, :e] @ T[:e, s:e]
        noise = self.eta * wcol.double().cpu()
        sign = torch.where(X < 0, -1.0, 1.0).to(torch.float64)
        return X + sign * noise

    def decide(self, X: Tensor | None, beta: Tensor) -> bool:
        """Whether this step projects the new block against the whole basis: ``X`` is
        :meth:`estimate` (``None``: no older basis), ``beta`` ``[b]`` the block's column norms
        after the local projection."""
        self._est, self._triggered = 0.0, False
        if X is None or X.numel() == 0:
            return False
        b = beta.double().cpu().clamp_min(1e-300)
        self._est = float((X.abs().amax(0) / b).max())
        if self.fallback is not None or self.calibration > 0 or self.force:
            return True
        self._triggered = self._est > self.delta
        return self._triggered

    def measured(self, c: Tensor, beta: Tensor, wcol: Tensor) -> None:
        """Record a full pass: ``c = Vt[:lo] @ W`` measured (before subtracting), ``beta`` the
        block's column norms after the local projection, ``wcol`` the product's column norms.
        Calibrates the noise on the first passes and detects an unreliable estimate."""
        self.full_passes += 1
        ca = c.abs().amax(0).double().cpu()
        loss = float((ca / beta.double().cpu().clamp_min(1e-300)).max())
        self.worst = max(self.worst, loss)
        if self.calibration > 0:
            self.calibration -= 1
            self.eta = max(self.eta, float((ca / wcol.double().cpu().clamp_min(1e-300)).max()))
            if self.fallback is None and self.eta > self.delta / 2:
                self.fallback = (
                    f"the products' rounding puts {self.eta:.2g} of their norm along the basis, "
                    f"above half the orthogonality level {self.delta:.2g}"
                )
        elif self._triggered and loss > UNRELIABLE * max(self._est, self.delta):
            self.fallback = (
                f"measured loss of orthogonality {loss:.2g} against an estimate of {self._est:.2g}"
            )

    def update(self, X: Tensor | None, R: Tensor, lo: int, e: int) -> None:
        """The new rows ``[e, e + bq)`` of the estimate after ``W = Q R`` (``R`` ``[bq, b]``;
        zero rows for fresh random directions, which were projected against everything):
        ``X R⁺`` along the rows ``[:lo]``, with ``X`` the estimate of ``Vt[:lo] @ W`` when the step
        did not read the older basis, or what the full pass left (``None``: it subtracted
        everything); rounding level (``floor``) elsewhere. A step whose estimate crossed
        ``delta`` makes the next step a full pass too."""
        Om, floor = self.Om, self.floor
        bq = R.shape[0]
        N = slice(e, e + bq)
        Om[:e, N] = floor
        if X is not None and lo > 0:
            Y = X @ torch.linalg.pinv(R)
            Om[:lo, N] = torch.where(Y.abs() < floor, floor, Y)
        Om[N, :e] = Om[:e, N].T
        Om[N, N] = floor
        Om[N, N].fill_diagonal_(0.0)
        self.force = self._triggered
        self._triggered = False

    def restart(self, e: int, Zk: Tensor, p: int, bq: int) -> None:
        """The basis was compressed to ``Vt[:p] = Zkᵀ Vt[:e]`` followed by the rows ``[e, e+bq)``
        moved to ``[p, p+bq)``: rotate the estimate alike (``Zkᵀ Ω Zk`` among the kept Ritz
        vectors, whose 2-norm cannot grow). A rotated estimate ``zᵢᵀ ω`` of the next block can
        cancel where the true inner products do not, so its entries are raised to the
        Cauchy-Schwarz bound ``|zᵢᵀ ω| ≤ ‖ω‖`` keeping the sign of the rotation."""
        Om = self.Om
        old, N = Om[:e, :e], Om[e : e + bq, :e]
        NN = Om[e : e + bq, e : e + bq].clone()
        rr = Zk.T @ old @ Zk
        qr = N @ Zk
        qr_bound = torch.linalg.vector_norm(N, dim=1, keepdim=True).clamp_min(self.floor)
        qr = torch.where(qr < 0, -1.0, 1.0) * torch.maximum(qr.abs(), qr_bound)
        Om.zero_()
        Om[:p, :p] = rr
        Om[:p, :p].fill_diagonal_(0.0)
        Om[p : p + bq, :p] = qr
        Om[:p, p : p + bq] = qr.T
        Om[p : p + bq, p : p + bq] = NN
        self.force = False


__all__ = ["OmegaEstimate", "CALIBRATION_STEPS", "UNRELIABLE"]
