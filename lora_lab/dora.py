"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353, §4, Eq. 5).

    W' = m * (W0 + s B A) / ||W0 + s B A||_c

DoRA splits the adapted weight into a magnitude and a direction. The direction ``W0 + s B A`` is LoRA's
weight; dividing by its norm per output unit makes it a unit vector, and a trained magnitude ``m`` (out,)
sets its length again. ``m`` starts at ``||W0||_c``, so at ``B = 0`` the layer computes ``W0 x`` exactly.
The paper writes weights as (in, out) and takes column norms, ``||.||_c``; in torch's (out, in) layout those
are the norms of the rows, one per output feature, which is what `weight_norm` computes.

The names are PEFT's: ``use_dora=True`` in `LoraConfig`, the magnitude in ``lora_magnitude_vector[name].weight``.
The functions below are the math; `LoRALinear` calls them for an adapter that has a magnitude.

# Note: why the norm is detached
§4.3 of the paper treats ``||W0 + s B A||_c`` as a constant in backward: it still follows ``B A`` in the forward
pass, but no gradient flows through it, which saves the memory of its graph (a full (out, in) weight per layer)
at a negligible cost in accuracy. PEFT does the same, so the gradients of ``A``, ``B`` and ``m`` here equal PEFT's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MagnitudeVector(nn.Module):
    """The trainable magnitude ``m`` (out,) of one DoRA adapter, as ``.weight`` (PEFT's ``DoraLinearLayer``).

    Args:
        magnitude: The starting value, ``||W0 + s B A||_c`` (out,), copied into a new Parameter.
    """

    def __init__(self, magnitude: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(magnitude.detach().clone())  # (out,)

    def extra_repr(self) -> str:
        return f"out_features={self.weight.numel()}"


def base_weight(base_layer: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W0`` (out, in) of a linear layer in ``dtype``; a 4-bit layer (``dequantized_weight``) is dequantized."""
    dequantize = getattr(base_layer, "dequantized_weight", None)
    weight = dequantize(dtype) if callable(dequantize) else getattr(base_layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"DoRA normalizes the base weight, and a {type(base_layer).__name__} has no floating-point "
                        "weight (nor dequantized_weight()); use plain LoRA (use_dora=False) on it.")
    return weight if dtype is None else weight.to(dtype)


def weight_norm(weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """``||W0 + s B A||_c``: the L2 norm of each output feature's row, (out,), in ``weight``'s dtype.

    Args:
        weight: ``W0`` (out, in).
        lora_weight: ``B A`` (out, in), unscaled.
        scaling: ``s``, LoRA's ``lora_alpha / r`` (1 when ``lora_weight`` is already scaled).
    """
    return torch.linalg.norm(weight + scaling * lora_weight, dim=1).to(weight.dtype)


def magnitude_scale(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, magnitude: torch.Tensor,
                    scaling: float) -> torch.Tensor:
    """``m / ||W0 + s B A||_c`` (out,), with the norm detached (see `# Note: why the norm is detached`).

    Args:
        weight: ``W0`` (out, in); lora_A: ``A`` (r, in); lora_B: ``B`` (out, r); magnitude: ``m`` (out,).
    """
    with torch.no_grad():  # the norm is a constant for autograd: no graph for the (out, in) sum
        norm = weight_norm(weight, (lora_B @ lora_A).to(weight.dtype), scaling)
    return magnitude / norm


def dora_forward(x: torch.Tensor, result: torch.Tensor, *, weight: torch.Tensor, bias: torch.Tensor | None,
                 magnitude: torch.Tensor, lora_A: nn.Module, lora_B: nn.Module, dropout: nn.Module, scaling: float,
                 training: bool) -> torch.Tensor:
    """The DoRA layer's output ``m / ||W0 + s B A||_c * (W0 x + s B A x) + bias``; (..., in) -> (..., out).

    It is written as a correction added to the base output ``result = W0 x + bias``, as PEFT computes it:
    ``result + (k - 1) * W0 x + k * s B A x`` with ``k = m / ||W0 + s B A||_c`` (out,). Without dropout (or in
    eval mode) ``W0 x`` is ``result - bias``, so the base matmul is not repeated. With dropout ``d``, the update
    sees ``d(x)`` and so does its ``W0`` term, ``W0 d(x)``, recomputed here (PEFT's choice: the rescaling acts on
    the same input as the update), while ``result`` keeps the undropped ``W0 x``.

    Args:
        x: The adapter's input (..., in), in the adapter's dtype.
        result: ``base_layer(x)`` (..., out).
        weight: ``W0`` (out, in) in ``x``'s dtype (dequantized for a 4-bit base).
        bias: ``base_layer.bias`` (out,) or None.
        magnitude: ``m`` (out,).
        lora_A, lora_B: The adapter's ``A`` (r, in) and ``B`` (out, r) linear modules.
        dropout: The adapter's dropout module (``nn.Identity`` for none).
        scaling: ``s``.
        training: Whether the layer is in training mode (dropout is active).
    """
    scale = magnitude_scale(weight, lora_A.weight, lora_B.weight, magnitude, scaling).view(1, -1)  # (1, out)
    if isinstance(dropout, nn.Identity) or not training:
        base_out = result if bias is None else result - bias  # W0 x, (..., out)
    else:
        x = dropout(x)
        base_out = F.linear(x, weight)  # W0 d(x), (..., out)
    return result + ((scale - 1) * base_out + scale * lora_B(lora_A(x)) * scaling)


def merged_weight(weight: torch.Tensor, delta: torch.Tensor,
                  magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``W' = m / ||W0 + dW||_c * (W0 + dW)`` (out, in) in ``weight``'s dtype, and its norm ``||W0 + dW||_c`` (out,).

    Args:
        weight: ``W0`` (out, in).
        delta: LoRA's update ``dW = s B A`` (out, in), already scaled.
        magnitude: ``m`` (out,).
    """
    norm = weight_norm(weight, delta, 1).detach()
    factor = (magnitude / norm).view(-1, 1)  # (out, 1)
    return (factor * (weight + delta)).to(weight.dtype), norm


def unmerged_weight(merged: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor,
                    norm: torch.Tensor) -> torch.Tensor:
    """``W0 = W' / (m / norm) - dW`` (out, in): undoes `merged_weight` up to rounding, with the norm it returned."""
    factor = (magnitude / norm).view(-1, 1)  # (out, 1)
    return (merged / factor - delta).to(merged.dtype)


def delta_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's whole change of the weight, ``W' - W0`` (out, in), for LoRA's update ``dW = s B A``."""
    return merged_weight(weight, delta, magnitude)[0] - weight


def magnitude_direction_change(weight0: torch.Tensor, weight: torch.Tensor) -> tuple[float, float]:
    """The DoRA paper's ΔM and ΔD (§3, Eq. 3-4) of one weight matrix between a start and a checkpoint.

        ΔM = mean_n |m_t^n - m_0^n|,        ΔD = mean_n (1 - cos(V_t^n, W_0^n))

    over the output features n, where ``m^n = ||W^n||`` is the norm of output n's weights and ``V^n`` their
    direction. Any checkpoint reads the same way: a fully fine-tuned ``W_t``, LoRA's ``W0 + s B A`` and DoRA's
    ``m V / ||V||_c`` (whose norm is ``m`` and whose direction is ``V``'s), so one function serves all three.
    The paper's (in, out) columns are the rows of torch's (out, in) layout, as in `weight_norm`. A pure rescale
    of each output's weights changes ΔM only; a rotation at equal norms changes ΔD only.

    Args:
        weight0: ``W_0`` (out, in), the weight training started from (for QLoRA, the dequantized base).
        weight: ``W_t`` (out, in), the weight the layer applies at the checkpoint.

    Returns:
        ``(ΔM, ΔD)`` as floats, computed in float64.
    """
    if weight0.shape != weight.shape or weight0.dim() != 2:
        raise ValueError(f"ΔM and ΔD compare two weights of one (out, in) shape, got {tuple(weight0.shape)} and "
                         f"{tuple(weight.shape)}.")
    w0, wt = weight0.detach().double().cpu(), weight.detach().double().cpu()
    if not (torch.isfinite(w0).all() and torch.isfinite(wt).all()):
        raise ValueError("ΔM and ΔD need finite weights; this checkpoint holds NaN or inf.")
    n0, nt = torch.linalg.norm(w0, dim=1), torch.linalg.norm(wt, dim=1)  # (out,)
    if not (n0 > 0).all() or not (nt > 0).all():
        raise ValueError("An output feature's weights are all zero, so it has no direction; ΔD is undefined.")
    cos = (w0 * wt).sum(dim=1) / (n0 * nt)  # (out,)
    return float((nt - n0).abs().mean()), float((1 - cos).mean())
