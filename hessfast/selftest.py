"""Self-checks of the accelerated (Triton, CUDA) implementations against the torch rules.

No kernel of hessfast is trusted because it compiled: before automatic dispatch first hands an op to
an accelerated implementation on a ``(device, dtype)``, :func:`check_call` runs that implementation
and the torch reference on a small random problem shaped like the call (same op, head dims, class
count, flags; few rows; sizes that are not multiples of the tiles), in the four engine modes
(:data:`MODES`) with K = 2 tangents, and compares them (:func:`compare`). :mod:`hessfast.dispatch`
remembers the verdict for the process (see ``HESSFAST_SELFCHECK`` there).

:func:`selftest` (``hessfast selftest`` on the command line, ``hessfast.selftest()`` in Python: the module is
callable) does the same for every
implementation that can run here, on every op family's case table (:data:`CASES`), and prints one
row per (op, backend, dtype): the largest error, the tolerance, pass or fail, and the time against
the torch rule.

What "agrees" means. The reference is the torch rule in float64 on the CPU (the rules are exact to
``1e-10`` against autograd there: the float64 oracle). For every output (values, tangents,
cotangents, cotangent tangents) the error is ``max |a − b| / max |b|``; the implementation passes
when that is at most ``rtol + atol / max |b|`` from its declared ``tolerances[dtype]``, or, below
float64, at most twice the error of the torch rule itself run in the same dtype on the same device
(the kernels may not be asked to beat the precision of the dtype, e.g. under TF32 matmuls). An
exception, a NaN the reference does not have, or a missing output is a failure.

The checks call the implementation's class methods (``type(impl).fwd_jvp``), so instrumentation
patched onto an instance (the tests' call counters) does not count them.

>>> import torch
>>> from hessfast.selftest import CASES, case_for_call
>>> sorted(CASES)
['activation', 'attention', 'cross_entropy_rows', 'layer_norm', 'linear', 'rms_norm']
>>> case = case_for_call(torch.ops.aten.tanh.default, None)
>>> case.family, case.build()[1]
('activation', (True,))
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .rules.base import TORCH_TOLERANCES, Call, invoke

Tensor = torch.Tensor
aten = torch.ops.aten

#: The engine modes a check runs: ``hvp`` (ḡ and ġ), ``hvp-second-order-only`` (ġ absent: a
#: loss with a zero Hessian), ``ggn`` (ḡ absent), ``grad`` (no tangents).
MODES = ("hvp", "hvp-second-order-only", "ggn", "grad")
#: Tangents per check (K > 1: the K axis is exercised).
K = 2
#: Seed of the random problems (fixed: a check is reproducible).
SEED = 1729

ACTIVATIONS = {
    aten.relu.default: "relu",
    aten.gelu.default: "gelu",
    aten.silu.default: "silu",
    aten.tanh.default: "tanh",
    aten.sigmoid.default: "sigmoid",
    aten.hardswish.default: "hardswish",
}


def _rows_op():
    from .rules.cross_entropy import ROWS_OP

    return ROWS_OP


@dataclass
class Case:
    """A small problem of one op family: ``build()`` returns float64 CPU ``(args, active)`` in
    the op's schema order (fresh random values each time, from :data:`SEED`); ``key`` says what
    of the call it keeps (a check's verdict is remembered per key)."""

    family: str
    op: Any
    name: str
    build: Callable[[], tuple[tuple, tuple]]
    key: tuple = ()


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


def _randn(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64)


def _tile_size(n: int, cap: int) -> int:
    """``n``, or ``cap`` (chosen not a multiple of any tile) when ``n`` is larger."""
    return n if n <= cap else cap


# ---- case makers, one per op family: from a call (its shapes and flags) or from defaults -------


def _activation(op: Any, call: Call | None, approximate: str = "none") -> Case:
    extra = ()
    if op is aten.gelu.default:
        extra = (call.args[1] if call is not None else approximate,)

    def build():
        x = _randn(_gen(), 3, 347)  # 1041 elements: one full 1024 block and a masked tail
        return (x, *extra), (True, *(False for _ in extra))

    name = ACTIVATIONS.get(op, str(op))
    return Case("activation", op, f"{name}{'(' + extra[0] + ')' if extra else ''}", build, extra)


def _norm(op: Any, call: Call | None, *, shape=(37,), weight=True, bias=True) -> Case:
    rms = op is aten.rms_norm.default
    if call is not None:
        shape = tuple(int(s) for s in call.args[1])
        weight = call.args[2] is not None
        bias = False if rms else call.args[3] is not None
        eps = call.args[3] if rms else call.args[4]
    else:
        eps = None if rms else 1e-5
    act = call.active if call is not None else None

    def build():
        gen = _gen()
        x = _randn(gen, 13, *shape)
        w = 1 + 0.1 * _randn(gen, *shape) if weight else None
        b = 0.1 * _randn(gen, *shape) if bias else None
        if rms:
            args = (x, list(shape), w, eps)
            active = (True, False, w is not None, False)
        else:
            args = (x, list(shape), w, b, eps, False)
            active = (True, False, w is not None, b is not None, False, False)
        if act is not None:
            active = tuple(bool(a) and bool(c) for a, c in zip(active, act))
            if not any(active):
                active = (True, *active[1:])
        return args, active

    family = "rms_norm" if rms else "layer_norm"
    name = f"{family} {list(shape)}{'' if weight else ' no weight'}{' +bias' if bias else ''}"
    return Case(family, op, name, build, (shape, weight, bias, eps))


def _linear(call: Call | None, *, n_in=67, n_out=45, bias=True) -> Case:
    op = aten.linear.default
    if call is not None:
        w = call.args[1]
        n_out, n_in = _tile_size(int(w.shape[0]), 67), _tile_size(int(w.shape[1]), 71)
        bias = call.args[2] is not None
    act = call.active if call is not None else (True, True, bias)

    def build():
        gen = _gen()
        x = _randn(gen, 37, n_in)
        w = _randn(gen, n_out, n_in) / math.sqrt(n_in)
        b = _randn(gen, n_out) if bias else None
        active = (bool(act[0]), bool(act[1]), bias and bool(act[2]))
        if not any(active):
            active = (True, True, bias)
        return (x, w, b), active

    return Case(
        "linear",
        op,
        f"linear {n_in}->{n_out}{' +bias' if bias else ''}",
        build,
        (n_in, n_out, bias),
    )


def _attention(
    call: Call | None,
    *,
    heads=2,
    kv_heads=2,
    d=16,
    dv=16,
    tq=37,
    tk=37,
    causal=False,
    mask: str | None = None,
    gqa=False,
) -> Case:
    op = aten.scaled_dot_product_attention.default
    scale = None
    act = (True, True, True)
    if call is not None:
        q, k, v, m, _p, causal, scale, gqa = call.args
        hq = q.shape[-3] if q.dim() >= 3 else 1
        hk = k.shape[-3] if k.dim() >= 3 else 1
        groups = max(1, hq // max(hk, 1))
        kv_heads = min(hk, 2)
        heads = kv_heads * min(groups, 2) if gqa else kv_heads
        d, dv = int(q.shape[-1]), int(v.shape[-1])
        tq, tk = (37, 37) if q.shape[-2] == k.shape[-2] else (37, 45)
        mask = None if m is None else ("bool" if m.dtype == torch.bool else "float")
        act = tuple(bool(a) for a in call.active[:3])
        if not any(act):
            act = (True, True, True)

    def build():
        gen = _gen()
        qq = _randn(gen, 2, heads, tq, d)
        kk = _randn(gen, 2, kv_heads, tk, d)
        vv = _randn(gen, 2, kv_heads, tk, dv)
        mm = None
        if mask == "bool":
            mm = torch.rand((tq, tk), generator=gen, dtype=torch.float64) > 0.3
            mm[:, 0] = True
        elif mask == "float":
            mm = _randn(gen, tq, tk)
        return (qq, kk, vv, mm, 0.0, bool(causal), scale, bool(gqa)), (
            *act,
            False,
            False,
            False,
            False,
            False,
        )

    name = (
        f"sdpa h{heads}/{kv_heads} d{d}{'' if dv == d else f'/{dv}'} t{tq}x{tk}"
        f"{' causal' if causal else ''}{f' {mask} mask' if mask else ''}"
    )
    return Case(
        "attention", op, name, build, (heads, kv_heads, d, dv, tq, tk, causal, mask, gqa, scale)
    )


def _rows(call: Call | None, *, v=4099, weight=False, smoothing=0.0, ignore_index=-100) -> Case:
    op = _rows_op()
    if call is not None:
        z, _zd, _t, w, ignore_index, smoothing = call.args[:6]
        v = _tile_size(int(z.shape[1]), 4099)  # 4099 > the largest tile (4096): a masked tail
        weight = w is not None

    def build():
        gen = _gen()
        z = 3 * _randn(gen, 7, v)
        target = torch.randint(0, v, (7,), generator=gen)
        target[2] = ignore_index
        w = torch.rand((v,), generator=gen, dtype=torch.float64) + 0.5 if weight else None
        return (z, None, target, w, int(ignore_index), float(smoothing), 1.0, True), ()

    name = f"ce rows V={v}{' weighted' if weight else ''}{f' eps={smoothing}' if smoothing else ''}"
    return Case(
        "cross_entropy_rows", op, name, build, (v, weight, float(smoothing), int(ignore_index))
    )


def _generic(op: Any, call: Call) -> Case | None:
    """A problem of the call's own shapes with fresh values: ops without a case maker (a new
    implementation, a test's fake), when every tensor is small and readable."""
    tensors = [t for t in _flat(call.args) if isinstance(t, Tensor)]
    if sum(t.numel() for t in tensors) > 1 << 16:
        return None
    if any(not t.is_floating_point() and _is_fake(t) for t in tensors):
        return None  # integer values of a traced call cannot be read

    def build():
        gen = _gen()

        def fresh(a):
            if isinstance(a, Tensor):
                if a.is_floating_point():
                    return _randn(gen, *a.shape)
                return a.detach().cpu().clone()
            if isinstance(a, (list, tuple)) and any(isinstance(x, Tensor) for x in a):
                return type(a)(fresh(x) for x in a)
            return a

        return tuple(fresh(a) for a in call.args), tuple(call.active)

    key = tuple((tuple(t.shape), t.is_floating_point()) for t in tensors)
    return Case("other", op, str(op), build, key)


def _flat(xs):
    for x in xs:
        if isinstance(x, (list, tuple)):
            yield from _flat(x)
        else:
            yield x


def _is_fake(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def case_for_call(op: Any, call: Call | None) -> Case | None:
    """The self-check problem for ``op`` shaped like ``call`` (``None``: the family's default);
    ``None`` when no small problem can be built."""
    if op in ACTIVATIONS:
        return _activation(op, call)
    if op in (aten.layer_norm.default, aten.rms_norm.default):
        return _norm(op, call)
    if op is aten.linear.default:
        return _linear(call)
    if op is aten.scaled_dot_product_attention.default:
        return _attention(call)
    if op == _rows_op():
        return _rows(call)
    if call is None:
        return None
    return _generic(op, call)


def _cases() -> dict[str, list[Case]]:
    """The case table per op family (:data:`CASES`): defaults plus the variants each kernel
    branches on."""
    ln, rms = aten.layer_norm.default, aten.rms_norm.default
    return {
        "activation": [
            *(_activation(op, None) for op in ACTIVATIONS),
            _activation(aten.gelu.default, None, approximate="tanh"),
        ],
        "layer_norm": [
            _norm(ln, None),
            _norm(ln, None, shape=(5, 23), bias=False),
            _norm(ln, None, shape=(300,), weight=False, bias=False),
        ],
        "rms_norm": [_norm(rms, None, bias=False), _norm(rms, None, shape=(300,), bias=False)],
        "linear": [_linear(None), _linear(None, n_in=33, n_out=17, bias=False)],
        "attention": [
            _attention(None),
            _attention(None, causal=True, tq=45, tk=45),
            _attention(None, heads=4, kv_heads=2, gqa=True, d=64, dv=32, tq=29, tk=41),
            _attention(None, mask="bool", tq=29, tk=41),
            _attention(None, mask="float", d=128, dv=128, tq=21, tk=21),
        ],
        "cross_entropy_rows": [
            _rows(None),
            _rows(None, v=37, weight=True, smoothing=0.1, ignore_index=5),
        ],
    }


#: ``{family: [Case, ...]}``: the one case table per op family that ``hessfast selftest`` and the
#: tests of every backend (torch, Triton, CUDA; ``tests/test_selftest.py``) run.
CASES: dict[str, list[Case]] = _cases()


# ---- running an implementation on a case --------------------------------------------------------


def _floats(y):
    if isinstance(y, (tuple, list)):
        return [t if isinstance(t, Tensor) and t.is_floating_point() else None for t in y]
    return [y]


def _slots(active) -> list[int]:
    return [i for i, a in enumerate(active) if a]


@dataclass
class _Draw:
    """The random inputs of one case: float64 CPU args, tangents, cotangents and their tangents."""

    op: Any
    args: tuple
    active: tuple
    tans: dict
    gbar: list
    gdot: list


def draw(case: Case, k: int = K) -> _Draw:
    args, active = case.build()
    gen = torch.Generator().manual_seed(SEED + 1)  # not the args' draw: ẋ = x is degenerate
    if case.op == _rows_op():
        z = args[0]
        zd = torch.randn((k, *z.shape), generator=gen, dtype=torch.float64)
        return _Draw(case.op, args, active, {1: zd}, [], [])
    outs = _floats(invoke(case.op, args))
    tans = {
        i: torch.randn((k, *args[i].shape), generator=gen, dtype=torch.float64)
        for i in _slots(active)
    }
    gbar = [
        None if o is None else torch.randn(o.shape, generator=gen, dtype=torch.float64)
        for o in outs
    ]
    gdot = [
        None if o is None else torch.randn((k, *o.shape), generator=gen, dtype=torch.float64)
        for o in outs
    ]
    return _Draw(case.op, args, active, tans, gbar, gdot)


def _cast(t, device, dtype):
    if isinstance(t, Tensor):
        if t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device)
    if isinstance(t, list) and any(isinstance(x, Tensor) for x in t):
        return [_cast(x, device, dtype) for x in t]
    return t


def _back(t):
    return None if t is None else t.detach().to("cpu", torch.float64)


def run(impl: Any, d: _Draw, mode: str, dtype: torch.dtype, device: torch.device) -> list:
    """``[(label, tensor or None)]``: every output of ``impl`` on draw ``d`` in ``mode``, cast to
    ``dtype`` on ``device`` and back to float64 on the CPU."""
    cls = type(impl)
    if d.op == _rows_op():
        z, _, target, w, ignore, eps, scale, _ = d.args
        zd = None if mode == "grad" else _cast(d.tans[1], device, dtype)
        want_grad = mode != "ggn"
        loss, gz, gdz = cls.rows(
            impl,
            _cast(z, device, dtype),
            zd,
            target.to(device),
            _cast(w, device, dtype) if w is not None else None,
            ignore,
            eps,
            scale,
            want_grad,
        )
        out = [("loss rows", _back(loss))]
        if want_grad:
            out.append(("gradient", _back(gz)))
        if zd is not None:
            out.append(("Hessian rows", _back(gdz)))
        return out
    k = 0 if mode == "grad" else K
    cargs = tuple(_cast(a, device, dtype) for a in d.args)
    ctans = tuple(
        _cast(d.tans[i], device, dtype) if (k and i in d.tans) else None for i in range(len(d.args))
    )
    call = Call(d.op, cargs, tuple(d.active), ctans, k)
    y, ydot, res = cls.fwd_jvp(impl, call)
    outs = _floats(y)
    keep = [j for j, o in enumerate(outs) if o is not None]
    multi = isinstance(y, (tuple, list))

    def pack(xs):
        return tuple(xs) if multi else xs[0]

    g_in = None if mode == "ggn" else pack([_cast(g, device, dtype) for g in d.gbar])
    gd_in = (
        None
        if mode in ("grad", "hvp-second-order-only")
        else pack([_cast(g, device, dtype) for g in d.gdot])
    )
    gx, gdx = cls.bwd_jvp(impl, res, g_in, gd_in)
    out = [(f"output {j}", _back(outs[j])) for j in keep]
    if k:
        yd = list(ydot) if multi else [ydot]
        out += [(f"output tangent {j}", _back(yd[j]) if yd[j] is not None else None) for j in keep]
    for i in _slots(d.active):
        if mode != "ggn":
            out.append((f"cotangent of arg {i}", _back(gx[i])))
        if k:
            out.append((f"cotangent tangent of arg {i}", _back(gdx[i])))
    return out


def oracle(d: _Draw, mode: str) -> list:
    """The float64 oracle of :func:`run` (same labels), by autograd on the op itself: the
    tangents by ``torch.func.jvp``, the cotangents by one VJP and their tangents by double
    backward (``ġ_x = Jᵀ ġ + ∇_x⟨ḡ, J ẋ⟩``); for the cross-entropy rows, autograd through
    ``F.cross_entropy(reduction="none")``. Independent of every rule."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):  # the fused CPU kernels have no forward AD
        return _oracle(d, mode)


def _oracle(d: _Draw, mode: str) -> list:
    from torch.func import jvp

    if d.op == _rows_op():
        z, _, target, w, ignore, eps, scale, _ = d.args

        def rows(zz):
            return scale * torch.nn.functional.cross_entropy(
                zz, target, weight=w, ignore_index=ignore, reduction="none", label_smoothing=eps
            )

        out = [("loss rows", rows(z))]
        zr = z.clone().requires_grad_(True)
        with torch.enable_grad():
            g = torch.autograd.grad(rows(zr).sum(), zr, create_graph=True)[0]
            if mode != "ggn":
                out.append(("gradient", g.detach()))
            if mode != "grad":
                hv = [torch.autograd.grad(g, zr, u, retain_graph=True)[0] for u in d.tans[1]]
                out.append(("Hessian rows", torch.stack(hv)))
        return out
    slots = _slots(d.active)
    k = 0 if mode == "grad" else K

    def f(*zs):
        new = list(d.args)
        for i, z in zip(slots, zs):
            new[i] = z
        return _floats(invoke(d.op, new))

    xs = [d.args[i] for i in slots]
    ys = f(*xs)
    keep = [j for j, y in enumerate(ys) if y is not None]
    out = [(f"output {j}", ys[j]) for j in keep]
    if k:
        per = [
            jvp(
                lambda *zs: tuple(f(*zs)[j] for j in keep),
                tuple(xs),
                tuple(d.tans[i][kk] for i in slots),
            )[1]
            for kk in range(k)
        ]
        out += [
            (f"output tangent {j}", torch.stack([p[n] for p in per])) for n, j in enumerate(keep)
        ]
    xr = [x.detach().clone().requires_grad_(True) for x in xs]
    with torch.enable_grad():
        yo = [f(*xr)[j] for j in keep]
        vj = torch.autograd.grad(
            yo, xr, [d.gbar[j] for j in keep], create_graph=True, allow_unused=True
        )
        firsts, seconds = [], []
        for kk in range(k):
            first = [None] * len(xr)
            if mode in ("hvp", "ggn"):
                first = torch.autograd.grad(
                    yo, xr, [d.gdot[j][kk] for j in keep], retain_graph=True, allow_unused=True
                )
            second = [None] * len(xr)
            if mode.startswith("hvp"):
                terms = [
                    (v * d.tans[i][kk]).sum()
                    for v, i in zip(vj, slots)
                    if v is not None and v.requires_grad
                ]
                if terms:
                    second = torch.autograd.grad(
                        sum(terms), xr, retain_graph=True, allow_unused=True
                    )
            firsts.append(first)
            seconds.append(second)
    for n, i in enumerate(slots):
        if mode != "ggn":
            out.append((f"cotangent of arg {i}", None if vj[n] is None else vj[n].detach()))
        if k:
            rows = []
            for kk in range(k):
                want = torch.zeros_like(xs[n])
                for part in (firsts[kk][n], seconds[kk][n]):
                    if part is not None:
                        want = want + part.detach()
                rows.append(want)
            out.append((f"cotangent tangent of arg {i}", torch.stack(rows)))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Verdict:
    """One check's outcome: ``ok``; the error closest to its limit (relative to the limit), that
    limit, and where it was; the
    error of the torch rule in the same dtype; seconds of the implementation and of the torch
    rule (all modes); ``error``: an exception or a disagreement, in words."""

    ok: bool
    max_error: float = 0.0
    tolerance: float = 0.0
    worst: str = ""
    torch_error: float | None = None
    seconds: float | None = None
    torch_seconds: float | None = None
    error: str | None = None
    details: dict = field(default_factory=dict)
    declined: bool = False  # the implementation declines the problem: nothing was checked

    def describe(self) -> str:
        if self.ok:
            return f"passed (max error {self.max_error:.2e} <= {self.tolerance:.2e})"
        if self.error:
            return self.error
        return f"max error {self.max_error:.2e} > tolerance {self.tolerance:.2e} at {self.worst}"


def _err(a: Tensor | None, b: Tensor | None) -> tuple[float, float]:
    """``(max |a − b| / max |b|, max |b|)``; ``inf`` for a NaN or Inf the reference lacks."""
    if a is None and b is None:
        return 0.0, 0.0
    if b is None:
        b = torch.zeros_like(a)
    if a is None:
        a = torch.zeros_like(b)
    if a.shape != b.shape:
        return math.inf, 0.0
    bad_a, bad_b = ~torch.isfinite(a), ~torch.isfinite(b)
    if bool((bad_a & ~bad_b).any()):
        return math.inf, 0.0
    fin = ~bad_b
    a, b = a[fin], b[fin]
    if b.numel() == 0:
        return 0.0, 0.0
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / max(scale, 1e-30), scale


def compare(
    impl: Any, case: Case, dtype: torch.dtype, device: torch.device, *, timing=False
) -> Verdict:
    """Run ``impl`` and the torch reference on ``case`` in every mode and compare (see the module
    docstring). Never raises for a failing implementation: the exception is the verdict."""
    from .rules import registered_rule

    ref = registered_rule(case.op)
    rtol, atol = (getattr(impl, "tolerances", None) or TORCH_TOLERANCES).get(
        dtype, TORCH_TOLERANCES.get(dtype, (1e-2, 1e-2))
    )
    try:
        d = draw(case)
        if impl is not ref:
            call = _probe_call(d, dtype, device)
            why = list(impl.not_supported_reasons(call)) if call is not None else []
            if why:
                return Verdict(
                    False,
                    error=f"declines its own self-check problem ({'; '.join(why)})",
                    declined=True,
                )
    except Exception as e:  # noqa: BLE001 - a broken case maker is a failed check, in words
        return Verdict(False, error=f"could not build the problem ({type(e).__name__}: {e})")
    modes = ("hvp", "ggn", "grad") if case.op == _rows_op() else MODES
    worst = (0.0, "", 0.0, None)  # (error / limit, where, error, torch error)
    limit_at_worst = rtol + atol
    t_impl = t_ref = 0.0
    details = {}
    cpu = torch.device("cpu")
    with torch.no_grad():
        for mode in modes:
            try:
                want = oracle(d, mode) if impl is ref else run(ref, d, mode, torch.float64, cpu)
                low = dtype != torch.float64
                same = run(ref, d, mode, dtype, device) if low else None
                got = run(impl, d, mode, dtype, device)
            except Exception as e:  # noqa: BLE001 - the exception is the verdict
                msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
                return Verdict(False, error=f"{mode}: {type(e).__name__}: {msg}")
            if len(got) != len(want) or [w for w, _ in got] != [w for w, _ in want]:
                return Verdict(
                    False,
                    error=f"{mode}: outputs {[w for w, _ in got]} where the reference has "
                    f"{[w for w, _ in want]}",
                )
            for j, ((what, a), (_, b)) in enumerate(zip(got, want)):
                e, scale = _err(a, b)
                limit = rtol + atol / max(scale, 1e-30)
                te = None
                if same is not None:
                    te = _err(same[j][1], b)[0]
                    limit = max(limit, 2 * te)
                details[f"{mode}: {what}"] = e
                ratio = e / limit if limit > 0 else math.inf
                if ratio >= worst[0]:
                    worst = (ratio, f"{mode}: {what}", e, te)
                    limit_at_worst = limit
    ok = worst[0] <= 1.0
    if timing and ok and impl is not ref:  # warm runs (the checks compiled every kernel)
        t_impl, t_ref = _time(impl, d, modes, dtype, device), _time(ref, d, modes, dtype, device)
    return Verdict(
        ok,
        max_error=worst[2],
        tolerance=limit_at_worst,
        worst=worst[1],
        torch_error=worst[3],
        seconds=t_impl,
        torch_seconds=t_ref if timing and t_ref else None,
        details=details,
    )


def _time(impl: Any, d: _Draw, modes: tuple, dtype: torch.dtype, device: torch.device) -> float:
    """Seconds of one run of every mode (the best of three), device synchronised."""
    best = math.inf
    with torch.no_grad():
        for _ in range(3):
            _sync(device)
            t0 = time.perf_counter()
            for mode in modes:
                run(impl, d, mode, dtype, device)
            _sync(device)
            best = min(best, time.perf_counter() - t0)
    return best


def _probe_call(d: _Draw, dtype, device) -> Call | None:
    """The call an implementation sees in mode ``hvp`` (for its ``not_supported_reasons``)."""
    if d.op == _rows_op():
        z, _, target, w, ignore, eps, scale, want = d.args
        args = (
            _cast(z, device, dtype),
            _cast(d.tans[1], device, dtype),
            target.to(device),
            _cast(w, device, dtype) if w is not None else None,
            ignore,
            eps,
            scale,
            want,
        )
        return Call(d.op, args, (), (), K)
    cargs = tuple(_cast(a, device, dtype) for a in d.args)
    ctans = tuple(
        _cast(d.tans[i], device, dtype) if i in d.tans else None for i in range(len(d.args))
    )
    return Call(d.op, cargs, tuple(d.active), ctans, K)


@contextlib.contextmanager
def real_tensors():
    """Run real (not fake, not traced) tensor code inside a ``make_fx`` trace: the dispatch
    modes of the trace are suspended meanwhile."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        yield


def check_call(impl: Any, call: Call, device: torch.device, dtype: torch.dtype) -> Verdict:
    """The self-check of ``impl`` for a call like ``call`` (see :mod:`hessfast.dispatch`)."""
    case = case_for_call(call.op if call.op is not None else impl.ops[0], call)
    if case is None:
        return Verdict(
            False, error=f"no small self-check problem can be built for {call.op}", declined=True
        )
    with real_tensors():
        return compare(impl, case, dtype, device)


def case_key(op: Any, call: Call) -> tuple:
    """What of ``call`` a self-check verdict is remembered by (beyond implementation, device and
    dtype)."""
    case = case_for_call(op, call)
    return ("unbuildable",) if case is None else (case.family, case.name, case.key)


# ---- hessfast selftest ----------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the self-test table."""

    family: str
    case: str
    implementation: str
    backend: str
    dtype: str
    device: str
    verdict: Verdict | None  # None: skipped
    skipped: str | None = None

    @property
    def status(self) -> str:
        if self.verdict is None:
            return "skip"
        return "pass" if self.verdict.ok else "FAIL"


def _devices(device: str | None) -> list[torch.device]:
    if device is not None:
        return [torch.device(device)]
    out = [torch.device("cpu")]
    if torch.cuda.is_available():
        out.append(torch.device("cuda", torch.cuda.current_device()))
    return out


def _runnable(impl: Any, device: torch.device) -> str | None:
    """Why ``impl`` cannot run on ``device`` here (``None``: it can)."""
    from .dispatch import interpreting

    why = impl.unavailable()
    if why:
        return why
    if impl.devices is not None and device.type not in impl.devices:
        if (
            impl.backend == "triton"
            and device.type == "cpu"
            and interpreting()
            and impl.interpretable()
        ):
            return None
        if impl.backend == "cuda" and device.type == "cpu":
            return None  # the CPU twins of the CUDA ops (the header math)
        return f"runs on {' or '.join(impl.devices)}"
    if device.type == "cuda" and hasattr(impl, "device_reasons"):
        why = impl.device_reasons(device)
        if why:
            return "; ".join(why)
    return None


def selftest(
    *,
    device: str | None = None,
    dtypes: list[torch.dtype] | None = None,
    families: list[str] | None = None,
    backends: list[str] | None = None,
    include_torch: bool = True,
    stream: Any = None,
) -> list[Row]:
    """Check every implementation that can run here on every op family's cases (:data:`CASES`)
    against the float64 torch reference, print the table to ``stream`` (default: stdout; ``False``
    prints nothing) and return its rows. ``device``: one device (default: the CPU and, when
    present, the current GPU); ``dtypes``: default float32, bfloat16, float16 (and float64 for the
    torch rules); ``families``/``backends`` restrict the run. The torch rules themselves are
    checked in float64 (against the same oracle, so a rule that broke shows as well).

    >>> import hessfast
    >>> rows = hessfast.selftest(device="cpu", families=["activation"], backends=["torch"],
    ...                          dtypes=[torch.float64], stream=False)
    >>> sorted({r.status for r in rows})
    ['pass']
    """
    from .rules import implementations, registered_rule

    if stream is None:
        stream = sys.stdout
    want_dtypes = dtypes or [torch.float32, torch.bfloat16, torch.float16]
    rows: list[Row] = []
    for dev in _devices(device):
        for family, cases in CASES.items():
            if families and family not in families:
                continue
            for case in cases:
                impls = list(implementations(case.op))
                ref = registered_rule(case.op)
                for impl in impls:
                    if backends and impl.backend not in backends:
                        continue
                    if impl is ref:
                        if not include_torch:
                            continue
                        kinds = [torch.float64] if dtypes is None else want_dtypes
                    else:
                        kinds = [t for t in want_dtypes if impl.dtypes is None or t in impl.dtypes]
                    why = None if impl is ref else _runnable(impl, dev)
                    for dt in kinds:
                        row = Row(
                            family,
                            case.name,
                            impl.name,
                            impl.backend,
                            str(dt).replace("torch.", ""),
                            str(dev),
                            None,
                            why,
                        )
                        if why is None:
                            row.verdict = compare(impl, case, dt, dev, timing=True)
                            if row.verdict.declined:
                                row.verdict, row.skipped = None, row.verdict.error
                        rows.append(row)
    if stream:
        print(format_table(rows), file=stream)
    return rows


def format_table(rows: list[Row]) -> str:
    """The self-test table (Markdown): one row per (case, implementation, dtype, device)."""
    lines = [
        "| op family | case | backend | dtype | device | max error | tolerance | result | "
        "speed-up over torch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        v = r.verdict
        if v is None:
            lines.append(
                f"| {r.family} | {r.case} | {r.backend} | {r.dtype} | {r.device} | | | skip: "
                f"{(r.skipped or '')[:80]} | |"
            )
            continue
        if v.error:
            err, tol = "—", "—"
            res = f"FAIL: {v.error[:120]}"
        else:
            err, tol = f"{v.max_error:.1e}", f"{v.tolerance:.1e}"
            res = "pass" if v.ok else f"FAIL at {v.worst}"
        speed = ""
        if v.seconds and v.torch_seconds:
            speed = f"{v.torch_seconds / v.seconds:.2f}×"
        lines.append(
            f"| {r.family} | {r.case} | {r.backend} | {r.dtype} | {r.device} | {err} | {tol} | "
            f"{res} | {speed} |"
        )
    failed = sum(r.status == "FAIL" for r in rows)
    passed = sum(r.status == "pass" for r in rows)
    skipped = sum(r.status == "skip" for r in rows)
    lines.append("")
    lines.append(f"{passed} passed, {failed} failed, {skipped} skipped")
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "selftest",
        help="check every kernel that can run here against the torch rules (exit 1 on a failure)",
        description="Run every implementation of every op family that can run in this process "
        "(CUDA, Triton, torch) on small random problems in the four engine modes and compare it "
        "with the float64 torch reference at its declared tolerance. Prints one row per op, "
        "backend and dtype; exits 1 when any check fails.",
    )
    p.add_argument("--device", default=None, help="one device (default: cpu and the current GPU)")
    p.add_argument(
        "--dtype",
        action="append",
        choices=["float32", "bfloat16", "float16", "float64"],
        help="dtypes to check (repeatable; default float32, bfloat16, float16)",
    )
    p.add_argument("--family", action="append", help="op families (repeatable; default: all)")
    p.add_argument(
        "--backend",
        action="append",
        choices=["cuda", "triton", "torch"],
        help="backends (repeatable; default: all that can run)",
    )


def main(args: Any) -> int:
    dtypes = [getattr(torch, d) for d in args.dtype] if args.dtype else None
    if args.family:
        unknown = [f for f in args.family if f not in CASES]
        if unknown:
            raise SystemExit(f"--family {unknown[0]}: choose from {', '.join(CASES)}")
    rows = selftest(device=args.device, dtypes=dtypes, families=args.family, backends=args.backend)
    return 1 if any(r.status == "FAIL" for r in rows) else 0


class _CallableModule(types.ModuleType):
    """``hessfast.selftest`` is this module and, called, :func:`selftest`."""

    def __call__(self, **kwargs: Any) -> list[Row]:
        return selftest(**kwargs)


sys.modules[__name__].__class__ = _CallableModule
