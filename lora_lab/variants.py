"""LoRA's variants on a 4-bit base, measured: where each starts, how it trains, how it moves the weights.

    QLoRA   NF4(W0) + s B A, B = 0: starts with all of NF4's error       (Dettmers et al. 2023, arXiv 2305.14314)
    LoftQ   Q_T + s B A fitted to W0 - dequant(Q_T)                        (Li et al. 2023, arXiv 2310.08659)
    PiSSA   NF4(W0 - s B A) + s B A, B A from W0's top singular directions (Meng et al. 2024, arXiv 2404.02948)
    QDoRA   m (dequant(Q) + s B A) / ||dequant(Q) + s B A||_c              (Liu et al. 2024, arXiv 2402.09353)

The starting error is the model's logits against the 16-bit model's on the same tokens (PEFT's LoftQ example
measures it so): every variant but plain QLoRA and QDoRA, which start at B = 0, spends its adapter on
undoing some of the 4-bit error before training begins. `compare_training` then trains each variant on one
budget (steps, batch, learning rate, seed, rank) and keeps weight snapshots for the DoRA paper's ΔM-ΔD view
(`lora_lab.dora.magnitude_direction_change`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from . import dora
from .inject import lora_layers
from .lora import LoraConfig, LoRALinear
from .lora_init import LoftQConfig, fit_quantization_error
from .qlora import apply_qlora
from .train import History, finetune

VARIANTS = ("QLoRA", "LoftQ", "PiSSA", "QDoRA")
_INIT = {"QLoRA": {}, "LoftQ": {"init_lora_weights": "loftq"}, "PiSSA": {"init_lora_weights": "pissa"},
         "QDoRA": {"use_dora": True}}


@dataclass(frozen=True)
class LogitError:
    """Mean absolute and mean squared difference of two models' logits (float64), PEFT's LoftQ example's pair."""

    mae: float
    mse: float


def variant_config(name: str, r: int = 8, lora_alpha: float = 16, target_modules="all-linear",
                   loftq_iter: int = 1) -> LoraConfig:
    """The `LoraConfig` of one of `VARIANTS` (``loftq_iter`` is LoftQ's T, PEFT's ``LoftQConfig.loftq_iter``)."""
    if name not in _INIT:
        raise ValueError(f"variant must be one of {VARIANTS}, got {name!r}.")
    extra = dict(_INIT[name])
    if name == "LoftQ":
        extra["loftq_config"] = LoftQConfig(loftq_iter=loftq_iter)
    return LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=target_modules, **extra)


