"""Workloads no hessfast benchmark or rule was tuned on, for ``hessfast bench --model``.

Each function returns ``(model, loss_fn, inputs, targets)`` in float32 on the CPU and is meant to be
run as, e.g. (from the repository root)::

    PYTHONPATH=. hessfast bench --threads 1 --no-peers --model benchmarks.untuned_models:tied_gpt

- ``tied_gpt``: a GPT with the head tied to the embedding (``h @ emb.weight.T``) and the loss
  written as users write it, ``F.cross_entropy`` on reshaped logits (a custom callable);
- ``vgg_bn``: a VGG-style CNN with BatchNorm (eval), in-place ReLU, max pooling and adaptive
  average pooling;
- ``gated_mlp``: a Llama-style SiLU-gated MLP stack with RMSNorm over token embeddings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hessfast.zoo import Block


class TiedGPT(nn.Module):
    def __init__(self, vocab=512, d=128, heads=4, layers=2, t=64):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(t, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

    def forward(self, idx):
        x = self.emb(idx) + self.pos[: idx.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.ln(x) @ self.emb.weight.T


def _sequence_loss(z, y):
    return F.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1))


def tied_gpt(seed: int = 0, **_):
    """Tied-head GPT, vocab 512, d 128, 2 layers, T 64, batch 2, loss on reshaped logits."""
    torch.manual_seed(0)
    model = TiedGPT().eval()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 512, (2, 64), generator=g)
    return model, _sequence_loss, (idx,), torch.randint(0, 512, (2, 64), generator=g)


def vgg_bn(seed: int = 0, **_):
    """VGG-style CNN: 3 stages of conv-BN-ReLU(inplace) + max pool, adaptive avg pool, linear;
    32x32 inputs, batch 16, BatchNorm in eval mode."""
    torch.manual_seed(0)

    def stage(cin, cout):
        return [
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ]

    model = nn.Sequential(
        *stage(3, 16),
        *stage(16, 32),
        *stage(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    with torch.no_grad():  # running statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, 32, 32, generator=g)
    return model.eval(), F.cross_entropy, (x,), torch.randint(0, 10, (16,), generator=g)


class GatedMLP(nn.Module):
    def __init__(self, vocab=256, d=96, hidden=256, layers=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.norms = nn.ModuleList(nn.RMSNorm(d) for _ in range(layers))
        self.gate = nn.ModuleList(nn.Linear(d, hidden, bias=False) for _ in range(layers))
        self.up = nn.ModuleList(nn.Linear(d, hidden, bias=False) for _ in range(layers))
        self.down = nn.ModuleList(nn.Linear(hidden, d, bias=False) for _ in range(layers))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.emb(idx)
        for n, g, u, d in zip(self.norms, self.gate, self.up, self.down):
            h = n(x)
            x = x + d(F.silu(g(h)) * u(h))
        return self.head(x)


def gated_mlp(seed: int = 0, **_):
    """Llama-style SiLU-gated MLP blocks with RMSNorm, vocab 256, d 96, T 32, batch 4."""
    torch.manual_seed(0)
    model = GatedMLP().eval()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 256, (4, 32), generator=g)
    return model, F.cross_entropy, (idx,), torch.randint(0, 256, (4, 32), generator=g)
