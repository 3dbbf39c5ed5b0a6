"""A tiny Llama: the decoder-only causal LM that every notebook fine-tunes.

The architecture and the module names are Llama's (Touvron et al., 2023) exactly as transformers spells
them, so `model.state_dict()` has the same keys as `transformers.LlamaForCausalLM` and LoRA's
`target_modules=["q_proj", "v_proj"]` means what it means in PEFT:

    model.embed_tokens                                   (V, C)
    model.layers.{i}.input_layernorm                     RMSNorm(C)
    model.layers.{i}.self_attn.{q,k,v,o}_proj            nn.Linear, no bias
    model.layers.{i}.post_attention_layernorm            RMSNorm(C)
    model.layers.{i}.mlp.{gate,up,down}_proj             SwiGLU, no bias
    model.norm                                           RMSNorm(C)
    lm_head                                              (V, C)

Shape letters: B batch, T sequence length, C hidden_size, H query heads, K key/value heads, D head_dim,
V vocab_size. Nothing here is device-specific: the same code runs on CPU, CUDA and the meta device
(no `.item()`, no branch on tensor values), which the memory estimator relies on.
"""

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LlamaConfig:
    """Hyperparameters, with transformers' `LlamaConfig` field names.

    The defaults are the shipped base model's (747,136 parameters). Any other size can be built
    untrained, e.g. on the meta device for a memory estimate.
    """

    vocab_size: int = 34
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # < num_attention_heads: grouped-query attention (GQA)
    max_position_embeddings: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False

    def __post_init__(self):
        for name in _SIZES:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a positive, finite number, got {value!r}.")
        if not isinstance(self.tie_word_embeddings, bool):
            raise TypeError(f"tie_word_embeddings must be True or False, got {self.tie_word_embeddings!r}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}); pick sizes so that head_dim is a whole number."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads}) for grouped-query attention."
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for rotary embeddings.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "max_position_embeddings")


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich, 2019), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def rotary_cos_sin(config: LlamaConfig, T: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for positions 0..T-1, each (T, D) (Su et al., 2021, RoFormer).

    Frequency i is theta^(-2i/D); the two halves of the last dimension repeat the same frequencies,
    which is transformers' `rotate_half` convention (not the interleaved pairs of the paper).
    Computed on the fly rather than kept in a buffer, so a model built on the meta device and then
    materialized never carries an uninitialized table.
    """
    D = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, device=device).float() / D))  # (D/2,)
    freqs = torch.outer(torch.arange(T, device=device).float(), inv_freq)  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+D/2}) pair by position * frequency_i. x: (B, heads, T, D)."""
    return x * cos + rotate_half(x) * sin


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D)) v`` with a causal mask; q, k, v and the result are (B, H, T, D).

    # Note: attention on the meta device
    On meta tensors ``F.scaled_dot_product_attention`` falls back to its math kernel, which keeps the
    (B, H, T, T) attention matrix for backward. Real CPUs and GPUs run a fused (flash) kernel that keeps
    only q, k, v, the output and a (B, H, T) logsumexp. So meta calls go to PyTorch's fused CPU kernel,
    which keeps exactly that set, and `lora_lab.estimator` counts what a real step saves.
    """
    if q.is_meta:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[0]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class LlamaAttention(nn.Module):
    """Causal multi-head attention with rotary positions and optional grouped-query attention.

    With K < H key/value heads (Ainslie et al., 2023), each key/value head serves H/K query heads;
    k_proj and v_proj then have K*D rather than C outputs.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        C, H, K, D = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(C, H * D, bias=False)
        self.k_proj = nn.Linear(C, K * D, bias=False)
        self.v_proj = nn.Linear(C, K * D, bias=False)
        self.o_proj = nn.Linear(H * D, C, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        H, K, D = self.config.num_attention_heads, self.config.num_key_value_heads, self.config.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, K, D).transpose(1, 2)  # (B, K, T, D)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # GQA: key/value head j serves query heads j*H/K .. (j+1)*H/K - 1 (transformers' repeat_kv)
        k = k.repeat_interleave(H // K, dim=1)  # (B, H, T, D)
        v = v.repeat_interleave(H // K, dim=1)  # (B, H, T, D)
        y = causal_attention(q, k, v)  # softmax(q k^T / sqrt(D)) v, (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, C)
        return self.o_proj(y)


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward (Shazeer, 2020): down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        C, I = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(C, I, bias=False)
        self.up_proj = nn.Linear(C, I, bias=False)
        self.down_proj = nn.Linear(I, C, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, I) -> (B, T, C)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """Embedding, the decoder layers and the final norm: input_ids (B, T) -> hidden states (B, T, C)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = rotary_cos_sin(self.config, input_ids.shape[1], x.device, x.dtype)  # (T, D) each
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Llama with a language-modelling head; state_dict keys equal transformers' LlamaForCausalLM.

    Example:
        >>> model = LlamaForCausalLM(LlamaConfig())
        >>> logits = model(torch.zeros(2, 8, dtype=torch.long))  # (2, 8, vocab_size)
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @staticmethod
    def _init_weights(module: nn.Module):
        # transformers' default: N(0, initializer_range=0.02) for linear and embedding weights.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        """Next-token logits, and the loss when labels are given.

        Args:
            input_ids: (B, T) token ids, T <= max_position_embeddings.
            labels: optional (B, T), aligned with input_ids as in transformers: the model shifts them,
                so position t's logits are scored against labels[:, t + 1]. -100 marks positions to
                ignore (prompt, padding).

        Returns:
            logits (B, T, V) without labels, else (loss, logits) with loss the mean cross-entropy
            over the non-ignored target tokens.
        """
        logits = self.lm_head(self.model(input_ids))  # (B, T, V)
        if labels is None:
            return logits
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
        )
        return loss, logits


def loss_and_logits(out, *, need_loss: bool = False) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``(loss, logits)`` from what a causal LM's forward returned: the kit's model or a transformers one.

    `LlamaForCausalLM` above returns logits (B, T, V), or ``(loss, logits)`` when given labels; a
    transformers ``*ForCausalLM`` returns an output object (``CausalLMOutputWithPast``) with ``.logits``
    and, given labels, ``.loss``. The trainer (`training_step`) and `Task.evaluate` read outputs here only.

    Args:
        out: the forward's return value.
        need_loss: the call passed labels, so a loss must be there.

    Returns:
        ``(loss, logits)``; loss is None for logits alone.

    Raises:
        TypeError: ``out`` is none of these (or has no loss although ``need_loss``).
    """
    if isinstance(out, torch.Tensor):
        loss, logits = None, out
    elif isinstance(out, tuple) and len(out) == 2:
        loss, logits = out
    else:
        loss, logits = getattr(out, "loss", None), getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor) or not isinstance(loss, (torch.Tensor, type(None))) or (
            need_loss and loss is None):
        raise TypeError(f"The model's forward returned a {type(out).__name__}; lora_lab needs a causal LM whose "
                        "forward(input_ids) gives logits (B, T, vocab_size) and forward(input_ids, labels=labels) "
                        "gives (loss, logits), or an output with .logits and .loss as a transformers "
                        "*ForCausalLM returns. Wrap the model so that its forward returns one of these.")
    return loss, logits


def resolve_device(device=None, strict: bool = False) -> torch.device:
    """None -> CUDA when available, else CPU. A CUDA request without CUDA falls back to CPU with a
    warning, or raises ValueError when strict=True."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{device!r} is not a device ({err}); pass 'cpu', 'cuda' or None.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        if strict:
            raise ValueError("CUDA was requested but is not available; pass device='cpu' or device=None.")
        warnings.warn("CUDA was requested but is not available; using the CPU instead.", stacklevel=3)
        return torch.device("cpu")
    try:
        torch.empty(0, device=device)  # allocates nothing; fails for a device this machine lacks
    except (RuntimeError, AssertionError):
        raise ValueError(f"device {str(device)!r} is not available on this machine; pass device='cpu' or "
                         "None.") from None
    return device


__all__ = ["LlamaConfig", "LlamaForCausalLM", "loss_and_logits", "resolve_device"]
