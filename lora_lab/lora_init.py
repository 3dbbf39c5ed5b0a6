"""How LoRA's factors start: PEFT's ``init_lora_weights`` choices, as functions over tensors.

    True          A ~ Kaiming-uniform(a=sqrt(5)), B = 0          (loralib, PEFT's default; Hu et al. 2021)
    False         A and B both Kaiming-uniform: B A != 0, so the model does NOT start as the base (PEFT: for tests)
    "gaussian"    A ~ N(0, 1/r^2), B = 0                          (PEFT's std=1/r)
    "pissa"       W0 = U S V^T; B = U_r sqrt(S_r/s), A = sqrt(S_r/s) V_r^T; base <- W0 - s B A
                  (Meng et al. 2024, arXiv 2404.02948, Eq. 2-4); "pissa_niter_N": the same from
                  ``torch.svd_lowrank`` with N subspace iterations (fast, random)
    "olora"       W0 = Q R; B = Q[:, :r], A = R[:r]; base <- W0 - s B A   (Büyükakyüz 2024, arXiv 2406.01775)
    "loftq"       alternate Q_t = NF4(W0 - s B A), s B A = SVD_r(W0 - dequant(Q_t)); base <- Q_T
                  (Li et al. 2023, arXiv 2310.08659, Algorithm 1)

The first three leave the base weight alone and start at ``B A = 0`` (except False). The last three change
the base weight, so that ``base + s B A`` still equals ``W0`` at the start (exactly for PiSSA and OLoRA up to
rounding, as closely as 4 bits allow for LoftQ), and training moves the adapter from the most important
directions of ``W0`` (PiSSA, OLoRA) or from a better 4-bit starting point (LoftQ).

# Note: what a changed base means for saving
An adapter trained from PiSSA or OLoRA belongs with its residual base ``W0 - s B0 A0``, not with ``W0``. PEFT
(and `lora_lab.save_adapter`) writes ``init_lora_weights="pissa"``/``"olora"`` into the adapter's config, and
loading it onto the original model recomputes that residual (the same deterministic SVD or QR) before the
trained factors are copied in. ``"pissa_niter_N"`` (random) and ``"loftq"`` (4-bit) cannot be recomputed that
way; `save_adapter`'s ``path_initial_model_for_weight_conversion`` instead turns the adapter into a plain LoRA
adapter of rank 2r on ``W0``: ``s (B A - B0 A0) = s [B, -B0] [A; A0]`` (PEFT's ``subtract_mutated_init``).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .nf4 import QuantizedWeight, dequantize, quantize

INIT_CHOICES = (True, False, "gaussian", "pissa", "pissa_niter_[N]", "olora", "loftq")
BASE_CHANGING = ("pissa", "olora", "loftq")  # (prefixes) the inits that rewrite the base weight
_NITER = re.compile(r"pissa_niter_(\d+)")


@dataclass
class LoftQConfig:
    """PEFT's ``LoftQConfig``: ``loftq_bits`` (4: NF4, the kit's quantizer) and ``loftq_iter`` (alternations T)."""

    loftq_bits: int = 4
    loftq_iter: int = 1


def check_init_lora_weights(value) -> None:
    """Refuse anything but PEFT's choices that the kit implements (`INIT_CHOICES`)."""
    if isinstance(value, bool) or value in ("gaussian", "pissa", "olora", "loftq"):
        return
    if isinstance(value, str) and _NITER.fullmatch(value):
        return
    raise ValueError(f"init_lora_weights must be one of {INIT_CHOICES} (N a whole number, e.g. 'pissa_niter_4'), "
                     f"got {value!r}; PEFT's 'eva', 'corda', 'orthogonal' and others are not implemented here.")


def check_loftq_config(init_lora_weights, loftq_config) -> dict:
    """PEFT's rule: ``"loftq"`` needs a `LoftQConfig` (or its dict); returns it as a dict (PEFT stores a dict).

    The kit quantizes with its NF4 only, so ``loftq_bits`` must be 4 (PEFT also has int8).
    """
    if isinstance(loftq_config, LoftQConfig):
        loftq_config = asdict(loftq_config)
    if not isinstance(loftq_config, dict):
        raise TypeError(f"loftq_config must be a LoftQConfig or a dict, got {type(loftq_config).__name__}.")
    if init_lora_weights != "loftq":
        if loftq_config:
            raise ValueError("loftq_config is only used with init_lora_weights='loftq'; drop it or set that init.")
        return {}
    if not loftq_config:
        raise ValueError("init_lora_weights='loftq' needs loftq_config=LoftQConfig() (loftq_bits=4, loftq_iter=1).")
    unknown = set(loftq_config) - {"loftq_bits", "loftq_iter"}
    bits, iters = loftq_config.get("loftq_bits", 4), loftq_config.get("loftq_iter", 1)
    if unknown:
        raise ValueError(f"loftq_config has unknown keys {sorted(unknown)}; it takes loftq_bits and loftq_iter.")
    if bits != 4 or isinstance(bits, bool):
        raise ValueError(f"loftq_bits must be 4 (lora_lab quantizes to NF4 only), got {bits!r}.")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"loftq_iter must be a positive int (alternating steps), got {iters!r}.")
    return {"loftq_bits": 4, "loftq_iter": iters}


