"""Intruder dimensions: singular vectors of a fine-tuned weight that the pretrained weight did not have.

Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence" (arXiv 2410.21228), §3: take
the top-k singular vectors of the fine-tuned ``W``; one is an *intruder* when its largest cosine similarity with
every singular vector of the pretrained ``W0`` is below a threshold ε,

    u_j is an intruder  <=>  max_i |cos(u_j(W), u_i(W0))| < ε,   j = 1 .. k.

Singular vectors here are the left ones (columns of U, the output side), as in PEFT's
``peft.tuners.lora.intruders.reduce_intruder_dimension``, whose defaults (``top_k=10``, ``threshold_epsilon=0.5``)
this module keeps. Its mitigation (the paper's §6) scales the intruders down and refits a rank-r adapter:

    W' = W + (λ - 1) Σ_{j intruder} s_j u_j v_j^T,      B' A' = rank-r SVD of (W' - W0) / scaling.

# Note: what mitigation_lambda means
In PEFT's code λ is the share of each intruder that is *kept*: λ = 1 changes nothing, λ = 0 removes the
intruders entirely (the paper's Fig. 8 sweeps the same λ). PEFT's docstring says the opposite ("the relative
portion ... that is subtracted"); the code is what runs, and `tests/test_spectral.py` checks ours against it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .inject import lora_layers
from .lora import LoRALinear
from .multi_adapter import add_adapter, set_adapter

TOP_K, EPSILON, LAMBDA = 10, 0.5, 0.75  # PEFT's defaults for top_k, threshold_epsilon, mitigation_lambda


def _check(top_k, threshold_epsilon) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}.")
    if isinstance(threshold_epsilon, bool) or not isinstance(threshold_epsilon, (int, float)) \
            or not 0 < threshold_epsilon <= 1:
        raise ValueError(f"threshold_epsilon is a cosine similarity in (0, 1], got {threshold_epsilon!r}.")


def _matrix(weight, name: str) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"{name} must be a 2-D weight (out, in), got {getattr(weight, 'shape', type(weight))}.")
    if not torch.isfinite(weight).all():
        raise ValueError(f"{name} holds NaN or inf; singular vectors of it mean nothing.")
    return weight.detach().double().cpu()


def max_cosine(w0: torch.Tensor, w: torch.Tensor, top_k: int = TOP_K) -> torch.Tensor:
    """For each of the top-k left singular vectors of ``w``: its largest |cosine| with any of ``w0``'s.

    Args:
        w0: the pretrained weight (out, in).
        w: the fine-tuned weight, same shape.
        top_k: how many of ``w``'s singular vectors, largest singular value first (fewer if ``w`` has fewer).

    Returns:
        (min(top_k, out, in),) float64, entries in [0, 1]: 1 means ``w0`` has that direction too.
    """
    _check(top_k, EPSILON)
    w0, w = _matrix(w0, "w0"), _matrix(w, "w")
    if w0.shape != w.shape:
        raise ValueError(f"w0 and w must have the same shape, got {tuple(w0.shape)} and {tuple(w.shape)}.")
    u0 = torch.linalg.svd(w0, full_matrices=False).U  # (out, m): every singular vector of W0
    u = torch.linalg.svd(w, full_matrices=False).U[:, :top_k]  # (out, k): the top-k of W
    return (u.T @ u0).abs().amax(dim=1)  # (k,): unit vectors, so the dot product is the cosine


def intruder_dimensions(w0: torch.Tensor, w: torch.Tensor, top_k: int = TOP_K,
                        threshold_epsilon: float = EPSILON) -> list[int]:
    """Indices (0 = largest singular value) of ``w``'s top-k singular vectors that are intruders (`max_cosine`
    below ``threshold_epsilon``): Shuttleworth et al. 2024, arXiv 2410.21228, §3."""
    _check(top_k, threshold_epsilon)
    return torch.nonzero(max_cosine(w0, w, top_k) < threshold_epsilon).flatten().tolist()


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The weight a linear layer applies: ``W0 + scaling * B A`` for a `LoRALinear`, ``weight`` otherwise."""
    return module.weight.detach()


def model_cosines(base: nn.Module, tuned: nn.Module, modules=("q_proj", "v_proj"),
                  top_k: int = TOP_K) -> dict[str, torch.Tensor]:
    """`max_cosine` of every layer whose name ends with one of ``modules``: ``{name: (k,)}``, in model order.

    Args:
        base: the pretrained model (its weights are W0).
        tuned: a fine-tuned copy of it, fully fine-tuned or with LoRA (unmerged or merged), same module names.
    """
    before = dict(base.named_modules())
    names = [n for n, m in tuned.named_modules() if n.endswith(tuple(modules)) and hasattr(m, "weight")]
    if not names:
        raise ValueError(f"No layer of the tuned model ends with one of {tuple(modules)}.")
    missing = [n for n in names if n not in before]
    if missing:
        raise ValueError(f"The base model has no layers {missing}; pass the model the tuned one was copied from.")
    return {n: max_cosine(effective_weight(before[n]), effective_weight(tuned.get_submodule(n)), top_k) for n in names}


