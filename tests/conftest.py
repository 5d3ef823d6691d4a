import gc
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
    if os.environ.get("TRITON_INTERPRET") == "1":
        _patch_the_language_once_per_launch()
    # Under pytest-xdist (``-n auto``) the workers share the cores: each gets its share of torch
    # threads instead of all of them (tiny tensors gain nothing from more, and oversubscribed
    # threads spin against each other).
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def _patch_the_language_once_per_launch() -> None:
    """Triton's interpreter (3.x) patches ``triton.language`` for a kernel launch, then again at
    every call of a ``@triton.jit`` helper inside the kernel, for every program of the grid: an
    ``inspect.getmembers`` sweep of the language (2 ms) that finds it patched already, almost half
    of the interpreter tests' time. Here a helper's patch is skipped while a launch has patched the
    language modules the helper sees (the launch restores them when it ends, as before). Nothing
    changes where Triton's interpreter is not the one this was written against."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter as ti
    except Exception:
        return
    real_patch = getattr(ti, "_patch_lang", None)
    executor = getattr(ti, "GridExecutor", None)
    if real_patch is None or executor is None or not hasattr(ti, "_LangPatchScope"):
        return
    launch = executor.__call__
    patched: list[set[int]] = []  # the language modules patched by the launch running now

    def patch_lang(fn):
        langs = {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}
        if patched and langs and langs <= patched[-1]:
            return ti._LangPatchScope()  # nothing to restore: the launch restores its patches
        scope = real_patch(fn)
        if patched:
            patched[-1] |= langs
        return scope

    def call(self, *args, **kwargs):
        patched.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched.pop()

    ti._patch_lang = patch_lang
    executor.__call__ = call


def pytest_collection_modifyitems(items):
    """The ``slow`` tests first (a stable sort: the order is otherwise the files'): under
    pytest-xdist the workers start on the tests of seconds to tens of seconds and the short ones
    fill the end, instead of one long test (most live in ``tests/triton/``, collected last)
    running alone while the other worker idles."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_collection_finish(session):
    """Everything imported and collected so far lives for the whole session: frozen, the garbage
    collector skips it, so that a full collection (the benchmark's ``gc.collect`` between methods,
    Python's own generation-2 passes) scans what the tests create, not all of torch (a third of
    a second each, seconds in a test that runs a whole benchmark)."""
    gc.freeze()


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): as fast, and much faster on a busy machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def zoo_problem():
    """``zoo_problem(name)``: ``models.zoo.MODELS[name]()``, built once per test module and
    shared by its tests (which must leave the model as they found it), so that hessfast's
    captured programs and traced graphs, cached per model, are built once too."""
    from models import zoo

    built = {}

    def get(name):
        if name not in built:
            built[name] = zoo.MODELS[name]()
        return built[name]

    return get


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
def _no_selfchecks(monkeypatch):
    """Accelerated implementations run without their first-use self-check
    (``hessfast.dispatch.selfcheck``): it compares the kernel with the torch rule on a problem of
    the call's shape, which the kernel tests do against float64 oracles anyway, and under Triton's
    interpreter it costs more than the test itself. The tests of the self-checks
    (``tests/test_selfcheck.py``, the dispatch tests that read verdicts) turn them back on with
    ``monkeypatch.delenv("HESSFAST_SELFCHECK")``."""
    monkeypatch.setenv("HESSFAST_SELFCHECK", "0")


@pytest.fixture(autouse=True)
def _trace_at_once(monkeypatch):
    """The suite traces every product signature on its first product (users' default traces on
    the second, ``hessfast.traced.TRACE_AFTER``), so every correctness test runs the traced path
    and its check against the interpreter; ``tests/test_traced.py`` tests the default itself."""
    from hessfast import traced

    monkeypatch.setattr(traced, "TRACE_AFTER", 0)
