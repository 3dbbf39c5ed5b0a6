"""What `lora_lab.train.finetune` accepts: every argument checked before the model changes.

`check_finetune_args` raises ValueError/TypeError with a sentence that says what to do, and leaves the model as it
was (the one forward it runs is under no_grad, in eval mode, with the training flags put back).
"""

from __future__ import annotations

import math

import torch

from .lora import LoraConfig
from .model import loss_and_logits

METHODS = ("full", "lora", "qlora", None)
# Defaults for the kit's small models: adapters start at B = 0 and need a larger step than full weights.
DEFAULT_LR = {"full": 1e-3, "lora": 5e-3, "qlora": 5e-3, None: 1e-3}


def check_finetune_args(model, task, *, method, config, steps, lr, batch_size, eval_every, callback_every, seed,
                        eval_examples, weight_decay, loraplus_lr_ratio=None) -> float:
    """Validate all of `finetune`'s arguments against the model and the task; returns the learning rate to use."""
    lr = _check_basics(model, task, method, config, steps, lr, batch_size, eval_every, callback_every)
    _check_more(model, task, seed, eval_examples, weight_decay)
    _check_loraplus(model, method, loraplus_lr_ratio)
    _check_outputs(model, task)
    return lr


def _positive_int(value, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


def _check_basics(model, task, method, config, steps, lr, batch_size, eval_every, callback_every) -> float:
    """Validate everything before the model changes; returns the learning rate to use."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    if config is not None and (method not in ("lora", "qlora") or not isinstance(config, LoraConfig)):
        raise ValueError("config is a LoraConfig and only applies to method='lora' or 'qlora'.")
    if method == "qlora" and config is not None and config.modules_to_save:
        raise ValueError("method='qlora' does not implement modules_to_save; use method='lora' to train those "
                         "modules in full, or leave modules_to_save out.")
    for value, name in ((steps, "steps"), (batch_size, "batch_size"), (callback_every, "callback_every")):
        _positive_int(value, name)
    if eval_every is not None:
        _positive_int(eval_every, "eval_every")
    lr = DEFAULT_LR[method] if lr is None else lr
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number (or None for the default), got {lr!r}.")
    n_train = _split_size(task, "train")
    if n_train is not None and batch_size > n_train:
        raise ValueError(f"batch_size={batch_size} is larger than the task's train split ({n_train} examples); "
                         "use a smaller batch_size.")
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_positions is not None and task.seq_len > max_positions:
        raise ValueError(f"The task's sequences have {task.seq_len} tokens but the model handles at most "
                         f"{max_positions} (max_position_embeddings); pick a task with shorter sequences.")
    if method is None and not any(p.requires_grad for p in model.parameters()):
        raise ValueError("method=None trains what already requires grad, and nothing does; pick a method.")
    return float(lr)


def _check_more(model, task, seed, eval_examples, weight_decay) -> None:
    """The checks `_check_basics` leaves out: seed, eval_examples, weight_decay, the eval split, the vocabulary."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}.")
    if eval_examples is not None:
        _positive_int(eval_examples, "eval_examples (or None for the whole eval split)")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not 0 <= weight_decay < math.inf:
        raise ValueError(f"weight_decay must be a finite number >= 0 (0 turns it off), got {weight_decay!r}.")
    if _split_size(task, "eval") == 0:
        raise ValueError("The task's eval split is empty, so nothing can be evaluated; build the task with "
                         "n_eval >= 1.")
    model_vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    task_vocab = getattr(getattr(task, "tokenizer", None), "vocab_size", None)
    if isinstance(model_vocab, int) and isinstance(task_vocab, int) and task_vocab > model_vocab:
        raise ValueError(f"The task's tokenizer has {task_vocab} token ids but the model's vocabulary only "
                         f"{model_vocab}; build the model with vocab_size >= {task_vocab}.")


def _check_loraplus(model, method, ratio) -> None:
    """LoRA+ needs LoRA factors: method 'lora'/'qlora', or None on a model whose lora_B trains."""
    if ratio is None:
        return
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < math.inf:
        raise ValueError(f"loraplus_lr_ratio must be a positive, finite number (the paper suggests 16), or None "
                         f"to train A and B at one rate; got {ratio!r}.")
    has_b = any("lora_B" in n and p.requires_grad for n, p in model.named_parameters())
    if method == "full" or (method is None and not has_b):
        raise ValueError("loraplus_lr_ratio sets lora_B's learning rate, and this run trains no LoRA factors; use "
                         "method='lora' or 'qlora', or drop loraplus_lr_ratio.")


def _check_outputs(model, task) -> None:
    """One no-grad forward on one training example, so that a model whose outputs the loop cannot read is
    refused (TypeError, see `lora_lab.model.loss_and_logits`) before anything is changed."""
    input_ids, labels = task.get_batch("train", 1, torch.Generator().manual_seed(0))
    device = next(model.parameters(), torch.empty(0)).device
    modes = {m: m.training for m in model.modules()}
    model.eval()  # no dropout, so the global RNG is not drawn from
    try:
        with torch.no_grad():
            loss_and_logits(model(input_ids.to(device), labels=labels.to(device)), need_loss=True)
    finally:
        for module, training in modes.items():
            module.training = training


def _split_size(task, split: str) -> int | None:
    """Number of examples in ``task.<split>`` (a list of examples), or None if the task does not say."""
    examples = getattr(task, split, None)
    return len(examples) if hasattr(examples, "__len__") else None
