"""One case table per op family (``hessfast.selftest.CASES``) run for every backend: the torch
rule against the autograd float64 oracle, the Triton kernels (compiled on a GPU, else through
``TRITON_INTERPRET=1`` on the CPU) and the CUDA extension (its CPU twins and, on a GPU, its
kernels) against the float64 torch rule, in the four engine modes at each implementation's
declared tolerance. A case added to the table runs for all of them."""

import os

import pytest
import torch

import hessfast.cuda
from hessfast import selftest
from hessfast.rules import implementations, registered_rule

CASES = [case for cases in selftest.CASES.values() for case in cases]
IDS = [f"{c.family}:{c.name}" for c in CASES]


def _impl(case, backend):
    found = [i for i in implementations(case.op) if i.backend == backend]
    if not found:
        pytest.skip(f"no {backend} implementation of {case.op}")
    return found[0]


def _assert(verdict, what):
    if verdict.declined:  # e.g. gelu(tanh) where an implementation takes only the erf form
        pytest.skip(f"{what}: {verdict.describe()}")
    assert verdict.ok, f"{what}: {verdict.describe()}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_torch_rule_matches_the_oracle(case):
    ref = registered_rule(case.op)
    _assert(selftest.compare(ref, case, torch.float64, torch.device("cpu")), case.name)


def _triton_device():
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1")


#: Low-precision cases under the interpreter (each costs seconds there); all of them on a GPU.
_CHEAP = {"activation", "layer_norm", "cross_entropy_rows"}


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "case",
    # attention: tens of seconds a case in the interpreter
    [pytest.param(c, marks=pytest.mark.slow if c.family == "attention" else ()) for c in CASES],
    ids=IDS,
)
def test_triton_matches_the_torch_rule(case, dtype):
    pytest.importorskip("triton")
    dev = _triton_device()
    if dev.type == "cpu" and dtype != torch.float32 and case.family not in _CHEAP:
        pytest.skip("interpreter: float32 only for this family (low precision runs on a GPU)")
    if dev.type == "cpu" and dtype == torch.float16:
        pytest.skip("interpreter: bfloat16 stands for the 16-bit types")
    if dev.type == "cpu" and case.family == "attention" and "causal" not in case.name:
        # each case costs tens of seconds in the interpreter; the causal one takes the kernels'
        # masked path too, and tests/triton/test_attention.py runs the others' paths (GQA, masks,
        # Dv ≠ D) against the float64 oracle on smaller shapes
        pytest.skip("interpreter: the causal attention case only (test_attention.py has more)")
    impl = _impl(case, "triton")
    if impl.dtypes is not None and dtype not in impl.dtypes:
        pytest.skip(f"{impl.name} [triton] does not take {dtype}")
    _assert(selftest.compare(impl, case, dtype, dev), f"{impl.name} [triton] {case.name}")


@pytest.mark.cuda_ext
@pytest.mark.parametrize("dev", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_cuda_matches_the_torch_rule(case, dtype, dev):
    why = hessfast.cuda.unavailable()
    if why:
        pytest.skip(why)
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible to torch)")
    if dev == "cpu" and dtype != torch.float32:
        pytest.skip("the CPU twins: float32 (the header math); 16-bit types on the GPU")
    impl = _impl(case, "cuda")
    if impl.dtypes is not None and dtype not in impl.dtypes:
        pytest.skip(f"{impl.name} [cuda] does not take {dtype}")
    _assert(selftest.compare(impl, case, dtype, torch.device(dev)), f"{impl.name} [cuda]")


def test_case_table_covers_every_accelerated_op():
    """Every op with a Triton or CUDA implementation has a case (and so a self-check problem)."""
    covered = {c.op for c in CASES}
    accelerated = {
        op for op, impls in implementations().items() if any(i.backend != "torch" for i in impls)
    }
    assert accelerated <= covered, accelerated - covered
