"""Memory, measured: where the bytes of one fine-tuning step go, and whether a bigger model would fit.

Every number is counted from tensors that exist, never from a rule of thumb:

    frozen_weights      parameters that do not train, and every buffer, as stored (NF4: packed codes + absmax)
    trainable_weights   parameters that train (all of them for full fine-tuning; lora_A/lora_B for LoRA)
    gradients           the ``.grad`` of the trainable parameters after backward
    optimizer_state     every tensor in ``optimizer.state`` (AdamW: two moments per parameter, and a step)
    activations         tensors autograd saves in the forward pass for the backward pass

`estimate` runs the very same step on PyTorch's meta device, where tensors have shapes and dtypes but no
data, so "will LLaMA-65B fit?" is answered by the code the trainer runs, not by a second formula.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import sys
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import checkpoint

from .model import loss_and_logits

CATEGORIES = ("frozen_weights", "trainable_weights", "gradients", "optimizer_state", "activations")
MiB = 2**20


@dataclass
class MemoryBreakdown:
    """Bytes by category for one training step (forward, backward, optimizer step); see the module docstring.

    ``peak_cuda`` is ``torch.cuda.max_memory_allocated`` over the step (None off CUDA) and ``peak_rss`` the
    process's peak resident memory so far (None where the OS does not say). Both are larger than ``total``:
    they also hold logits, temporaries, the allocator's cache and (RSS) Python itself. See QLoRA §2 and
    Appendix G: the measured bars sit above the tensor arithmetic, too.
    """

    frozen_weights: int = 0
    trainable_weights: int = 0
    gradients: int = 0
    optimizer_state: int = 0
    activations: int = 0
    peak_cuda: int | None = None
    peak_rss: int | None = None

    @property
    def total(self) -> int:
        """Sum of the five categories, in bytes."""
        return sum(getattr(self, name) for name in CATEGORIES)

    def as_dict(self) -> dict[str, int]:
        """The five categories only, in bytes (what a stacked bar chart stacks)."""
        return {name: getattr(self, name) for name in CATEGORIES}

    def to_dict(self) -> dict:
        """Plain dict of every field plus ``total`` (bytes)."""
        return {**asdict(self), "total": self.total}

    def __str__(self) -> str:
        rows = [(name, getattr(self, name)) for name in CATEGORIES] + [("total", self.total)]
        rows += [(f.name, getattr(self, f.name)) for f in fields(self)[len(CATEGORIES):]
                 if getattr(self, f.name) is not None]
        return "\n".join(f"{name:<18} {nbytes / MiB:12.3f} MiB" for name, nbytes in rows)


# ---------------------------------------------------------------------------------------- counting tensors

def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(identity, bytes) of the memory block behind ``t``: views of one block count once, and in full."""
    storage = t.untyped_storage()
    return storage._cdata, storage.nbytes()


def unique_bytes(tensors, skip: set[int] = frozenset()) -> int:
    """Bytes of the distinct storages behind ``tensors``, leaving out those whose identity is in ``skip``."""
    sizes = dict(_storage(t) for t in tensors if isinstance(t, torch.Tensor))
    return sum(n for key, n in sizes.items() if key not in skip)


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(frozen, trainable) bytes: frozen = non-trainable parameters + all buffers (quantized codes included)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    skip = {_storage(p)[0] for p in trainable}
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    return unique_bytes(frozen, skip), unique_bytes(trainable)


def gradient_bytes(model: nn.Module) -> int:
    """Bytes of the gradients currently held by the model's parameters."""
    return unique_bytes(p.grad for p in model.parameters() if p.grad is not None)


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in ``optimizer.state`` (for AdamW: exp_avg, exp_avg_sq and the step counter)."""
    return unique_bytes(itertools.chain.from_iterable(s.values() for s in optimizer.state.values()))


def peak_rss_bytes() -> int | None:
    """The process's peak resident set size (``resource.getrusage``), or None where unavailable (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


_ACTIVE: list["SavedTensors"] = []


