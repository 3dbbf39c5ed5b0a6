"""Tests for lora_lab.plots.merge: the three merge targets and the half-gap rule for erased updates.

A small blockwise absmax quantizer over a 15-level codebook stands in for NF4 here: the rules under test hold
for any codebook that contains -1, 0 and 1 (NF4 itself is tested against bitsandbytes in test_nf4.py).
"""

import functools

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_lab.plots.merge import (TARGETS, element_absmax, erase_threshold, erasure, merge_errors,
                                  plot_erasure_histogram, plot_error_histograms, update_erasure_histogram)

CODEBOOK = torch.linspace(-1, 1, 15)
BLOCK = 64


class Quantized:
    def __init__(self, w):
        self.shape = w.shape
        flat = w.flatten().view(-1, BLOCK)
        self.absmax = flat.abs().amax(1, keepdim=True)
        self.codes = ((flat / self.absmax).unsqueeze(-1) - CODEBOOK).abs().argmin(-1)

    def dequantize(self):
        return (CODEBOOK[self.codes] * self.absmax).view(self.shape)


def make(seed, delta_scale):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 64, generator=g) * 0.05
    delta = torch.randn(16, 64, generator=g) * delta_scale
    return w, delta


def test_target_b_differs_from_reference_only_by_16bit_rounding():
    w, d = make(0, 1e-3)
    errs, _ = merge_errors(w, d, Quantized)  # kept in bfloat16, the default
    w_ref = (Quantized(w).dequantize() + d).flatten()
    # Rounding to nearest moves each value by at most half a bfloat16 ulp: eps/2 of its magnitude.
    assert (errs[TARGETS[1]].abs() <= torch.finfo(torch.bfloat16).eps / 2 * w_ref.abs()).all()
    assert errs[TARGETS[1]].abs().max() > 0  # and the rounding is there: float32 values do not fit in 8 bits


def test_target_a_error_is_the_quantization_error():
    w, d = make(1, 1e-3)
    errs, _ = merge_errors(w, d, Quantized, dtype=torch.float32)
    # (W + ΔW) − (dq(W) + ΔW) = W − dq(W); float32 addition reorders rounding: tolerance of a few ulp of 0.1
    torch.testing.assert_close(errs[TARGETS[0]], (w - Quantized(w).dequantize()).flatten(), rtol=0, atol=1e-7)


def test_output_errors_are_inputs_times_weight_errors():
    w, d = make(2, 1e-3)
    x = torch.randn(5, 64)
    werr, oerr = merge_errors(w, d, Quantized, x=x, dtype=torch.float32)
    # a (5x64)·(64x16) float32 matmul against the same product done elementwise: 1e-6 covers summation order
    torch.testing.assert_close(oerr[TARGETS[2]], (x @ werr[TARGETS[2]].view(16, 64).T).flatten(), atol=1e-6, rtol=0)


def test_element_absmax_recovers_each_block_max():
    w, _ = make(3, 0)
    torch.testing.assert_close(element_absmax(Quantized(w).dequantize()).view(-1, BLOCK)[:, 0],
                               w.view(-1, BLOCK).abs().amax(1))


def test_threshold_is_half_gap_times_absmax_in_the_interior():
    w_dq = torch.zeros(BLOCK)
    w_dq[0] = 2.0  # absmax 2; the other entries sit on code 0
    thr = erase_threshold(w_dq, torch.ones(BLOCK), CODEBOOK)
    gap = float(CODEBOOK[8] - CODEBOOK[7])
    assert thr[1].item() == pytest.approx(gap / 2 * 2.0)
    assert thr[0].item() == 0  # the top code pushed outward has no neighbour: never erased


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 1000), st.sampled_from([1e-5, 1e-4, 1e-3]))
def test_half_gap_rule_predicts_measured_erasure(seed, scale):
    w, d = make(seed, scale)  # |ΔW| well below the block absmax (~0.12), as for a fine-tune's update
    e = erasure(w, d, Quantized, CODEBOOK)
    # the rule holds with the block absmax fixed; ΔW on each block's largest entry rescales the block by
    # about |ΔW|/absmax (< 1%), which flips only entries sitting that close to a decision boundary
    assert e.agreement > 0.97


def test_tiny_updates_are_erased_and_large_ones_kept():
    w, _ = make(4, 0)
    tiny = erasure(w, torch.full_like(w, 1e-6), Quantized, CODEBOOK)
    large = erasure(w, make(5, 0.05)[1], Quantized, CODEBOOK)
    # every code survives; only the block maxima move (by 1e-6), a projection of ~1e-4 of ΔW onto itself
    assert tiny.erased == 1.0 and abs(tiny.kept) < 0.01
    assert large.erased < 0.2 and large.kept > 0.8


def test_histograms_draw_one_series_per_target():
    w, d = make(6, 1e-3)
    werr, oerr = merge_errors(w, d, Quantized, x=torch.randn(3, 64))
    fig, axes = plot_error_histograms(werr, oerr)
    assert len(axes) == 2 and len(axes[0].patches) == 3
    # one legend, below both panels (outside every axes), so it covers no histogram
    assert [ax.get_legend() for ax in axes] == [None, None] and len(fig.legends) == 1
    fig.canvas.draw()
    legend_box = fig.legends[0].get_window_extent()
    assert all(legend_box.y1 <= ax.get_window_extent().y0 for ax in axes)


@settings(max_examples=4, deadline=None)
@given(st.integers(0, 1000), st.sampled_from([1e-4, 1e-3]))
def test_half_gap_rule_holds_for_real_nf4_with_double_quant(seed, scale):
    from lora_lab.nf4 import nf4_codebook, quantize_nf4

    w, d = make(seed, scale)
    e = erasure(w, d, quantize_nf4, nf4_codebook())
    # as above, plus double quantization re-rounds each block's absmax (8-bit, relative error < 1%), which flips
    # more entries near a boundary: over every seed hypothesis can draw (0-1000) the lowest agreement is 0.965
    assert e.agreement > 0.96


def test_erasure_rejects_a_quantizer_with_another_blocksize():
    # codes and thresholds are read per block of `blocksize`: a quantizer with other blocks would misplace them all
    from lora_lab.nf4 import nf4_codebook, quantize_nf4

    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="blocksize"):
        erasure(w, 1e-3 * w, quantize_nf4, nf4_codebook(), blocksize=256)  # quantize_nf4's default is 64
    erasure(w, 1e-3 * w, functools.partial(quantize_nf4, blocksize=256), nf4_codebook(), blocksize=256)


def test_erasure_histogram_fixes_its_axis_over_all_steps_and_moves_only_bars():
    bins = np.linspace(-3.0, 2.0, 6)
    hists = [np.array([0.5, 0.3, 0.2, 0.0, 0.0]), np.array([0.0, 0.1, 0.2, 0.3, 0.4])]
    fig, bars = plot_erasure_histogram(hists, bins)
    ax = fig.axes[0]
    assert [r.get_height() for r in bars] == pytest.approx(list(hists[0]))
    assert ax.get_ylim() == pytest.approx((0, 0.5 * 1.1))
    assert [line.get_xdata()[0] for line in ax.get_lines()] == [0]  # the erase threshold
    update_erasure_histogram(bars, hists[1])
    assert [r.get_height() for r in bars] == pytest.approx(list(hists[1]))
    assert ax.get_ylim() == pytest.approx((0, 0.5 * 1.1))
