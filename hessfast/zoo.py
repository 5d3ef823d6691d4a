"""The model zoo: the architectures hessfast's tests and benchmarks run on, in one place.

Architectures (random init, any size):

- :func:`mlp_model`: a stack of ``nn.Linear`` with activations between (GELU unless given);
- :class:`BasicBlock`, :class:`ResNet18` (torchvision's ResNet-18 layout) and :class:`SmallResNet`
  (a stem, two basic blocks, a mean-pooled head);
- :class:`CausalSelfAttention`, :class:`Block` and :class:`GPT`: the GPT-2 layout with
  ``F.scaled_dot_product_attention`` and pre-LN blocks, the head tied to the token embedding or not;
- :class:`LogitsOnly`: a Hugging Face causal LM that returns its logits tensor.

The benchmark presets (``mlp``, ``resnet18``, ``gpt2`` at the ``tiny`` / ``small`` / ``full``
sizes, and users' ``module:function`` workloads) are built from these in
:mod:`hessfast.bench_models`. The problems every engine test runs on are here: builders returning
``(model, loss_fn, inputs, targets)``, small and float64 on the CPU, each exercising a different
part of the rule set, named in :data:`MODELS` (``tests/models/zoo.py`` imports them). Hugging Face
models are built from tiny configs (no download) behind :class:`LogitsOnly`.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------- architectures


def mlp_model(dims: list[int], activations: list[type[nn.Module]] | None = None) -> nn.Module:
    """``Linear(dims[0], dims[1])``, activation, ..., ``Linear(dims[-2], dims[-1])``; the
    activations between the layers are ``activations`` in order (default: GELU everywhere)."""
    acts = activations or [nn.GELU] * (len(dims) - 2)
    layers: list[nn.Module] = []
    for a, b, act in zip(dims[:-2], dims[1:-1], acts):
        layers += [nn.Linear(a, b), act()]
    layers.append(nn.Linear(dims[-2], dims[-1]))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3×3 conv-BN, a residual (1×1 conv-BN where the shape changes)."""

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


class SmallResNet(nn.Module):
    """A 3×3 stem (with bias) on 2-channel inputs, two basic blocks of width ``c``, a linear head
    on the spatial mean."""

    def __init__(self, c=4, classes=3):
        super().__init__()
        self.stem = nn.Conv2d(2, c, 3, padding=1)
        self.blocks = nn.Sequential(BasicBlock(c, c, 1), BasicBlock(c, c, 1))
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        h = self.blocks(F.relu(self.stem(x)))
        return self.head(h.mean(dim=(2, 3)))


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
    """A pre-LN transformer block: causal SDPA attention, then a tanh-GELU MLP of width 4d."""

    def __init__(self, d, h):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, h)
        self.ln2 = nn.LayerNorm(d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    """GPT-2 layout: token + position embeddings, pre-LN blocks with fused SDPA, a final LayerNorm
    and a linear head, tied to the token embedding with ``tied``."""

    def __init__(self, vocab, d, h, layers, t, tied=False):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(t, d)
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln(x))


class LogitsOnly(nn.Module):
    """Hugging Face causal LMs return a ModelOutput; hessfast wants the logits tensor."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids):
        return self.hf(input_ids=input_ids, use_cache=False).logits


# ------------------------------------------------------------------------ the tests' problems

D = torch.float64


def mlp(seed=0):
    """Tanh and GELU between three linear layers, 6 → 4 classes, batch 10."""
    torch.manual_seed(seed)
    m = mlp_model([6, 8, 8, 4], [nn.Tanh, nn.GELU])
    x, y = torch.randn(10, 6), torch.randint(0, 4, (10,))
    return m.to(D), F.cross_entropy, (x.to(D),), y


def cnn_bn(train=False, seed=0):
    """Conv-BN-ReLU, strided conv-BN-SiLU, adaptive average pooling, linear; BatchNorm running
    statistics that are not the identity, so eval mode differs from train mode."""
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
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    m.train(train)
    x, y = torch.randn(4, 3, 7, 7, dtype=D), torch.randint(0, 5, (4,))
    return m, F.cross_entropy, (x,), y


def resnet(seed=0):
    """:class:`SmallResNet` in eval mode, 6×6 inputs, batch 3."""
    torch.manual_seed(seed)
    m = SmallResNet().to(D).eval()
    x, y = torch.randn(3, 2, 6, 6, dtype=D), torch.randint(0, 3, (3,))
    return m, F.cross_entropy, (x,), y


def gpt(seed=0):
    """:class:`GPT` with a tied head: vocab 11, d 8, 2 heads, 2 layers, T 6, batch 2; weights
    ``N(0, 1/d)``, one-dimensional parameters ``N(0.1, 1)``."""
    torch.manual_seed(seed)
    m = GPT(vocab=11, d=8, h=2, layers=2, t=6, tied=True)
    for p in m.parameters():
        nn.init.normal_(p, std=1 / math.sqrt(8)) if p.dim() > 1 else nn.init.normal_(p, 0.1)
    m = m.to(D).eval()
    idx = torch.randint(0, 11, (2, 6))
    y = torch.randint(0, 11, (2, 6))
    return m, F.cross_entropy, (idx,), y


def hf_gpt2(seed=0):
    """Hugging Face GPT-2 from a tiny config (2 layers, d 8, vocab 13), dropout off."""
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
    """Hugging Face Llama from a tiny config (2 layers, GQA 2:1, untied head), RMSNorm computed
    in the model's dtype."""
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


#: The tests' problems by name (``tests/test_models.py`` runs hessfast on each against the oracles).
MODELS: dict[str, Callable] = {
    "mlp": mlp,
    "cnn_bn_eval": lambda: cnn_bn(train=False),
    "cnn_bn_train": lambda: cnn_bn(train=True),
    "resnet": resnet,
    "gpt": gpt,
    "hf_gpt2": hf_gpt2,
    "hf_llama": hf_llama,
}