@torch.no_grad()
def model_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The logits (batch, seq, vocab) of ``model`` on ``ids`` in eval mode, float64 on the CPU."""
    was_training = model.training
    out = model.eval()(ids)
    model.train(was_training)
    logits = out[1] if isinstance(out, tuple) else getattr(out, "logits", out)
    return logits.detach().double().cpu()


def logit_error(model: nn.Module, reference: torch.Tensor, ids: torch.Tensor) -> LogitError:
    """How far ``model``'s logits on ``ids`` lie from ``reference`` (the 16-bit model's, from `model_logits`).

    Raises:
        ValueError: the shapes differ (other tokens), or the model's logits hold NaN or inf.
    """
    logits = model_logits(model, ids)
    if logits.shape != reference.shape:
        raise ValueError(f"The reference logits have shape {tuple(reference.shape)}, the model's on these ids "
                         f"{tuple(logits.shape)}; compute the reference with model_logits on the same ids.")
    if not torch.isfinite(logits).all():
        raise ValueError("The model's logits hold NaN or inf; its weights are broken, so no error can be measured.")
    diff = logits - reference.double()
    return LogitError(mae=float(diff.abs().mean()), mse=float((diff ** 2).mean()))


def starting_errors(base: nn.Module, configs: dict, ids: torch.Tensor, **qlora_options) -> dict:
    """Each config's 4-bit model (`apply_qlora` on a copy of ``base``) against ``base`` itself, before training.

    Args:
        base: The 16-bit model (left unchanged). configs: ``{label: LoraConfig}``. ids: (batch, seq) tokens.
        qlora_options: `apply_qlora`'s keywords (``blocksize``, ``double_quant``, ...), the same for every config.

    Returns:
        ``{label: LogitError}``.
    """
    if not configs or not all(isinstance(c, LoraConfig) for c in configs.values()):
        raise TypeError("configs must be a non-empty {label: LoraConfig}, e.g. {'LoftQ': variant_config('LoftQ')}.")
    reference = model_logits(base, ids)
    return {label: logit_error(apply_qlora(copy.deepcopy(base), config, **qlora_options), reference, ids)
            for label, config in configs.items()}


def error_sweep(base: nn.Module, ids: torch.Tensor, ranks, variants: dict, **qlora_options) -> dict:
    """`starting_errors` at every rank: ``{r: {label: LogitError}}`` for ``variants = {label: make(r)}``.

    Args:
        variants: ``{label: make}`` where ``make(r)`` returns that variant's `LoraConfig` at rank r.
    """
    return {r: starting_errors(base, {label: make(r) for label, make in variants.items()}, ids, **qlora_options)
            for r in ranks}


def weight_error(model: nn.Module, base: nn.Module) -> float:
    """``sqrt(sum over LoRA layers of ||W0 - W_applied||_F^2)`` in float64: LoftQ's objective over the model.

    ``W0`` is ``base``'s 16-bit weight of the same name, ``W_applied`` what the 4-bit layer computes with
    (`applied_weights`: ``dequant(Q) + s B A``, or DoRA's weight).
    """
    names = list(lora_layers(model))
    if not names:
        raise ValueError("The model has no LoRA layers; call apply_qlora(model, config) first.")
    applied = applied_weights(model, names)
    total = sum(float(((base.get_submodule(n).weight.detach().double().cpu() - applied[n].double()) ** 2).sum())
                for n in names)
    return math.sqrt(total)


@torch.no_grad()
def loftq_with_callback(model: nn.Module, base: nn.Module, ids: torch.Tensor) -> list[str]:
    """PEFT's ``replace_lora_weights_loftq(model, callback=...)`` on the kit's QLoRA model, greedy, in place.

    Layer by layer, put LoftQ's one-shot factors (`lora_init.fit_quantization_error`: the best rank-r fit of
    ``W0 - dequant(Q)``, with ``W0`` read from ``base``) on the layer's adapter and keep them only if the
    model's logit MSE against ``base`` on ``ids`` went down; otherwise restore the factors it had. This is the
    callback of PEFT's ``examples/loftq_finetuning``: a layer-wise fit that makes the whole model worse is not kept.

    Args:
        model: An `apply_qlora` model (plain init, so that every adapter starts at ``B A = 0``, or any other).
        base: The 16-bit model it was quantized from, with the same module names.
        ids: (batch, seq) tokens on which the logits are compared.

    Returns:
        The names of the layers whose LoftQ factors were kept, in the model's order.
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError("The model has no LoRA layers; call apply_qlora(model, config) first.")
    reference = model_logits(base, ids)
    best, kept = logit_error(model, reference, ids).mse, []
    for name, layer in layers.items():
        adapter = layer.active_adapter
        A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
        before = A.clone(), B.clone()
        new_A, new_B = fit_quantization_error(base.get_submodule(name).weight, dora.base_weight(
            layer.base_layer, torch.float32), layer.r[adapter], layer.scaling[adapter])
        A.copy_(new_A)
        B.copy_(new_B)
        error = logit_error(model, reference, ids).mse
        if error < best:
            best, kept = error, kept + [name]
        else:
            A.copy_(before[0])
            B.copy_(before[1])
    return kept


# ---------------------------------------------------------------------------------------- training