class SavedTensors:
    """Records what autograd keeps for backward while the context is open (``saved_tensors_hooks``).

    Each saved tensor is counted once per storage (``x`` saved by both ``q_proj`` and ``k_proj`` is one
    block of memory); the model's parameters and buffers are left out: saving a weight costs nothing extra.

    Example:
        >>> with SavedTensors(model) as saved:
        ...     loss, _ = model(input_ids, labels=labels)
        >>> saved.nbytes
    """

    def __init__(self, model: nn.Module):
        self.skip = {_storage(t)[0] for t in itertools.chain(model.parameters(), model.buffers())}
        self.sizes: dict[int, int] = {}

    def add(self, t):
        """Count ``t`` (used as the pack hook; returns ``t`` unchanged)."""
        if isinstance(t, torch.Tensor):
            key, nbytes = _storage(t)
            if key not in self.skip:
                self.sizes.setdefault(key, nbytes)
        return t

    @property
    def nbytes(self) -> int:
        return sum(self.sizes.values())

    def __enter__(self) -> "SavedTensors":
        self._hooks = saved_tensors_hooks(self.add, lambda t: t)
        self._hooks.__enter__()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)
        self._hooks.__exit__(*exc)


# ---------------------------------------------------------------------------------- gradient checkpointing

def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks (``model.model.layers`` in transformers' Llama naming)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if isinstance(layers, nn.ModuleList):
        return layers
    found = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not found:
        raise ValueError("Gradient checkpointing needs the model's decoder layers in an nn.ModuleList.")
    return found[0]


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    for tracker in _ACTIVE:  # the checkpoint keeps the layer's inputs alive for the recompute
        for a in args:
            tracker.add(a)
    on_meta = any(isinstance(a, torch.Tensor) and a.is_meta for a in args)
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=not on_meta, **kwargs)


@contextlib.contextmanager
def checkpoint_layers(model: nn.Module):
    """Inside the context, every decoder layer but the last drops its activations and recomputes them in backward.

    With gradient checkpointing (Chen et al. 2016, arXiv 1604.06174) the forward keeps only each layer's
    input; backward reruns one layer at a time. Peak activation memory becomes (layer inputs) + (one
    layer's activations), instead of all layers' activations (the "567 MB -> 18 MB" of QLoRA §2).

    # Note: why the last layer is not checkpointed
    Backward starts at the last layer, so recomputing it right after the forward would rebuild exactly
    what was just thrown away. Keeping it costs the same memory as the first recompute, and makes the
    peak visible to `SavedTensors` (the checkpoint's own hooks hide what happens inside it).
    """
    layers = [m for m in decoder_layers(model)[:-1] if "forward" not in vars(m)]
    for layer in layers:
        layer.forward = functools.partial(_checkpointed, layer.forward)
    try:
        yield model
    finally:
        for layer in layers:
            del layer.forward


# ----------------------------------------------------------------------------------------- one real step

def training_step(model: nn.Module, batch, optimizer: torch.optim.Optimizer, *, track: bool = False):
    """Forward, backward and ``optimizer.step()`` on one batch; the trainer and `estimate` both run this.

    Args:
        batch: ``(input_ids, labels)``, each (B, T), on the model's device.
        track: also count memory (`SavedTensors` during the forward, then weights, gradients, state).

    Returns:
        ``(loss, breakdown)``: the detached loss and a `MemoryBreakdown` (None unless ``track``). A loss
        that is NaN or infinite is returned before backward, so the weights keep their last finite values.
    """
    input_ids, labels = batch
    on_cuda = input_ids.is_cuda
    optimizer.zero_grad(set_to_none=True)
    if track and on_cuda:
        torch.cuda.reset_peak_memory_stats(input_ids.device)
    with SavedTensors(model) if track else contextlib.nullcontext() as saved:
        loss, _ = loss_and_logits(model(input_ids, labels=labels), need_loss=True)
    if not loss.is_meta and not torch.isfinite(loss):
        return loss.detach(), None
    loss.backward()
    grads = gradient_bytes(model) if track else 0
    optimizer.step()
    if not track:
        return loss.detach(), None
    frozen, trainable = weight_bytes(model)
    on_meta = input_ids.is_meta
    return loss.detach(), MemoryBreakdown(
        frozen_weights=frozen, trainable_weights=trainable, gradients=grads,
        optimizer_state=optimizer_bytes(optimizer), activations=saved.nbytes,
        peak_cuda=torch.cuda.max_memory_allocated(input_ids.device) if on_cuda else None,
        peak_rss=None if on_meta else peak_rss_bytes())


