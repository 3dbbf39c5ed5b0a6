"""Memory, counted: where the bytes of one fine-tuning step go.

Every number is counted from tensors that exist, never from a rule of thumb:

    frozen_weights      parameters that do not train, and every buffer, as stored (NF4: packed codes + absmax)
    trainable_weights   parameters that train (all of them for full fine-tuning; lora_A/lora_B for LoRA)
    gradients           the ``.grad`` of the trainable parameters after backward
    optimizer_state     every tensor in ``optimizer.state`` (AdamW: two moments per parameter, and a step)
    activations         tensors autograd saves in the forward pass for the backward pass

This module holds the counting only. The trainer's `training_step` fills a `MemoryBreakdown` with it
(`lora_lab.train.measure` runs one such step), and `lora_lab.estimator` runs the very same step on
PyTorch's meta device, where tensors have shapes and dtypes but no data.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import asdict, dataclass, fields

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

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

    def pack(self, t):
        """The pack hook: `add`, keeping ``t`` itself (a subclass may return a handle; `unpack` turns it back)."""
        return self.add(t)

    def unpack(self, packed):
        """The unpack hook: what `pack` returned, as a tensor again."""
        return packed

    @property
    def nbytes(self) -> int:
        return sum(self.sizes.values())

    def __enter__(self) -> "SavedTensors":
        self._hooks = saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)
        self._hooks.__exit__(*exc)


def count_saved(tensors) -> None:
    """Count ``tensors`` in every open `SavedTensors`: for memory kept alive outside autograd's hooks.

    Gradient checkpointing (`lora_lab.train.checkpoint_layers`) keeps each layer's inputs for the recompute,
    and its own hooks hide them from `SavedTensors`; it reports them here.
    """
    for tracker in _ACTIVE:
        for t in tensors:
            tracker.add(t)
