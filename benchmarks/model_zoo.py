"""Benchmark models at the baseline shapes of ``shared/baselines`` (``full``) and CPU-sized (``small``).

Each builder returns ``(model, loss_fn, inputs, targets)`` in float32, eval mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(size: str, device):
    dims, batch = (
        ([784, 4096, 4096, 4096, 10], 8192) if size == "full" else ([784, 256, 256, 10], 256)
    )
    layers = []
    for a, b in zip(dims[:-2], dims[1:-1]):
        layers += [nn.Linear(a, b), nn.GELU()]
    layers.append(nn.Linear(dims[-2], dims[-1]))
    model = nn.Sequential(*layers).to(device).eval()
    x = torch.randn(batch, dims[0], device=device)
    y = torch.randint(0, dims[-1], (batch,), device=device)
    return model, F.cross_entropy, (x,), y


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + (x if self.down is None else self.down(x)))


class ResNet18(nn.Module):
    """torchvision's ResNet-18 layout (7×7 stem, max-pool, 4 stages of 2 basic blocks)."""

    def __init__(self, classes=10, width=64):
        super().__init__()
        w = [width, 2 * width, 4 * width, 8 * width]
        self.conv1 = nn.Conv2d(3, w[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        blocks, cin = [], w[0]
        for i, c in enumerate(w):
            stride = 1 if i == 0 else 2
            blocks += [BasicBlock(cin, c, stride), BasicBlock(c, c, 1)]
            cin = c
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        h = self.layers(h)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def resnet18(size: str, device):
    width, batch = (64, 256) if size == "full" else (16, 16)
    model = ResNet18(width=width).to(device).eval()
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    return model, F.cross_entropy, (x,), y


class CausalSelfAttention(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.h = h
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.h, d // self.h).transpose(1, 2) for z in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(o.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, h)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab, d, h, layers, t):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(t, d)
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def gpt2(size: str, device, seq_len: int | None = None, batch: int | None = None):
    if size == "full":
        vocab, d, h, layers, t, b = 50304, 768, 12, 12, 1024, 4
    else:
        vocab, d, h, layers, t, b = 1000, 128, 4, 2, 64, 2
    t, b = seq_len or t, batch or b
    model = GPT(vocab, d, h, layers, t).to(device).eval()
    idx = torch.randint(0, vocab, (b, t), device=device)
    y = torch.randint(0, vocab, (b, t), device=device)
    return model, F.cross_entropy, (idx,), y


MODELS = {"mlp": mlp, "resnet18": resnet18, "gpt2": gpt2}