def measure(model: nn.Module, batch, optimizer: torch.optim.Optimizer | None = None, *,
            gradient_checkpointing: bool = False) -> MemoryBreakdown:
    """Measure one training step's memory by category (see `MemoryBreakdown`).

    Args:
        model: the model as it will train (after ``apply_lora``/``apply_qlora``, if any).
        batch: ``(input_ids, labels)`` on the model's device.
        optimizer: stepped for real if given; None uses a throwaway AdamW with ``lr=0``, so the weights
            do not move (its state is still allocated and counted).
        gradient_checkpointing: count activations as the checkpointed step keeps them.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters; apply_lora it or set requires_grad first.")
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=0.0, weight_decay=0.0)
    with checkpoint_layers(model) if gradient_checkpointing else contextlib.nullcontext():
        loss, breakdown = training_step(model, batch, optimizer, track=True)
    optimizer.zero_grad(set_to_none=True)
    if breakdown is None:
        raise ValueError(f"The loss is {loss.item()}; memory is measured on a step with a finite loss.")
    return breakdown


# ------------------------------------------------------------------------------- estimate: "will it fit?"

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
}
# Parameter counts as published (LLaMA paper Table 2: 6.7B, 13.0B, 32.5B, 65.2B; Llama 2 "70B"; GPT-3 175B).
PUBLISHED_PARAMS = {"llama-7b": 6.7e9, "llama-13b": 13.0e9, "llama-33b": 32.5e9, "llama-65b": 65.2e9,
                    "llama-2-70b": 70e9, "gpt3-175b": 175e9}
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
    from .model import LlamaConfig

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
    codes and absmax for real), then `training_step` runs forward, backward and the optimizer with the same
    `SavedTensors` hooks the measurement uses. Nothing is a formula beside the code the trainer runs.

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
    from .lora import count_parameters
    from .model import LlamaForCausalLM
    from .train import make_optimizer, prepare_model

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
    lora = None if method == "full" else _lora_config(r, target_modules)
    options = {"compute_dtype": dtype, **(qlora_options or {})} if method == "qlora" else None
    with _nf4_on_meta() if method == "qlora" else contextlib.nullcontext():
        prepare_model(net, method, lora, options)
    opt = make_optimizer(net, optimizer)
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long, device="meta")
    ckpt = checkpoint_layers(net) if gradient_checkpointing else contextlib.nullcontext()
    with ckpt, _fused_attention_on_meta():
        _, breakdown = training_step(net, (ids, ids), opt, track=True)
    if optimizer_state_dtype is not None:
        for state in opt.state.values():
            state.update({k: v.to(optimizer_state_dtype) for k, v in state.items() if v.dim() > 0})
        breakdown.optimizer_state = optimizer_bytes(opt)
    counts = count_parameters(net)
    name = model if isinstance(model, str) else "custom"
    return Estimate(name, method, breakdown, counts.trainable, counts.total)


def _lora_config(r, target_modules):
    from .lora import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules)


@contextlib.contextmanager
def _nf4_on_meta():
    """Let `lora_lab.nf4` quantize meta tensors with its readable (shape-only) path.

    Two of its steps need values: the finite-weight check, and the compiled fast kernels (used from
    ``FAST_MIN_NUMEL`` values on). On meta there are no values to check, and the readable path produces
    the same packed codes, absmax and nested scales, shape for shape, so the stored bytes are the real ones.
    """
    from . import nf4

    check, fast_min = nf4._check_weight, nf4.FAST_MIN_NUMEL
    nf4._check_weight = lambda w: None if isinstance(w, torch.Tensor) and w.is_meta else check(w)
    nf4.FAST_MIN_NUMEL = sys.maxsize
    try:
        yield
    finally:
        nf4._check_weight, nf4.FAST_MIN_NUMEL = check, fast_min


@contextlib.contextmanager
def _fused_attention_on_meta():
    """Make attention on meta tensors save what CPUs and GPUs save.

    On the meta device ``scaled_dot_product_attention`` falls back to its math kernel, which keeps the
    (B, H, T, T) attention matrix for backward. Real CPUs and GPUs run a fused (flash) kernel that keeps
    only q, k, v, the output and a (B, H, T) logsumexp. Meta calls go to PyTorch's fused CPU kernel instead,
    which keeps exactly that set; calls on real tensors are untouched.
    """
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if q.is_meta and attn_mask is None and dropout_p == 0.0 and not kwargs:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal,
                                                                             scale=scale)[0]
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        **kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
