"""The models every engine test runs on: builders returning ``(model, loss_fn, inputs, targets)``.

Small and float64 on the CPU; each exercises a different part of the rule set. Hugging Face models
are built from tiny configs (no download) behind a wrapper that returns logits.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import nn

D = torch.float64


def mlp(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4))
    x, y = torch.randn(10, 6), torch.randint(0, 4, (10,))
    return m.to(D), F.cross_entropy, (x.to(D),), y


def cnn_bn(train=False, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2),
        nn.BatchNorm2d(6),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 5),
    ).to(D)
    # non-trivial running statistics, so eval mode differs from train mode
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    m.train(train)
    x, y = torch.randn(4, 3, 7, 7, dtype=D), torch.randint(0, 5, (4,))
    return m, F.cross_entropy, (x,), y


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c)

    def forward(self, x):
        h = F.relu(self.b1(self.c1(x)))
        return F.relu(x + self.b2(self.c2(h)))


class ResNet(nn.Module):
    def __init__(self, c=4, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(2, c, 3, padding=1)
        self.blocks = nn.Sequential(Block(c), Block(c))
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        h = self.blocks(F.relu(self.stem(x)))
        return self.head(h.mean(dim=(2, 3)))


def resnet(seed=0):
    torch.manual_seed(seed)
    m = ResNet().to(D).eval()
    x, y = torch.randn(3, 2, 6, 6, dtype=D), torch.randint(0, 3, (3,))
    return m, F.cross_entropy, (x,), y


class Attention(nn.Module):
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


class GPTBlock(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, h)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    """GPT-style: token + position embeddings, SDPA, LayerNorm, tanh-GELU, tied output head."""

    def __init__(self, vocab=11, d=8, h=2, layers=2, t=6):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(t, d)
        self.blocks = nn.ModuleList(GPTBlock(d, h) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied
        for p in self.parameters():
            nn.init.normal_(p, std=1 / math.sqrt(d)) if p.dim() > 1 else nn.init.normal_(p, 0.1)

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


def gpt(seed=0):
    torch.manual_seed(seed)
    m = GPT().to(D).eval()
    idx = torch.randint(0, 11, (2, 6))
    y = torch.randint(0, 11, (2, 6))
    return m, F.cross_entropy, (idx,), y


class LogitsOnly(nn.Module):
    """Hugging Face causal LMs return a ModelOutput; hessfast wants the logits tensor."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids):
        return self.hf(input_ids=input_ids, use_cache=False).logits


def hf_gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=13,
        n_positions=8,
        n_embd=8,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    m = LogitsOnly(GPT2LMHeadModel(cfg)).to(D).eval()
    idx, y = torch.randint(0, 13, (2, 5)), torch.randint(0, 13, (2, 5))
    return m, F.cross_entropy, (idx,), y


def _rms_norm_in_model_dtype(self, h):
    """LlamaRMSNorm's formula without its upcast to float32: HF computes RMSNorm in float32 by
    design, which in these float64 tests would cap every method's agreement at ~1e-8."""
    var = h.pow(2).mean(-1, keepdim=True)
    return self.weight * (h * torch.rsqrt(var + self.variance_epsilon))


def hf_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=13,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
        tie_word_embeddings=False,
    )
    m = LogitsOnly(LlamaForCausalLM(cfg)).to(D).eval()
    for mod in m.modules():
        if type(mod).__name__ == "LlamaRMSNorm":
            mod.forward = types.MethodType(_rms_norm_in_model_dtype, mod)
    idx, y = torch.randint(0, 13, (2, 5)), torch.randint(0, 13, (2, 5))
    return m, F.cross_entropy, (idx,), y


MODELS = {
    "mlp": mlp,
    "cnn_bn_eval": lambda: cnn_bn(train=False),
    "cnn_bn_train": lambda: cnn_bn(train=True),
    "resnet": resnet,
    "gpt": gpt,
    "hf_gpt2": hf_gpt2,
    "hf_llama": hf_llama,
}
