import os
import sys

import pytest
import torch

# Test helpers import by name: ``oracle``, ``models.zoo``, ``kernels.harness`` from here and the
# rule tests' ``harness`` from ``rules/`` (pytest runs with --import-mode=importlib, so test files
# in different folders may share a basename: rules/, triton/ and cuda/ each have test_<op>.py).
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.join(os.path.dirname(__file__), "rules"))


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "triton: a Triton kernel test; without a GPU it runs through TRITON_INTERPRET=1 on the CPU",
    )
    config.addinivalue_line("markers", "cuda_ext: needs the built hessfast._C extension")
    # Before any of hessfast's Triton kernels is imported (collection imports them): without a GPU
    # the Triton tests run in Triton's interpreter. Automatic dispatch never picks the interpreter,
    # so every other test is unaffected.
    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device():
    """Tests run on the CPU; GPU-only tests ask for ``cuda_device`` instead."""
    return torch.device("cpu")


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible to torch)")
    return torch.device("cuda")


@pytest.fixture
def kernel_device():
    """Where Triton kernels run: the GPU if there is one, else the CPU through the interpreter."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    pytest.skip("needs a CUDA GPU or TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _trace_at_once(monkeypatch):
    """The suite traces every product signature on its first product (users' default traces on
    the second, ``hessfast.traced.TRACE_AFTER``), so every correctness test runs the traced path
    and its check against the interpreter; ``tests/test_traced.py`` tests the default itself."""
    from hessfast import traced

    monkeypatch.setattr(traced, "TRACE_AFTER", 0)