def count_intruders(cosines: dict[str, torch.Tensor], threshold_epsilon: float = EPSILON) -> int:
    """How many singular vectors in `model_cosines`' result fall below ``threshold_epsilon``, over all layers."""
    _check(TOP_K, threshold_epsilon)
    return sum(int((c < threshold_epsilon).sum()) for c in cosines.values())


def mitigated_factors(w0: torch.Tensor, delta: torch.Tensor, r: int, scaling: float, top_k: int = TOP_K,
                      threshold_epsilon: float = EPSILON, mitigation_lambda: float = LAMBDA):
    """PEFT's intruder mitigation for one layer: new LoRA factors whose update keeps λ of each intruder.

    Args:
        w0: the base weight (out, in).
        delta: the adapter's update ``scaling * B A`` (out, in).
        r, scaling: the adapter's rank and scaling; the refit keeps rank r, and its ``B A`` is divided by
            ``scaling`` so that the layer, which multiplies by it again, applies the mitigated update.

    Returns:
        ``(A, B, intruders)``: A (r, in) and B (out, r) in ``w0``'s dtype, the intruders' indices. With no
        intruder, A and B are None (PEFT copies the old factors unchanged).
    """
    if not math.isfinite(mitigation_lambda):
        raise ValueError(f"mitigation_lambda must be a finite number, got {mitigation_lambda!r}.")
    merged = _matrix(w0, "w0") + _matrix(delta, "delta")  # (out, in), float64
    intruders = intruder_dimensions(w0, merged, top_k, threshold_epsilon)
    if not intruders:
        return None, None, []
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    spike = (u[:, intruders] * s[intruders]) @ vh[intruders]  # Σ_j s_j u_j v_j^T over the intruders
    new_delta = (merged + (mitigation_lambda - 1) * spike - w0.double().cpu()) / scaling
    u, s, vh = torch.linalg.svd(new_delta, full_matrices=False)
    root = s[:r].sqrt()  # split s evenly between B and A, as PEFT does
    b, a = u[:, :r] * root, root[:, None] * vh[:r]  # (out, r), (r, in)
    return a.to(w0.dtype), b.to(w0.dtype), intruders


def _mitigable_layers(model: nn.Module, adapter: str) -> dict[str, LoRALinear]:
    layers = {n: m for n, m in lora_layers(model).items() if adapter in m.lora_A}
    if not layers:
        raise ValueError(f"No layer of the model has an adapter named {adapter!r}.")
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"{name} is merged; unmerge_lora(model) first (the mitigation reads W0).")
        if adapter in layer.lora_magnitude_vector:
            raise ValueError("DoRA adapters are not supported: PEFT's mitigation reads s B A, not DoRA's update.")
    return layers


def reduce_intruder_dimension(model: nn.Module, old_adapter_name: str = "default",
                              new_adapter_name: str = "intruder_reduced", top_k: int = TOP_K,
                              threshold_epsilon: float = EPSILON, mitigation_lambda: float = LAMBDA) -> dict:
    """Add adapter ``new_adapter_name``: ``old_adapter_name`` with its intruders scaled by λ, and make it active.

    PEFT's ``reduce_intruder_dimension`` (same arguments and defaults; arXiv 2410.21228 §6), on a lora_lab model.
    `set_adapter(model, old_adapter_name)` switches back. Everything is checked before the model changes.

    Returns:
        ``{layer name: number of intruders}`` for every layer with the old adapter (PEFT prints these).
    """
    _check(top_k, threshold_epsilon)
    if isinstance(mitigation_lambda, bool) or not isinstance(mitigation_lambda, (int, float)) \
            or not math.isfinite(mitigation_lambda):
        raise ValueError(f"mitigation_lambda must be a finite number, got {mitigation_lambda!r}.")
    configs = getattr(model, "peft_config", {})
    if old_adapter_name not in configs:
        raise ValueError(f"The model has no adapter {old_adapter_name!r}; adapters: {list(configs)}.")
    layers = _mitigable_layers(model, old_adapter_name)
    refits = {}
    for name, layer in layers.items():
        w0 = layer.base_layer.weight.detach()
        refits[name] = mitigated_factors(w0, layer.get_delta_weight(old_adapter_name), layer.r[old_adapter_name],
                                         layer.scaling[old_adapter_name], top_k, threshold_epsilon,
                                         mitigation_lambda)
    add_adapter(model, new_adapter_name, configs[old_adapter_name])  # checks the name before anything changes
    with torch.no_grad():
        for name, layer in layers.items():
            a, b, _ = refits[name]
            old_a, old_b = layer.factors(old_adapter_name)
            layer.lora_A[new_adapter_name].weight.copy_(old_a if a is None else a)
            layer.lora_B[new_adapter_name].weight.copy_(old_b if b is None else b)
    set_adapter(model, new_adapter_name)
    return {name: len(refit[2]) for name, refit in refits.items()}
