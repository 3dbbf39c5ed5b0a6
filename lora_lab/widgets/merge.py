"""Widgets for the merge notebook: a slider on training length that shows when requantization erases ΔW."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import ipywidgets as widgets
import numpy as np
import torch

from ..plots.merge import erasure, erasure_ratio, histogram, plot_erasure_histogram, update_erasure_histogram
from ..i18n import tr
from ._view import FigureView, e2e_slider

BINS = np.linspace(-3.0, 2.0, 51)  # log10(|ΔW| / threshold): from 1/1000 of the threshold to 100x it


def erasure_table(snapshots: Mapping[int, tuple[torch.Tensor, torch.Tensor]], quantize: Callable, codebook,
                  blocksize: int = 64) -> dict[int, dict]:
    """Per training step: the histogram of log10(|ΔW|/threshold) over `BINS` and the `Erasure` summary.

    Args:
        snapshots: `{step: (weight, delta)}`; weight is the original W, delta the adapter's ΔW at that step
            (several layers may be concatenated along dim 0).
    """
    table = {}
    for step, (w, d) in sorted(snapshots.items()):
        table[step] = {"hist": histogram(erasure_ratio(w, d, quantize, codebook, blocksize), BINS),
                       "summary": erasure(w, d, quantize, codebook, blocksize)}
    return table


def requant_explorer(table: Mapping[int, dict]) -> widgets.VBox:
    """A slider over training steps; the histogram shows |ΔW| against the erase threshold (left of the line:
    requantizing to NF4 rounds the entry back to its old code).

    The box exposes `slider`, `figure`, `bars`, `image`, `readout` and `current` (the step's table entry).
    """
    if not table:
        raise ValueError("the table is empty; build it with erasure_table({step: (weight, delta)}, ...).")
    steps = sorted(table)
    slider = e2e_slider(widgets.SelectionSlider(options=steps, value=steps[0], description=tr("step"),
                                                continuous_update=False))
    fig, bars = plot_erasure_histogram([table[s]["hist"] for s in steps], BINS)
    view = FigureView(fig, animated=list(bars))
    image, readout = view.image, widgets.HTML()
    box = widgets.VBox([slider, image, readout])

    def redraw(_=None):
        box.current = table[slider.value]
        update_erasure_histogram(bars, box.current["hist"])
        view.refresh()  # fixed axes: only the bars are redrawn (blitting)
        s = box.current["summary"]
        readout.value = tr("step {step}: {erased:.1%} of ΔW's entries erased by requantization (half-gap rule "
                           "predicts {predicted:.1%}); {kept:.1%} of the update kept", step=slider.value,
                           erased=s.erased, predicted=s.predicted, kept=s.kept)

    slider.observe(redraw, names="value")
    box.slider, box.figure, box.bars, box.image, box.readout, box.view = slider, fig, bars, image, readout, view
    redraw()
    return box
