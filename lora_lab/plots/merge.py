"""Figures for the merge notebook: where a QLoRA adapter can be merged, and when requantizing erases it.

A QLoRA adapter was trained against the dequantized base, so the weight the trained model really uses is

    W_ref = dequant(NF4(W)) + ΔW,        ΔW = (α / r) · B A                       (QLoRA §3, Eq. 5)

and the three usual merge targets differ from it by
    (a) W16 + ΔW                 error  W16 − dequant(NF4(W)): the quantization error the adapter never saw
    (b) dequant(NF4(W)) + ΔW     error  only 16-bit rounding of W_ref
    (c) NF4(W_ref), requantized  error  NF4 rounding of W_ref; entries with |ΔW| below half a code gap
                                        (times the block's absmax) round back to the old code: ΔW is erased.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch

from ..nf4 import nearest_code
from ..i18n import tr
from ._figure import new_figure, palette_color

TARGETS = ("a: W16 + ΔW", "b: dequant(NF4 W) + ΔW", "c: NF4(b), requantized")


def merge_targets(weight: torch.Tensor, delta: torch.Tensor, quantize: Callable, dtype=torch.bfloat16):
    """The reference weight and the three merge targets, all returned in float32.

    Args:
        weight: the original 16/32-bit weight W, (out, in).
        delta: the adapter's update ΔW = scaling · B @ A, (out, in).
        quantize: `quantize(w)` returning an object with `.dequantize()` (e.g. `lora_lab.nf4.quantize_nf4`).
        dtype: the 16-bit dtype the merged weights (a) and (b) are kept in.

    Returns:
        (w_ref, {target name: merged weight}).
    """
    w, d = weight.detach().float(), delta.detach().float()
    w_dq = quantize(w).dequantize().float()
    w_ref = w_dq + d
    merged = {
        TARGETS[0]: (w + d).to(dtype).float(),
        TARGETS[1]: w_ref.to(dtype).float(),
        TARGETS[2]: quantize(w_ref).dequantize().float(),
    }
    return w_ref, merged


def merge_errors(weight, delta, quantize: Callable, x: torch.Tensor | None = None, dtype=torch.bfloat16):
    """Weight errors (target − W_ref) and, given inputs `x` (..., in), output errors x·(target − W_ref)ᵀ."""
    w_ref, merged = merge_targets(weight, delta, quantize, dtype)
    weight_err = {k: (m - w_ref).flatten() for k, m in merged.items()}
    out_err = {} if x is None else {k: (x.float() @ (m - w_ref).T).flatten() for k, m in merged.items()}
    return weight_err, out_err


def element_absmax(w_dq: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Each element's block absmax, recovered from a dequantized weight (the block's largest |value| is ±absmax
    exactly, because its code is ±1). Same shape as `w_dq`; `QuantizedWeight.block_absmax()` is the (n_blocks,)
    version read from the quantized state itself."""
    flat = w_dq.detach().float().flatten()
    pad = (-flat.numel()) % blocksize
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1, keepdim=True).expand_as(blocks)
    return absmax.flatten()[: flat.numel()].view_as(w_dq)


def codes_of(w_dq: torch.Tensor, codebook: torch.Tensor, blocksize: int = 64) -> torch.Tensor:
    """Index (into the sorted codebook) of each element of a dequantized weight: nearest code to w / absmax."""
    cb = codebook.float().sort().values
    absmax = element_absmax(w_dq, blocksize)
    v = torch.where(absmax > 0, w_dq.float() / absmax.clamp_min(1e-30), torch.zeros_like(absmax))
    return nearest_code(v, cb).long()


def erase_threshold(w_dq: torch.Tensor, delta: torch.Tensor, codebook: torch.Tensor, blocksize: int = 64):
    """Per element, the largest |ΔW| that requantization rounds back to the same code: half the gap to the
    neighbouring code in the direction of ΔW, times the block's absmax. 0 where there is no neighbour that way
    (an edge code pushed outward changes the block's absmax instead, so it is never erased)."""
    cb = codebook.float().sort().values
    idx = codes_of(w_dq, cb, blocksize)
    nb = (idx + torch.where(delta >= 0, 1, -1)).clamp(0, len(cb) - 1)
    return (cb[nb] - cb[idx]).abs() / 2 * element_absmax(w_dq, blocksize)


def _dequantized(quantize: Callable, w: torch.Tensor, blocksize: int) -> torch.Tensor:
    """dequant(quantize(w)) in float32, after checking the quantizer's blocksize (where it reports one) is the
    `blocksize` the codes and thresholds are read with: a mismatch would silently misplace every block."""
    q = quantize(w)
    if getattr(q, "blocksize", blocksize) != blocksize:
        raise ValueError(f"quantize uses blocksize {q.blocksize} but blocksize={blocksize} was passed; pass a "
                         "quantizer with the same blocksize, e.g. "
                         f"functools.partial(quantize_nf4, blocksize={blocksize}).")
    return q.dequantize().float()