def applied_weights(model: nn.Module, names) -> dict:
    """The weight each named layer applies, (out, in) float32 on the CPU: ``W`` of a plain layer, and for a LoRA
    layer ``W0 + get_delta_weight()`` (LoRA's ``W0 + s B A``, DoRA's ``m V / ||V||_c``; ``W0`` dequantized)."""
    out = {}
    for name in names:
        layer = model.get_submodule(name)
        with torch.no_grad():
            if isinstance(layer, LoRALinear):
                w = dora.base_weight(layer.base_layer, torch.float32) + layer.get_delta_weight(dtype=torch.float32)
            else:
                w = dora.base_weight(layer, torch.float32)
        out[name] = w.detach().cpu().clone()
    return out


@dataclass
class VariantRun:
    """One variant's equal-budget run: its `History` and ``weights[step][name]`` (out, in) at the kept steps."""

    history: History
    weights: dict = field(default_factory=dict)
    trainable: int = 0


def compare_training(base: nn.Module, task, configs: dict, *, steps: int = 60, lr: float = 1e-3,
                     batch_size: int = 16, seed: int = 0, eval_every: int = 5, eval_examples: int = 64,
                     snapshot_names=(), snapshot_steps=(), qlora_options: dict | None = None) -> dict:
    """Train every variant from a copy of ``base`` on one budget, and keep snapshots of some weights.

    Each run has the same steps, batch size, learning rate, seed (so the same batches) and evaluation; only
    the config differs. A config of None is full fine-tuning of the 16-bit model (the DoRA paper's reference).

    Args:
        configs: ``{label: LoraConfig or None}``; a LoraConfig is applied with `apply_qlora` (the NF4 base).
        snapshot_names: layer names whose applied weights (`applied_weights`) are kept, at step 0 (after the
            adapters are put on, before training) and at each of ``snapshot_steps``.

    Returns:
        ``{label: VariantRun}``.
    """
    unknown = [s for s in snapshot_steps if not (isinstance(s, int) and 0 < s <= steps)]
    if unknown:
        raise ValueError(f"snapshot_steps must be whole steps in 1..{steps}, got {unknown}.")
    if not all(c is None or isinstance(c, LoraConfig) for c in configs.values()) or not configs:
        raise TypeError("configs must be a non-empty {label: LoraConfig or None (full fine-tuning)}.")
    runs = {}
    for label, config in configs.items():
        torch.manual_seed(seed)  # before the adapters exist, as finetune does: lora_A's init is part of the run
        model = copy.deepcopy(base)
        method = "full" if config is None else None
        if config is not None:
            apply_qlora(model, config, **(qlora_options or {}))
        run = VariantRun(history=History(), weights={0: applied_weights(model, snapshot_names)})

        def keep(history, model=model, run=run):
            if history.steps in snapshot_steps:
                run.weights[history.steps] = applied_weights(model, snapshot_names)

        run.history = finetune(model, task, method=method, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                               eval_every=eval_every, eval_examples=eval_examples, callback=keep)
        run.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        runs[label] = run
    return runs


def magnitude_direction_points(run: VariantRun) -> dict:
    """ΔM and ΔD of every snapshot against the run's step 0: ``{name: [(step, ΔM, ΔD), ...]}`` (DoRA Fig. 2)."""
    start = run.weights[0]
    return {name: [(step, *dora.magnitude_direction_change(w0, run.weights[step][name]))
                   for step in sorted(run.weights) if step > 0] for name, w0 in start.items()}


def correlation(points: dict) -> float:
    """Pearson's r between ΔD and ΔM over all (layer, checkpoint) points of `magnitude_direction_points`.

    The DoRA paper reads the sign of this slope: negative for full fine-tuning and DoRA, positive for LoRA.
    """
    pairs = [(d, m) for series in points.values() for _, m, d in series]
    if len(pairs) < 3:
        raise ValueError(f"A correlation needs at least 3 (ΔD, ΔM) points, got {len(pairs)}; keep more snapshots.")
    x = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    y = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float((x ** 2).sum() * (y ** 2).sum()))
    if denominator == 0:
        raise ValueError("ΔD or ΔM is the same at every point, so they have no correlation.")
    return float((x * y).sum()) / denominator
