"""Fine-tuning in one call: ``history = finetune(model, task, method="lora")``.

One loop serves every method, so their curves, timings and memory are comparable:

    full    every weight trains (the baseline the LoRA paper compares against)
    lora    apply_lora(model, config): only lora_A / lora_B train (Hu et al. 2021)
    qlora   apply_qlora(model, config): the frozen weights are stored in NF4 (Dettmers et al. 2023)
    None    train whatever already requires grad

Each step is forward, backward, AdamW (Loshchilov & Hutter 2019). The seed is set before the adapters are
created, so the same call gives the same curve, bit for bit, on the same machine (CPU; CUDA kernels,
bitsandbytes' included, are not all deterministic).

`training_step` is that step; `measure` runs one with its memory counted (`lora_lab.memory`), and
`lora_lab.estimator` runs it on the meta device.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .inject import apply_lora
from .lora import LoraConfig
from .loraplus import loraplus_param_groups
from .memory import (MemoryBreakdown, SavedTensors, count_saved, gradient_bytes, optimizer_bytes, peak_rss_bytes,
                     weight_bytes)
from .model import loss_and_logits, resolve_device
from .qlora import apply_qlora
from .train_args import DEFAULT_LR, METHODS, check_finetune_args  # noqa: F401 (METHODS: part of the API)

DIVERGENCE_WINDOW = 10  # steps averaged before calling a run diverged (see `# Note: what counts as diverged`)


class StopTraining(Exception):
    """Raise from a callback to end training early; the message becomes ``History.stopped_reason``."""


@dataclass
class History:
    """What `finetune` records. Steps count optimizer updates: step 0 is the model before training.

    Attributes:
        train_loss: training loss of steps 1, 2, ... (the loss of the batch *before* that step's update).
        eval_steps, eval_loss, eval_accuracy: held-out evaluation at step 0, every ``eval_every`` steps, last.
        eval_token_accuracy: the same evaluations' per-token accuracy, when the task reports one
            (`lora_lab.data.Task.evaluate` does; empty otherwise).
        step_seconds: wall time of each step (steps that measure memory are slower: they run hooks).
        memory_steps, memory: a `MemoryBreakdown` at step 1 and at each evaluation step.
        stopped_reason: None if every step ran; otherwise why training ended early.
    """

    method: str | None = None
    lr: float = 0.0
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    eval_accuracy: list[float] = field(default_factory=list)
    eval_token_accuracy: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    memory_steps: list[int] = field(default_factory=list)
    memory: list[MemoryBreakdown] = field(default_factory=list)
    stopped_reason: str | None = None

    @property
    def steps(self) -> int:
        """Number of completed optimizer steps."""
        return len(self.train_loss)

    def to_dict(self) -> dict:
        """Plain lists and numbers (JSON-serializable), memory as dicts of bytes."""
        return {**asdict(self), "memory": [m.to_dict() for m in self.memory]}


def finetune(model: nn.Module, task, *, method: str | None = "lora", config: LoraConfig | None = None,
             steps: int = 200, lr: float | None = None, batch_size: int = 32, seed: int = 0,
             eval_every: int | None = 50, eval_examples: int | None = None, callback=None,
             callback_every: int = 1, device=None, strict: bool = False, progress: bool = False,
             measure_memory: bool = False, gradient_checkpointing: bool = False, weight_decay: float = 0.0,
             qlora_options: dict | None = None, loraplus_lr_ratio: float | None = None) -> History:
    """Fine-tune ``model`` on ``task`` in place and return the `History`.

    Args:
        model: a causal LM whose ``forward(input_ids, labels=...)`` returns ``(loss, logits)``, like the kit's
            `LlamaForCausalLM`, or an output with ``.loss`` and ``.logits``, like a transformers ``*ForCausalLM``.
            Anything else raises TypeError before the model is changed.
        task: has ``get_batch(split, batch_size, generator)``, ``evaluate(model, split, max_examples)``,
            ``seq_len`` (see `lora_lab.data`).
        method: ``"full"``, ``"lora"``, ``"qlora"`` or None (see the module docstring).
        config: the `LoraConfig` for lora/qlora (default ``LoraConfig(lora_alpha=16)``: r=8 on q_proj and
            v_proj, alpha = 2r as the notebooks use).
        lr: AdamW learning rate; None picks ``DEFAULT_LR[method]``.
        seed: seeds torch before the adapters are created, and the batch order.
        callback: ``callback(history)`` every ``callback_every`` steps and after the last; returning
            False (or raising `StopTraining`) ends training, keeping the history so far.
        device: None picks CUDA when available. "cuda" without CUDA falls back to the CPU with a
            warning, or raises ValueError when ``strict``; another device that is not available raises.
        strict: turn the warnings (CUDA fallback, a loss that turns non-finite or diverges) into ValueErrors.
        progress: show a tqdm progress bar (off by default: notebooks compare their printed outputs).
        measure_memory: record a `MemoryBreakdown` at step 1 and at every evaluation (the steps that measure
            are slower: they run hooks).
        gradient_checkpointing: recompute layer activations in backward (see `checkpoint_layers`).
        qlora_options: keyword arguments for ``apply_qlora`` (``blocksize``, ``double_quant``, ...).
        loraplus_lr_ratio: LoRA+ (`lora_lab.loraplus`): ``lora_B`` and 1-D parameters train at ``lr`` times this,
            the rest at ``lr``; ``weight_decay`` then applies as PEFT's ``loraplus_weight_decay``. None: one rate.

    Returns:
        The `History`. A loss that turns NaN/inf stops training at that step (before its update) with a
        warning and ``stopped_reason`` set; the model keeps the last finite weights. So does a loss that
        diverges: the mean of the last `DIVERGENCE_WINDOW` steps no better than uniform guessing
        (``ln vocab_size``) though the model started better, or twice the loss it started at.

    Every argument is checked before the model changes (before LoRA/QLoRA is applied).
    """
    lr = check_finetune_args(model, task, method=method, config=config, steps=steps, lr=lr, batch_size=batch_size,
                             eval_every=eval_every, callback_every=callback_every, seed=seed,
                             eval_examples=eval_examples, weight_decay=weight_decay,
                             loraplus_lr_ratio=loraplus_lr_ratio)
    device = resolve_device(device, strict)
    torch.manual_seed(seed)  # before the adapters exist: lora_A's init is part of the run
    prepare_model(model, method, config, qlora_options)
    model.to(device).train()
    optimizer = make_optimizer(model, "adamw", lr, weight_decay, loraplus_lr_ratio)
    history = History(method=method, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    evaluate = _evaluator(task, model, history, eval_examples)
    evaluate(0)
    ckpt = checkpoint_layers(model) if gradient_checkpointing else contextlib.nullcontext()
    with ckpt, _progress(steps, method, progress) as bar:
        for step in range(1, steps + 1):
            batch = [t.to(device) for t in task.get_batch("train", batch_size, generator)]
            track = measure_memory and (step == 1 or _is_eval_step(step, eval_every))
            if not _one_step(model, batch, optimizer, history, step, track, strict):
                break
            if _diverged(history, _chance_loss(model), strict):
                break
            bar.update(1)
            bar.set_postfix(loss=f"{history.train_loss[-1]:.4f}", refresh=False)
            if _is_eval_step(step, eval_every):
                evaluate(step)
            if step == steps or step % callback_every == 0:
                if _call_back(callback, history, step):
                    break
    if not history.eval_steps or history.eval_steps[-1] != history.steps:
        evaluate(history.steps)
    model.eval()
    return history


def prepare_model(model: nn.Module, method: str | None, config: LoraConfig | None = None,
                  qlora_options: dict | None = None) -> nn.Module:
    """Make the parameters ``method`` trains the only trainable ones (in place; `estimate` uses this too)."""
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(p.is_floating_point())
    elif method == "lora":
        apply_lora(model, config or LoraConfig(lora_alpha=16))
    elif method == "qlora":
        apply_qlora(model, config or LoraConfig(lora_alpha=16), **(qlora_options or {}))
    return model


def make_optimizer(model: nn.Module, name: str = "adamw", lr: float = 1e-3, weight_decay: float = 0.0,
                   loraplus_lr_ratio: float | None = None) -> torch.optim.Optimizer:
    """AdamW (two moments per trainable parameter) or plain SGD (no state) over the trainable parameters.

    With ``loraplus_lr_ratio`` the parameters come in LoRA+'s groups (`loraplus_param_groups`).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameters; pick method='full', 'lora' or 'qlora'.")
    if loraplus_lr_ratio is not None:
        params = loraplus_param_groups(model, lr, loraplus_lr_ratio, loraplus_weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {name!r}.")


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
    count_saved(args)  # the checkpoint keeps the layer's inputs alive for the recompute
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


# ------------------------------------------------------------------------------------------ one step

def training_step(model: nn.Module, batch, optimizer: torch.optim.Optimizer, *, track: bool = False):
    """Forward, backward and ``optimizer.step()`` on one batch; `finetune`, `measure` and `estimate` all run this.

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


# --------------------------------------------------------------------------------------------- helpers

def _one_step(model, batch, optimizer, history: History, step: int, track: bool, strict: bool = False) -> bool:
    """Run one step and record it; False when the loss is not finite (then nothing was updated)."""
    start = time.perf_counter()
    loss, breakdown = training_step(model, batch, optimizer, track=track)
    value = loss.item()  # waits for the GPU, so the step's time is complete
    if not math.isfinite(value):
        history.stopped_reason = (f"the loss became {value} at step {step} with lr={history.lr:g}; training "
                                  "stopped before that update. Lower the learning rate.")
        _warn_or_raise(history.stopped_reason, strict)
        return False
    history.train_loss.append(value)
    history.step_seconds.append(time.perf_counter() - start)
    if breakdown is not None:
        history.memory_steps.append(step)
        history.memory.append(breakdown)
    return True


def _warn_or_raise(message: str, strict: bool) -> None:
    if strict:
        raise ValueError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


def _chance_loss(model) -> float | None:
    """``ln vocab_size``: the loss of a model that guesses every token uniformly (None if the size is unknown)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    return math.log(vocab) if isinstance(vocab, int) and vocab > 1 else None


def _diverged(history: History, chance: float | None, strict: bool) -> bool:
    """True (after a warning, and with ``stopped_reason`` set) when the recent training loss has diverged.

    # Note: what counts as diverged
    The mean loss of the last `DIVERGENCE_WINDOW` steps, against the eval loss at step 0 (``start``): no better
    than uniform guessing (``chance = ln vocab_size``) although the model started clearly better, or twice
    ``start``. A too-large learning rate ends up at one of the two (measured on the kit's base model: lr=1
    for LoRA sits at 5.7 nats, lr=1e6 for full fine-tuning at exactly ln 34 = 3.53); the kit's runs at their
    default learning rates stay below 2.1 in every window, from a start of 2.7.
    """
    if history.steps < DIVERGENCE_WINDOW or not history.eval_loss:
        return False
    recent = sum(history.train_loss[-DIVERGENCE_WINDOW:]) / DIVERGENCE_WINDOW
    start = history.eval_loss[0]
    at_chance = chance is not None and start < 0.9 * chance and recent >= 0.99 * chance  # 1%: fp32 rounding
    if not (at_chance or recent > 2 * start):
        return False
    what = (f"no better than guessing uniformly (ln vocab_size = {chance:.2f})" if at_chance
            else "more than twice where it started")
    history.stopped_reason = (f"training diverged: the mean loss of steps {history.steps - DIVERGENCE_WINDOW + 1}-"
                              f"{history.steps} is {recent:.2f}, {what}; it started at {start:.2f}. lr={history.lr:g} "
                              "is too high: lower the learning rate.")
    _warn_or_raise(history.stopped_reason, strict)
    return True


def _evaluator(task, model, history: History, max_examples):
    """A function that evaluates on the eval split and appends the result to the history."""
    def evaluate(step: int) -> None:
        was_training = model.training
        result = task.evaluate(model, split="eval", max_examples=max_examples)
        model.train(was_training)
        history.eval_steps.append(step)
        history.eval_loss.append(float(result["loss"]))
        history.eval_accuracy.append(float(result["accuracy"]))
        if "token_accuracy" in result:
            history.eval_token_accuracy.append(float(result["token_accuracy"]))
    return evaluate


def _call_back(callback, history: History, step: int) -> bool:
    """Run the callback; True means stop."""
    if callback is None:
        return False
    try:
        keep_going = callback(history)
    except StopTraining as stop:
        history.stopped_reason = f"stopped by the callback at step {step}: {stop}"
        return True
    if keep_going is False:
        history.stopped_reason = f"the callback returned False at step {step}"
        return True
    return False


def _is_eval_step(step: int, eval_every: int | None) -> bool:
    return bool(eval_every) and step % eval_every == 0


@contextlib.contextmanager
def _progress(steps: int, method, enabled: bool):
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc=f"{method or 'custom'} fine-tuning", disable=not enabled, leave=False)
    try:
        yield bar
    finally:
        bar.close()
