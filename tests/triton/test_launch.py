"""Launch-time crashes that neither the interpreter nor the CPU twins show (audit of issue 17):
every Triton launch on the tensors' device, grids within CUDA's limits. Runs without a GPU; the
multi-GPU test needs two."""

import ast
import pathlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hessfast

pytestmark = pytest.mark.triton

ta = pytest.importorskip("hessfast.triton.attention")

TRITON_DIR = pathlib.Path(hessfast.__file__).parent / "triton"


def _launches(tree):
    """Calls of the form ``kernel[grid](...)`` (a subscripted callee): Triton launches."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            yield node


def _guarded(tree):
    """Nodes inside a ``with on_device(...)`` block."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any(
            isinstance(item.context_expr, ast.Call)
            and getattr(item.context_expr.func, "id", None) == "on_device"
            for item in node.items
        ):
            for sub in ast.walk(node):
                inside.add(id(sub))
    return inside


@pytest.mark.parametrize("module", sorted(p.name for p in TRITON_DIR.glob("*.py")))
def test_every_launch_makes_the_tensors_device_current(module):
    """Triton launches on the *current* CUDA device: a model on ``cuda:1`` (or split across
    devices) crashes unless each launch sits in ``with on_device(tensor)``."""
    tree = ast.parse((TRITON_DIR / module).read_text())
    guarded = _guarded(tree)
    bare = [n.lineno for n in _launches(tree) if id(n) not in guarded]
    assert not bare, f"hessfast/triton/{module}: launches outside `with on_device(...)` at {bare}"


def test_on_device_is_the_tensors_device(monkeypatch):
    from hessfast.triton import on_device

    seen = []

    class Recorder:
        def __init__(self, dev):
            seen.append(dev)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(torch.cuda, "device", Recorder)
    with on_device(torch.zeros(1)):  # a CPU tensor: no device switch
        pass
    assert seen == []

    class FakeCuda:
        is_cuda = True
        device = torch.device("cuda", 1)

    with on_device(FakeCuda()):
        pass
    assert seen == [torch.device("cuda", 1)]


class _Grid:
    """A stand-in kernel: records the launch grid."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return lambda *a, **k: None


@pytest.mark.parametrize("kind", ["fwd", "kv", "q"])
def test_attention_grid_fits_cuda_limits_for_many_heads(kind):
    """Batch 512 × 192 window heads (a Swin-like model): Z·H = 98,304 programs per block row,
    over grid axis 1's limit of 65,535 when heads were on axis 1."""
    z, h, t = 512, 192, 49
    geo = ta._geometry_of((), torch.float16, z, h, h, t, t, 32, 32, None, False, None)
    kernel = _Grid()
    geo.launch(kernel, kind, True, (z * h, 3), torch.zeros(1))
    (grid,) = kernel.grids
    assert len(grid) == 2 and grid[1] == 3
    assert grid[0] <= 2**31 - 1
    assert all(g <= 65535 for g in grid[1:])
    blk = ta._blocks(kind, torch.float16, 32, 32, True)
    n = blk.n if kind == "kv" else blk.m
    assert grid[0] == -(-t // n) * z * h


def test_attention_declines_more_tangents_than_the_grid_takes():
    q = torch.zeros(1, 2, 5, 16)
    args = (q, q, q, None, 0.0, False, None, False)
    call = hessfast.rules.base.Call(
        torch.ops.aten.scaled_dot_product_attention.default, args, (True,) * 3 + (False,) * 5,
        (None,) * 8, 70000,
    )  # fmt: skip
    why = ta.TritonScaledDotProductAttention().not_supported_reasons(call)
    assert any("70000 tangents" in w for w in why)


@pytest.fixture
def two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs")
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the Triton kernels run in the interpreter in this process")


def test_model_on_the_second_gpu_runs_triton_on_it(two_gpus, monkeypatch):
    """A GPT-like block on ``cuda:1`` while ``cuda:0`` is current: every Triton kernel
    (attention, layer norm, activations, linear, the fused head) launches on ``cuda:1``."""
    monkeypatch.setenv("HESSFAST_SELFCHECK", "1")
    dev = torch.device("cuda", 1)
    torch.cuda.set_device(0)
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(32)
            self.qkv = nn.Linear(32, 96)
            self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
            self.head = nn.Linear(32, 11)

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = self.qkv(self.ln(x)).view(b, t, 3, 2, 16).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + a.transpose(1, 2).reshape(b, t, 32)
            return self.head(x + self.mlp(x))

    model = Block().to(dev)
    x = torch.randn(3, 17, 32, device=dev)
    y = torch.randint(0, 11, (3, 17), device=dev)
    v = torch.randn(sum(p.numel() for p in model.parameters()), device=dev)
    want = hessfast.hvp(model, F.cross_entropy, x, y, v, backend="torch")
    got, info = hessfast.hvp(model, F.cross_entropy, x, y, v, backend="triton", return_info=True)
    assert torch.cuda.current_device() == 0
    assert info.backends().get("triton", 0) > 0
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4)


def test_every_kernel_of_a_product_enters_the_tensors_device(monkeypatch):
    """On one GPU (the next lent device): every Triton launch of a product enters
    ``torch.cuda.device`` with the tensors' device (recorded through a wrapper of the real
    context manager); the two-GPU test above checks the numbers on ``cuda:1``."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the Triton kernels run in the interpreter in this process")
    real = torch.cuda.device
    entered = []

    class Recording(real):
        def __init__(self, dev):
            entered.append(torch.device(dev))
            super().__init__(dev)

    monkeypatch.setattr(torch.cuda, "device", Recording)
    torch.manual_seed(0)
    dev = torch.device("cuda", torch.cuda.current_device())
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 5)).to(dev)
    x, y = torch.randn(6, 8, device=dev), torch.randint(0, 5, (6,), device=dev)
    v = torch.randn(sum(p.numel() for p in model.parameters()), device=dev)
    hessfast.hvp(model, F.cross_entropy, x, y, v, backend="triton", compile="interpret")
    assert entered and all(d == dev for d in entered)
    # linear: a forward GEMM each, backward GEMMs 1 (inactive input) + 2; layer norm 2, gelu 2
    # (and the self-checks' launches, on the same device)
    assert len(entered) >= 9