def changes_base(init_lora_weights) -> bool:
    """True for the inits that rewrite the base weight (PiSSA, OLoRA, LoftQ)."""
    return isinstance(init_lora_weights, str) and init_lora_weights.startswith(BASE_CHANGING)


def pissa_niter(init_lora_weights) -> int | None:
    """N of ``"pissa_niter_N"``; None for the exact SVD and every other init."""
    match = _NITER.fullmatch(init_lora_weights) if isinstance(init_lora_weights, str) else None
    return int(match.group(1)) if match else None


# ------------------------------------------------------------------------ inits that keep the base

def reset_factors(lora_A: nn.Linear, lora_B: nn.Linear, init_lora_weights, r: int) -> None:
    """True, False or "gaussian" on the factors ``lora_A`` (r, in) and ``lora_B`` (out, r), in place.

    False keeps what ``nn.Linear`` drew for both (Kaiming-uniform), as PEFT does: ``B A`` is not zero.
    """
    if init_lora_weights is False:
        return
    if init_lora_weights is True:
        nn.init.kaiming_uniform_(lora_A.weight, a=math.sqrt(5))
    elif init_lora_weights == "gaussian":
        nn.init.normal_(lora_A.weight, std=1 / r)
    else:
        raise ValueError(f"reset_factors takes True, False or 'gaussian', got {init_lora_weights!r}.")
    nn.init.zeros_(lora_B.weight)


# ------------------------------------------------------------------------ inits that change the base

@torch.no_grad()
def pissa_init(weight: torch.Tensor, r: int, scaling: float, niter: int | None = None):
    """PiSSA: the adapter takes the r principal singular directions of ``W0``, the base keeps the rest.

        W0 = U S V^T,   B = U_r sqrt(S_r / s),   A = sqrt(S_r / s) V_r^T,   W_res = W0 - s B A

    so ``s B A = U_r S_r V_r^T`` (the best rank-r approximation) and ``W_res + s B A = W0``.

    Args:
        weight: ``W0`` (out, in), any float dtype; the SVD runs in float32.
        r: Rank. scaling: ``s`` (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA).
        niter: None for ``torch.linalg.svd``; N for ``torch.svd_lowrank(W0, r, niter=N)`` (random projections
            from torch's global generator: cheaper on large matrices, approximately the same directions).

    Returns:
        ``(A, B, W_res)``: A (r, in) and B (out, r) in float32, W_res (out, in) in ``weight``'s dtype.
    """
    w = _float32(weight, "PiSSA")
    if niter is None:
        U, S, Vh = torch.linalg.svd(w, full_matrices=False)  # (out, k), (k,), (k, in)
        Ur, Sr, Vhr = U[:, :r], S[:r] / scaling, Vh[:r]
    else:
        Ur, Sr, V = torch.svd_lowrank(w, r, niter=niter)  # (out, r), (r,), (in, r)
        Sr, Vhr = Sr / scaling, V.t()
    A = torch.diag(torch.sqrt(Sr)) @ Vhr  # (r, in)
    B = Ur @ torch.diag(torch.sqrt(Sr))  # (out, r)
    return A, B, (w - scaling * B @ A).to(weight.dtype)


@torch.no_grad()
def olora_init(weight: torch.Tensor, r: int, scaling: float):
    """OLoRA: orthonormal B from the QR decomposition of ``W0``.

        W0 = Q R,   B = Q[:, :r],   A = R[:r],   W_res = W0 - s B A

    Unlike PiSSA the factors are not divided by ``s`` (PEFT's ``olora_init``); ``W_res`` subtracts ``s B A``,
    so ``W_res + s B A = W0`` whatever ``s`` is.

    Returns:
        ``(A, B, W_res)``: A (r, in), B (out, r) in float32, W_res (out, in) in ``weight``'s dtype.
    """
    w = _float32(weight, "OLoRA")
    Q, R = torch.linalg.qr(w)  # (out, k), (k, in)
    A, B = R[:r].contiguous(), Q[:, :r].contiguous()
    return A, B, (w - scaling * B @ A).to(weight.dtype)


