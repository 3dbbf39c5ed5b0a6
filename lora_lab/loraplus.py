"""LoRA+: train ``B`` with a larger learning rate than ``A`` (Hayou et al. 2024, arXiv 2402.12354).

    eta_B = loraplus_lr_ratio * eta_A

With one learning rate for both factors, the paper shows (§3, for width n -> infinity) that either ``A`` or
``B`` learns too slowly: efficient feature learning needs ``eta_B / eta_A = Theta(n)``. In practice a fixed
ratio of 2^4 = 16 (their default recommendation for LLaMA-size models) speeds fine-tuning up and often improves
it. Nothing else changes: the same layers, the same AdamW; only the optimizer's parameter groups differ.

The groups are PEFT's (``peft.optimizers.create_loraplus_optimizer``): ``A`` and every other matrix at ``lr``;
LoRA embedding factors at ``loraplus_lr_embedding``; ``B`` and every 1-D parameter (biases, norms) at
``lr * loraplus_lr_ratio``, with weight decay ``loraplus_weight_decay`` except on biases and LayerNorm weights.
"""

from __future__ import annotations

import math

import torch
from torch import nn

GROUPS = ("groupA", "embedding", "groupB", "groupB_no_decay")  # PEFT's names, in PEFT's order


def loraplus_param_groups(model: nn.Module, lr: float, loraplus_lr_ratio: float, *,
                          loraplus_weight_decay: float = 0.0, loraplus_lr_embedding: float = 1e-6) -> list[dict]:
    """The optimizer's parameter groups for LoRA+, PEFT's four, in PEFT's order (an empty one is kept).

    Args:
        model: A model with trainable LoRA factors (``lora_B`` in a parameter's name, as in PEFT).
        lr: ``eta_A``, the learning rate of ``A`` and of every trainable matrix that is not ``B``.
        loraplus_lr_ratio: ``eta_B / eta_A``; the paper recommends 16 (>= 1; PEFT does not enforce it).
        loraplus_weight_decay: Weight decay of every group but ``groupB_no_decay`` (PEFT's default 0).
        loraplus_lr_embedding: Learning rate of LoRA factors on embedding layers (PEFT's default 1e-6).

    Returns:
        ``[{"params": [...], "weight_decay": ..., "lr": ...}, ...]`` for ``torch.optim.AdamW(groups, lr=lr)``.
    """
    for value, what in ((lr, "lr"), (loraplus_lr_ratio, "loraplus_lr_ratio"),
                        (loraplus_lr_embedding, "loraplus_lr_embedding")):
        _check_positive(value, what)
    if isinstance(loraplus_weight_decay, bool) or not isinstance(loraplus_weight_decay, (int, float)) or \
            not 0 <= loraplus_weight_decay < math.inf:
        raise ValueError(f"loraplus_weight_decay must be a finite number >= 0, got {loraplus_weight_decay!r}.")
    in_norms = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    groups: dict[str, list[torch.Tensor]] = {name: [] for name in GROUPS}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_embedding_" in name:  # PEFT's lora_embedding_A / lora_embedding_B on an nn.Embedding
            groups["embedding"].append(p)
        elif "lora_B" in name or p.ndim == 1:
            decays = id(p) not in in_norms and "bias" not in name
            groups["groupB" if decays else "groupB_no_decay"].append(p)
        else:
            groups["groupA"].append(p)
    if not any("lora_B" in name and p.requires_grad for name, p in model.named_parameters()):
        raise ValueError("LoRA+ scales the learning rate of lora_B, and no lora_B trains in this model; apply_lora "
                         "or apply_qlora first (or train without loraplus_lr_ratio).")
    rates = {"groupA": lr, "embedding": loraplus_lr_embedding, "groupB": lr * loraplus_lr_ratio,
             "groupB_no_decay": lr * loraplus_lr_ratio}
    return [{"params": groups[g], "weight_decay": 0.0 if g == "groupB_no_decay" else loraplus_weight_decay,
             "lr": rates[g]} for g in GROUPS]


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], *, lr: float,
                              loraplus_lr_ratio: float, **kwargs) -> torch.optim.Optimizer:
    """PEFT's ``create_loraplus_optimizer``: ``optimizer_cls`` over `loraplus_param_groups`.

    ``loraplus_weight_decay`` and ``loraplus_lr_embedding`` in ``kwargs`` go to the groups, the rest (betas,
    eps, ...) to the optimizer. As in PEFT, a ``weight_decay`` in ``kwargs`` is overridden by the groups'.
    """
    groups = loraplus_param_groups(model, lr, loraplus_lr_ratio,
                                   loraplus_weight_decay=kwargs.pop("loraplus_weight_decay", 0.0),
                                   loraplus_lr_embedding=kwargs.pop("loraplus_lr_embedding", 1e-6))
    return optimizer_cls(groups, lr=lr, **kwargs)


def _check_positive(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{what} must be a positive, finite number, got {value!r}.")
