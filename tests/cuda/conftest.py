"""Fixtures of the CUDA-extension tests.

Every op of ``hessfast._C`` has a CPU implementation over the same host/device header math as its
CUDA kernel (``csrc/cpu.cpp``), so the tests run twice: ``cpu`` (the header math and the Python
wrappers, on any machine where the extension is built) and ``cuda`` (the kernels, skipped without a
GPU). Without the extension every test here is skipped with the reason and the command that builds
it, except the build tests (``test_build.py``), which then fail when ``HESSFAST_BUILD_CUDA=1`` (CI).
"""

import copy

import pytest
import torch

import hessfast.cuda


@pytest.fixture
def ext():
    """The extension is loaded (``torch.ops.hessfast.*`` registered); skip with the reason if not."""
    why = hessfast.cuda.unavailable()
    if why:
        pytest.skip(why)


@pytest.fixture(params=["cpu", "cuda"])
def dev(request, ext):
    """Where the ops run: the CPU implementations (the header math), then the GPU if present."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible to torch)")
    return torch.device(request.param)


@pytest.fixture
def gpu(ext):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible to torch)")
    return torch.device("cuda")


def with_float64(impl):
    """``impl`` with a float64 tolerance, for the CPU implementations' float64 path (the CUDA
    kernels take float32, bfloat16 and float16 only)."""
    probe = copy.copy(impl)
    probe.tolerances = {**impl.tolerances, torch.float64: (1e-10, 1e-12)}
    return probe


@pytest.fixture
def float64_probe():
    return with_float64