@torch.no_grad()
def loftq_init(weight: torch.Tensor, r: int, scaling: float, num_iter: int = 1, *, blocksize: int = 64,
               double_quant: bool = False, quant_type: str = "nf4"):
    """LoftQ (Li et al. 2023, Algorithm 1): a 4-bit base and a rank-r adapter fitted to each other.

        for t = 1..T:   Q_t = quantize(W0 - s B_{t-1} A_{t-1})      (B_0 A_0 = 0: plain QLoRA's Q)
                        s B_t A_t = SVD_r(W0 - dequant(Q_t))        (the best rank-r fit of the 4-bit error)

    so ``dequant(Q_T) + s B A`` is closer to ``W0`` than ``dequant(quantize(W0))``. As in PiSSA the SVD's
    ``sqrt(S_r)`` is split over both factors and divided by ``s``; PEFT's ``loftq_init`` does not divide, which
    equals this only at ``s = 1`` (``lora_alpha = r``). PEFT quantizes with bitsandbytes' NF4 without double
    quantization (``double_quant=False`` here is that, bit for bit); `apply_qlora` passes the layer's own settings.

    Args:
        weight: ``W0`` (out, in), any float dtype; all arithmetic is float32.
        num_iter: T, PEFT's ``loftq_iter``.
        blocksize, double_quant, quant_type: the 4-bit format, as in `lora_lab.nf4.quantize`.

    Returns:
        ``(A, B, Q_T)``: A (r, in), B (out, r) in float32, and the base's `QuantizedWeight` (of ``weight``'s dtype).
    """
    w = _float32(weight, "LoftQ")
    target = w.clone()
    for step in range(num_iter):
        q = quantize(target.to(weight.dtype), quant_type, blocksize, double_quant)
        A, B = fit_quantization_error(w, dequantize(q, torch.float32), r, scaling)
        if step + 1 < num_iter:
            target = w - scaling * B @ A
    return A, B, q


@torch.no_grad()
def fit_quantization_error(weight: torch.Tensor, dequantized: torch.Tensor, r: int, scaling: float):
    """One LoftQ fit: the factors whose ``s B A`` is the best rank-r approximation of ``W0 - dequant(Q)``.

        W0 - dequant(Q) = U S V^T,   B = U_r sqrt(S_r / s),   A = sqrt(S_r / s) V_r^T

    This is one step of `loftq_init`, and what PEFT's ``replace_lora_weights_loftq`` puts on an already
    quantized layer (there without the division by ``s``: the same at ``s = 1``).

    Args:
        weight: ``W0`` (out, in). dequantized: ``dequant(Q)`` (out, in), the 4-bit base the layer computes with.
        r: Rank. scaling: ``s``.

    Returns:
        ``(A, B)``: (r, in) and (out, r), float32.
    """
    error = _float32(weight, "LoftQ") - dequantized.to(torch.float32)  # (out, in): what 4 bits lost
    U, S, Vh = torch.linalg.svd(error, full_matrices=False)
    B = U[:, :r] * torch.sqrt(S[:r] / scaling)  # (out, r)
    A = torch.sqrt(S[:r] / scaling)[:, None] * Vh[:r]  # (r, in)
    return A, B


def subtract_initial(A: torch.Tensor, B: torch.Tensor, A0: torch.Tensor, B0: torch.Tensor):
    """A trained PiSSA/OLoRA adapter as a plain LoRA adapter of rank 2r on the original ``W0``.

        W_res + s B A = W0 + s (B A - B0 A0) = W0 + s [B, -B0] [A; A0]

    (PEFT's ``subtract_mutated_init``). Keeping the same ``s`` at rank 2r needs ``lora_alpha`` doubled (times
    sqrt(2) with rsLoRA), which `lora_lab.save_adapter` writes into the converted config.

    Args:
        A, B: the trained factors, (r, in) and (out, r). A0, B0: the factors right after init, same shapes.

    Returns:
        ``(A', B')``: (2r, in) and (out, 2r).
    """
    if A.shape != A0.shape or B.shape != B0.shape:
        raise ValueError(f"The initial adapter's factors have shapes {tuple(A0.shape)}, {tuple(B0.shape)}, the "
                         f"trained ones {tuple(A.shape)}, {tuple(B.shape)}; pass the adapter saved right after init.")
    return torch.cat([A, A0], dim=0), torch.cat([B, -B0], dim=1)


def quantization_error(weight: torch.Tensor, q: QuantizedWeight, A: torch.Tensor | None = None,
                       B: torch.Tensor | None = None, scaling: float = 1.0) -> float:
    """``||W0 - (dequant(Q) + s B A)||_F`` in float64 (LoftQ's objective; without A, B: plain QLoRA's error)."""
    approx = dequantize(q, torch.float32).double()
    if A is not None:
        approx = approx + scaling * (B.double() @ A.double())
    return float(torch.linalg.matrix_norm(weight.double() - approx))


def _float32(weight, what: str) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise TypeError(f"{what} decomposes a floating-point base weight; this base holds packed 4-bit codes. "
                        "Use apply_qlora(model, config), which decomposes the weights before quantizing them.")
    if weight.is_meta:
        raise ValueError(f"{what} needs the base weight's values; this one is on the meta device.")
    w = weight.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise ValueError(f"{what} refuses a base weight holding NaN or inf; load finite weights first.")
    return w
