"""Small models with Llama's module names, shared by the LoRA tests."""

import torch
from torch import nn

from lora_lab import LoRALinear, lora_layers


class Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        return self.o_proj(self.q_proj(x) * self.k_proj(x) + self.v_proj(x))


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self_attn = Attention(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.ReLU(), nn.Linear(2 * d, d))

    def forward(self, x):
        return x + self.mlp(self.self_attn(x))


class TinyLM(nn.Module):
    """Llama-like names (``model.layers.0.self_attn.q_proj``) at toy size."""

    def __init__(self, vocab=20, d=8, n_layers=2):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, d)
        self.model.layers = nn.ModuleList(Block(d) for _ in range(n_layers))
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        h = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            h = layer(h)
        return self.lm_head(h)


def randomize_lora_B(model_or_layer, seed=0, std=1.0):
    """Give B nonzero values (at init B = 0, which would make output comparisons vacuous)."""
    gen = torch.Generator().manual_seed(seed)
    layers = [model_or_layer] if isinstance(model_or_layer, LoRALinear) else lora_layers(model_or_layer).values()
    with torch.no_grad():
        for layer in layers:
            w = layer.lora_B["default"].weight
            w.copy_((std * torch.randn(w.shape, generator=gen)).to(w.dtype))
