"""The "will it fit?" explorer: sliders on the estimator's inputs, one stacked bar per method, GPU-size lines.

Every slider has `continuous_update=False` and answers come from an `EstimateCache`, so a revisited setting
redraws without calling the estimator again. The arithmetic that makes a move fast (`EstimateGrid`) lives
with the estimator, in `lora_lab.estimator`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ipywidgets as widgets

from ..estimator import EstimateCache, EstimateGrid
from ..plots.scale import (GPU_SIZES_GB, LLAMA_LINEAR_NAMES, QV, estimate_bars_data, fits_on, plot_fit_explorer,
                           update_fit)
from ..i18n import tr
from ._view import FigureView, e2e_slider

TARGETS = {"q_proj, v_proj": QV, "all linear": LLAMA_LINEAR_NAMES}
RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
SEQ_LENS = (128, 256, 512, 1024, 2048)  # every preset has at least 2048 positions


def _controls(presets, optimizers):
    c = {
        "preset": widgets.Dropdown(options=list(presets), description=tr("model")),
        "r": widgets.SelectionSlider(options=RANKS, value=8, description="r", continuous_update=False),
        "target_modules": widgets.Dropdown(options=list(TARGETS), description=tr("targets")),
        "batch_size": widgets.SelectionSlider(options=BATCH_SIZES, value=1, description="batch_size",
                                              continuous_update=False),
        "seq_len": widgets.SelectionSlider(options=SEQ_LENS, value=512, description="seq_len",
                                           continuous_update=False),
        "gradient_checkpointing": widgets.Checkbox(value=True, description=tr("gradient checkpointing")),
        "optimizer": widgets.Dropdown(options=list(optimizers), description=tr("optimizer")),
    }
    for name in ("r", "batch_size", "seq_len"):
        e2e_slider(c[name])
    return c


def _kwargs(controls) -> dict:
    kw = {k: w.value for k, w in controls.items() if k != "preset"}
    kw["target_modules"] = TARGETS[kw["target_modules"]]
    return kw


def fit_explorer(estimate: Callable[..., object], presets: Sequence[str],
                 methods: Sequence[str] = ("full", "lora", "qlora"), optimizers: Sequence[str] = ("adamw",),
                 gpu_sizes: Sequence[float] = GPU_SIZES_GB, preset: str | None = None) -> widgets.VBox:
    """Sliders on `estimate(preset, method, r=, target_modules=, batch_size=, seq_len=, gradient_checkpointing=,
    optimizer=)`; one stacked bar (GiB) per method with lines at `gpu_sizes`.

    The returned box exposes `controls` (dict of widgets), `figure`, `bars`, `image`, `readout`, `current`
    (the StackedBars drawn now) and `estimate` (the `EstimateCache` around `estimate`). An `EstimateGrid`
    runs the starting setting's corners while the box is built, so slider moves are arithmetic.
    """
    est = EstimateCache(estimate)
    controls = _controls(presets, optimizers)
    if preset is not None:
        controls["preset"].value = preset
    if isinstance(estimate, EstimateGrid):
        kw = _kwargs(controls)
        estimate.warm(controls["preset"].value, methods, **{k: kw[k] for k in EstimateGrid.COMBO})

    def data():
        return estimate_bars_data({m: est(controls["preset"].value, m, **_kwargs(controls)) for m in methods})

    fig, ax, bars, labels = plot_fit_explorer(data(), gpu_sizes, title="estimated training memory")
    view = FigureView(fig, animated=[r for c in bars.values() for r in c] + labels)
    image, readout = view.image, widgets.HTML()
    c = controls
    box = widgets.VBox([widgets.HBox([c["preset"], c["optimizer"]]), widgets.HBox([c["r"], c["target_modules"]]),
                        widgets.HBox([c["batch_size"], c["seq_len"]]), c["gradient_checkpointing"], image, readout])

    def redraw(_=None):
        try:
            box.current = data()
        except ValueError as err:  # a setting this model cannot run (e.g. seq_len above its positions): say so
            readout.value = f"<b>{err}</b>"
            return
        update_fit(ax, bars, labels, box.current)
        view.refresh()
        readout.value = "<br>".join(
            tr("<b>{method}</b>: {total:,.1f} GiB &rarr; fits on: {gpus}", method=tr(m), total=t,
               gpus=", ".join(f"{g:g} GB" for g in fits_on(t * 2**30, gpu_sizes)) or tr("none of these GPUs"))
            for m, t in zip(box.current.labels, box.current.totals))

    box.controls, box.figure, box.bars, box.image, box.readout, box.estimate = controls, fig, bars, image, readout, est
    box.labels, box.view = labels, view
    for w in controls.values():
        w.observe(redraw, names="value")
    redraw()
    return box