class Erasure(NamedTuple):
    erased: float  # fraction of entries whose requantized code equals the old code (only absmax may move)
    predicted: float  # fraction with |ΔW| < erase_threshold
    agreement: float  # fraction where measured and predicted erasure agree
    kept: float  # ‖NF4(W_ref) − dequant(NF4 W)‖ projected on ΔW, over ‖ΔW‖²: 1 = fully kept, 0 = erased


def erasure(weight, delta, quantize: Callable, codebook, blocksize: int = 64) -> Erasure:
    """Measure how much of ΔW survives merging into NF4 and requantizing, and check the half-gap rule."""
    w_dq = _dequantized(quantize, weight.detach().float(), blocksize)
    d = delta.detach().float()
    w_after = _dequantized(quantize, w_dq + d, blocksize)
    after = w_after - w_dq  # the update that survives
    erased = (codes_of(w_after, codebook, blocksize) == codes_of(w_dq, codebook, blocksize)) & (d != 0)
    predicted = (d.abs() < erase_threshold(w_dq, d, codebook, blocksize)) & (d != 0)
    nz = max(int((d != 0).sum()), 1)
    kept = float((after * d).sum() / (d * d).sum().clamp_min(1e-30))
    return Erasure(int(erased.sum()) / nz, int(predicted.sum()) / nz,
                   float((erased == predicted).float().mean()), kept)


def erasure_ratio(weight, delta, quantize: Callable, codebook, blocksize: int = 64) -> torch.Tensor:
    """log10(|ΔW| / threshold) per nonzero entry: below 0, requantization erases the entry (edge codes left out)."""
    w_dq = _dequantized(quantize, weight.detach().float(), blocksize)
    thr = erase_threshold(w_dq, delta.float(), codebook, blocksize)
    keep = (delta != 0) & (thr > 0)
    return torch.log10(delta.float().abs()[keep] / thr[keep])


def histogram(values: torch.Tensor, bins: np.ndarray) -> np.ndarray:
    """Fraction of `values` in each bin (values outside are clipped into the edge bins)."""
    v = np.clip(values.detach().float().numpy(), bins[0], bins[-1])
    counts, _ = np.histogram(v, bins=bins)
    return counts / max(len(v), 1)


def plot_error_histograms(weight_err: Mapping[str, torch.Tensor], out_err: Mapping[str, torch.Tensor] | None = None,
                          bins: int = 60):
    """Histograms (log count) of weight errors and output errors per merge target; returns (figure, axes)."""
    panels = [("weight error (target − W_ref)", weight_err)] + ([("output error", out_err)] if out_err else [])
    fig, axes = new_figure(width=7.0, height=3.2, ncols=len(panels))
    axes = np.atleast_1d(axes)
    for ax, (title, errs) in zip(axes, panels):
        errs = {k: e.detach().float().cpu() for k, e in errs.items()}
        lim = max(float(e.abs().max()) for e in errs.values()) or 1.0
        edges = np.linspace(-lim, lim, bins + 1)
        for i, (name, e) in enumerate(errs.items()):
            ax.hist(e.float().numpy(), bins=edges, histtype="step", color=palette_color(i), label=tr(name), log=True)
        ax.set_title(tr(title), fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=8, frameon=False)  # no data
    return fig, axes


def plot_erasure_histogram(hists: Sequence[np.ndarray], bins: np.ndarray):
    """Bars of the fraction of ΔW's entries in each bin of log10(|ΔW| / threshold), showing ``hists[0]``, with the
    erase threshold dashed at 0 (left of it, requantizing rounds the entry back to its old code).

    The y axis holds the tallest of `hists` and stays fixed, so `update_erasure_histogram` moves only the bars.
    Returns (figure, bars).
    """
    fig, ax = new_figure(width=6.0, height=3.0)
    centers, width = (bins[:-1] + bins[1:]) / 2, bins[1] - bins[0]
    bars = ax.bar(centers, hists[0], width=width, color=palette_color(0))
    ax.axvline(0, color=palette_color(5), linestyle="--", label=tr("erase threshold"))
    ax.set_xlabel(tr("log10(|ΔW| / (½ code gap × absmax))"))
    ax.set_ylabel(tr("fraction of entries"))
    ax.set_ylim(0, max(float(h.max()) for h in hists) * 1.1)
    ax.legend(fontsize=8)
    return fig, bars


def update_erasure_histogram(bars, hist: np.ndarray) -> None:
    """Set the bars drawn by `plot_erasure_histogram` to the fractions `hist` (same bins)."""
    for rect, h in zip(bars, hist):
        rect.set_height(h)
