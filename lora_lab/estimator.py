"""Will it fit? Training memory of any Llama-shaped model, from the trainer's own step on the meta device.

`estimate` builds the kit's `LlamaForCausalLM` on PyTorch's meta device (shapes and dtypes, no data),
prepares it as the trainer does and runs `training_step` with memory counted, so "will LLaMA-65B fit?" is
answered by the code the trainer runs, not by a second formula. The grid helpers below make the answer
fast enough for sliders: `depth_extrapolated` runs two shallow copies instead of 80 layers, `EstimateGrid`
runs a few corner settings and gets every slider setting from them by exact arithmetic, and `EstimateCache`
remembers answers.

This module sits on top: it imports `model`, `memory` and `train`, and `lora_lab.widgets.scale` imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import torch

from .lora import LoraConfig, count_parameters
from .memory import MemoryBreakdown, optimizer_bytes
from .model import LlamaConfig, LlamaForCausalLM
from .train import checkpoint_layers, make_optimizer, prepare_model, training_step

# Published shapes (LLaMA paper Table 2 and the released configs; Llama 2 paper; GPT-3 paper Table 2.1).
_LLAMA1 = dict(vocab_size=32000, max_position_embeddings=2048)
PRESETS: dict[str, dict] = {
    "llama-7b": dict(_LLAMA1, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=32),
    "llama-13b": dict(_LLAMA1, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                      num_attention_heads=40, num_key_value_heads=40),
    "llama-33b": dict(_LLAMA1, hidden_size=6656, intermediate_size=17920, num_hidden_layers=60,
                      num_attention_heads=52, num_key_value_heads=52),
    "llama-65b": dict(_LLAMA1, hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=64),
    "llama-2-70b": dict(vocab_size=32000, max_position_embeddings=4096, hidden_size=8192,
                        intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8),  # grouped-query attention: 8 key/value heads
    # GPT-3 175B in Llama's fields: d_model 12288, 96 layers, 96 heads of 128, tied embeddings, 2048 positions.
    # Note: GPT-3's MLP is two d x 4d matrices with GELU; Llama's SwiGLU MLP has three matrices, so a 4d-wide one
    # would have 1.5x the weights. Width 8d/3 = 32768 (LLaMA's own "2/3 of 4d" rule) gives GPT-3's count exactly;
    # attention, where the LoRA paper puts its adapters, is the same shape as GPT-3's.
    "gpt3-175b": dict(vocab_size=50257, max_position_embeddings=2048, hidden_size=12288,
                      intermediate_size=32768, num_hidden_layers=96, num_attention_heads=96,
                      num_key_value_heads=96, tie_word_embeddings=True),
    # SmolLM2-135M (notebook 09's real model), from its config.json: 30 layers of width 576, 9 query heads and
    # 3 key/value heads of 64, a 49,152-token vocabulary whose embedding is tied to the output head.
    "smollm2-135m": dict(vocab_size=49152, max_position_embeddings=8192, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                         tie_word_embeddings=True),
}
# Parameter counts as published (LLaMA paper Table 2: 6.7B, 13.0B, 32.5B, 65.2B; Llama 2 "70B"; GPT-3 175B).
PUBLISHED_PARAMS = {"llama-7b": 6.7e9, "llama-13b": 13.0e9, "llama-33b": 32.5e9, "llama-65b": 65.2e9,
                    "llama-2-70b": 70e9, "gpt3-175b": 175e9,
                    "smollm2-135m": 134.5e6}  # SmolLM2: 134,515,008 as transformers counts it
ESTIMATE_METHODS = ("full", "lora", "qlora")


@dataclass
class Estimate:
    """Training memory for one configuration, from a real step on the meta device (see `estimate`)."""

    model: str
    method: str
    breakdown: MemoryBreakdown
    trainable_params: int
    total_params: int

    @property
    def total_bytes(self) -> int:
        return self.breakdown.total

    @property
    def adapter_bytes(self) -> int:
        """Size of what training produces, saved in 16 bit: the adapters (the whole model for ``full``)."""
        return 2 * self.trainable_params

    def fits(self, gpu_bytes: float) -> bool:
        """True if the tensors alone fit in ``gpu_bytes`` (leave ~10-20% for the CUDA context and the cache)."""
        return self.total_bytes <= gpu_bytes

    def __str__(self) -> str:
        head = (f"{self.model} {self.method}: {self.total_bytes / 1e9:.2f} GB in tensors, trainable params "
                f"{self.trainable_params:,} of {self.total_params:,}, checkpoint {self.adapter_bytes / 1e6:,.1f} MB")
        return head + "\n" + str(self.breakdown)


def model_config(model):
    """A `LlamaConfig` from a preset name (see ``PRESETS``) or a config."""
    if isinstance(model, LlamaConfig):
        return model
    if isinstance(model, str) and model in PRESETS:
        return LlamaConfig(**PRESETS[model])
    raise ValueError(f"model must be a LlamaConfig or a preset name, one of {sorted(PRESETS)}; got {model!r}.")


def estimate(model, method: str, *, r: int = 8, target_modules=("q_proj", "v_proj"), batch_size: int = 1,
             seq_len: int = 512, gradient_checkpointing: bool = True, optimizer: str = "adamw",
             dtype: torch.dtype = torch.bfloat16, optimizer_state_dtype: torch.dtype | None = torch.float32,
             qlora_options: dict | None = None) -> Estimate:
    """How much memory fine-tuning needs, answered by running the trainer's own step on the meta device.

    The kit's `LlamaForCausalLM` is built with ``torch.device("meta")`` (shapes, no data: a 65B model takes
    seconds and no RAM), prepared by the trainer's `prepare_model` (``apply_lora``; ``apply_qlora`` stores NF4
    codes and absmax for real, shape for shape), then `training_step` runs forward, backward and the optimizer
    with the same `SavedTensors` hooks the measurement uses. Nothing is a formula beside the code the trainer runs.

    Args:
        model: a preset name (``"llama-7b"``, ..., ``"gpt3-175b"``) or a `LlamaConfig`.
        method: ``"full"`` (every weight trains), ``"lora"`` or ``"qlora"``.
        r, target_modules: the `LoraConfig` (ignored for ``full``).
        batch_size, seq_len: one batch of (batch_size, seq_len) tokens.
        gradient_checkpointing: keep only layer inputs plus one layer's activations (`checkpoint_layers`).
        optimizer: ``"adamw"`` or ``"sgd"`` (no state).
        dtype: weights and compute (16-bit as in both papers; float32 matches the kit's CPU training).
        optimizer_state_dtype: PyTorch's AdamW keeps its moments in the parameter's dtype; mixed-precision
            trainers (and both papers' figures: 12 bytes per parameter for "780 GB") keep them in float32.
            None keeps PyTorch's behaviour.
        qlora_options: keyword arguments for ``apply_qlora`` (``compute_dtype`` defaults to ``dtype``).
    """
    config = model_config(model)
    if method not in ESTIMATE_METHODS:
        raise ValueError(f"method must be one of {ESTIMATE_METHODS}, got {method!r}.")
    for value, name in ((batch_size, "batch_size"), (seq_len, "seq_len")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_position_embeddings "
                         f"({config.max_position_embeddings}); pick a shorter seq_len.")
    with torch.device("meta"):
        net = LlamaForCausalLM(config).to(dtype)
    lora = None if method == "full" else LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules)
    options = {"compute_dtype": dtype, **(qlora_options or {})} if method == "qlora" else None
    prepare_model(net, method, lora, options)  # NF4 on meta: `lora_lab.nf4` keeps to its shape-only path
    opt = make_optimizer(net, optimizer)
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    ckpt = checkpoint_layers(net) if gradient_checkpointing else contextlib.nullcontext()
    with ckpt:  # attention on meta saves what a fused kernel saves (see `model.causal_attention`)
        _, breakdown = training_step(net, (ids, ids), opt, track=True)
    if optimizer_state_dtype is not None:
        for state in opt.state.values():
            state.update({k: v.to(optimizer_state_dtype) for k, v in state.items() if v.dim() > 0})
        breakdown.optimizer_state = optimizer_bytes(opt)
    counts = count_parameters(net)
    name = model if isinstance(model, str) else "custom"
    return Estimate(name, method, breakdown, counts.trainable, counts.total)


# --------------------------------------------------------------------------- fast answers for the sliders

class EstimateCache:
    """Memoizes ``estimate(preset, method, **kwargs)`` on its (hashable) arguments.

    Example:
        >>> fast = EstimateCache(estimate)
        >>> fast("llama-7b", "lora", r=8) is fast("llama-7b", "lora", r=8)
        True
    """

    def __init__(self, estimate: Callable[..., object]):
        self.estimate = estimate
        self.cache: dict = {}  # (preset, method, sorted kwargs) -> answer

    def __call__(self, preset, method, **kwargs):
        key = (preset, method, tuple(sorted(kwargs.items())))
        if key not in self.cache:
            self.cache[key] = self.estimate(preset, method, **kwargs)
        return self.cache[key]


def depth_extrapolated(estimate: Callable[..., Estimate], model_config: Callable[[str], LlamaConfig]):
    """A fast `estimate` for deep presets: run it on 2- and 3-layer copies of the config and extend by depth.

    From two layers on, every category is linear in the number of decoder layers L: each layer adds its
    weights, gradients, optimizer state and saved activations (with gradient checkpointing: its input; the
    last layer keeps all of its activations at every depth). So  m(L) = m(2) + (L − 2) · (m(3) − m(2))
    exactly, for a cost of five layers instead of L (a test checks it against a full-depth estimate).
    (One layer is a special case: its input is the embedding output, which it saves anyway.)

    Args:
        estimate: `estimate` itself, or anything with its signature.
        model_config: preset name -> `LlamaConfig` (a dataclass), e.g. `model_config`.

    Returns:
        ``call(preset, method, **kwargs)`` returning an `Estimate` with the preset's name.
    """
    def call(preset, method, **kwargs):
        cfg = model_config(preset)
        depth = cfg.num_hidden_layers
        if depth <= 3:
            return estimate(preset, method, **kwargs)
        e1, e2 = (estimate(dataclasses.replace(cfg, num_hidden_layers=n), method, **kwargs) for n in (2, 3))

        def grow(a, b):
            return a + (depth - 2) * (b - a)

        b1, b2 = e1.breakdown.as_dict(), e2.breakdown.as_dict()
        breakdown = dataclasses.replace(e1.breakdown, **{k: grow(b1[k], b2[k]) for k in b1})
        return dataclasses.replace(e1, model=preset if isinstance(preset, str) else e1.model, breakdown=breakdown,
                                   trainable_params=grow(e1.trainable_params, e2.trainable_params),
                                   total_params=grow(e1.total_params, e2.total_params))

    return call


def multilinear(point, axes, corners: dict) -> dict:
    """Evaluate the multilinear function through `corners` at `point`, in exact rationals.

    Args:
        point: one value per axis.
        axes: per axis the anchor values, two (x0, x1), or one (x0,) for an axis the function does not vary along.
        corners: {one anchor per axis: {name: int}}.

    Returns:
        {name: Fraction}: f(x) = Σ_corners Π_axes w_axis · f(corner), w = (x − x_other) / (x_corner − x_other).
    """
    out = dict.fromkeys(next(iter(corners.values())), Fraction(0))
    for corner, values in corners.items():
        w = Fraction(1)
        for x, c, anchors in zip(point, corner, axes):
            if len(anchors) == 2:
                other = anchors[1] if c == anchors[0] else anchors[0]
                w *= Fraction(x - other, c - other)
        for name in out:
            out[name] += w * values[name]
    return out


class EstimateGrid:
    """A fast `estimate` for the sliders: a few corner estimates, then exact arithmetic for r, batch, seq_len.

    For one model, method, target set, checkpointing choice and optimizer, every byte count the estimator
    returns is multilinear in (r, batch_size, seq_len): weights, gradients and optimizer state are
    a + b·r (adapters are r·(in + out) per target), and each saved activation is a tensor whose size is a
    product such as B·T·C, B·T·r (lora_A's output) or T·D (the RoPE tables; with flash attention there is no
    T×T matrix). A multilinear function is fixed by its values at the 2×2×2 corners (two anchors per axis):
    f(x) = Σ_corners Π_axes (x − x_other) / (x_corner − x_other) · f(corner)  (`multilinear`).

    One exception, found by the tests: the loss flattens ``labels[:, 1:]`` (and ``logits[:, :-1]``), a view
    of the whole storage at batch_size 1 but a copy from 2 on, so batch_size 1 is its own (r, seq_len) slab
    and the corners of batch_size ≥ 2 sit at `batch_sizes`. ``full`` ignores r, so its corners are 1×2 (or
    2×2).

    # Note: QLoRA is LoRA plus a constant
    QLoRA trains the same adapters (same trainable weights, gradients, optimizer state) and saves the same
    activations: its dequantize-matmul keeps the quantized state, not a tensor, and the frozen 16-bit weight
    LoRA's linear saves is a parameter, which costs nothing extra. Only the frozen weights differ (NF4 codes
    and absmax against 16 bit), and they do not move with the sliders. So qlora(x) = lora(x) + qlora(c) −
    lora(c) for one corner c of each slab: two QLoRA runs instead of twelve (QLoRA's runs are the slowest,
    they quantize every weight). The tests check this byte for byte too.

    Anything else (other keyword arguments, a config instead of a preset name, seq_len above the
    model's positions, a non-integer result) goes to `estimate` itself. tests/test_estimate.py compares
    the arithmetic with direct estimates byte for byte.

    Args:
        estimate: ``call(preset, method, r=, target_modules=, batch_size=, seq_len=, gradient_checkpointing=,
            optimizer=)``, e.g. ``depth_extrapolated(estimate, model_config)``.
        model_config: preset name -> `LlamaConfig` (for its ``max_position_embeddings``).
        ranks, batch_sizes, seq_lens: the anchors (two distinct values each; batch sizes ≥ 2).

    Attributes:
        corners: {(preset, method, (r, batch_size, seq_len), combo): Estimate}, the estimates it ran.
    """

    SLIDERS = ("r", "batch_size", "seq_len")  # the multilinear axes
    COMBO = ("target_modules", "gradient_checkpointing", "optimizer")  # fixed within one set of corners

    def __init__(self, estimate: Callable[..., Estimate], model_config: Callable[[str], LlamaConfig],
                 ranks=(8, 64), batch_sizes=(2, 4), seq_lens=(512, 1024)):
        self.estimate, self.model_config = estimate, model_config
        self.ranks, self.batch_sizes, self.seq_lens = ranks, batch_sizes, seq_lens
        self.corners: dict = {}

    def __call__(self, preset, method, **kwargs) -> Estimate:
        combo = {k: kwargs[k] for k in self.COMBO if k in kwargs}
        fits = (isinstance(preset, str) and set(kwargs) == set(self.SLIDERS + self.COMBO)
                and max(kwargs["seq_len"], *self.seq_lens) <= self.model_config(preset).max_position_embeddings)
        if not fits:
            return self.estimate(preset, method, **kwargs)
        x = tuple(kwargs[k] for k in self.SLIDERS)
        if method == "qlora":  # Note: QLoRA is LoRA plus a constant (docstring); one corner gives the constant
            got, _ = self._interpolate(preset, "lora", x, combo)
            c0 = next(itertools.product(*self._axes(method, x[1])))
            first = self._corner(preset, method, c0, combo)
            q0, l0 = _values(first), _values(self._corner(preset, "lora", c0, combo))
            got = {k: v + q0[k] - l0[k] for k, v in got.items()}
        else:
            got, first = self._interpolate(preset, method, x, combo)
        if any(v.denominator != 1 or v < 0 for v in got.values()):  # not multilinear after all: ask directly
            return self.estimate(preset, method, **kwargs)
        got = {k: int(v) for k, v in got.items()}
        params = {k: got.pop(k) for k in ("trainable_params", "total_params")}
        return dataclasses.replace(first, breakdown=dataclasses.replace(first.breakdown, **got), **params)

    def warm(self, preset, methods, **combo) -> None:
        """Run both slabs' corners for every method now, so later slider moves are arithmetic only."""
        for method, b in itertools.product(methods, (1, self.batch_sizes[0])):  # one point per slab runs its corners
            self(preset, method, r=self.ranks[0], batch_size=b, seq_len=self.seq_lens[0], **combo)

    def _axes(self, method, batch_size):
        return ((self.ranks[0],) if method == "full" else self.ranks, (1,) if batch_size == 1 else self.batch_sizes,
                self.seq_lens)

    def _corner(self, preset, method, point, combo):
        key = (preset, method, point, tuple(sorted(combo.items())))
        if key not in self.corners:
            self.corners[key] = self.estimate(preset, method, **dict(zip(self.SLIDERS, point)), **combo)
        return self.corners[key]

    def _interpolate(self, preset, method, x, combo):
        ax = self._axes(method, x[1])
        ests = {p: self._corner(preset, method, p, combo) for p in itertools.product(*ax)}
        return multilinear(x, ax, {p: _values(e) for p, e in ests.items()}), next(iter(ests.values()))


def _values(e: Estimate) -> dict[str, int]:
    """Every integer of an estimate that the grid interpolates: the five categories and the parameter counts."""
    return {**e.breakdown.as_dict(), "trainable_params": e.trainable_params, "total_params": e.total_params}
