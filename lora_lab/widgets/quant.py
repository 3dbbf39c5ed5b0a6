"""Widgets for notebook 03 (NF4 quantization): the offset slider and the quantization-error explorer."""

from __future__ import annotations

import ipywidgets as widgets
import torch

from ..nf4 import NF4_OFFSET
from ..plots import quant as plots
from ..i18n import tr
from ._view import FigureView, e2e_slider


def offset_explorer(codebook_fn, reference: torch.Tensor, offset: float = NF4_OFFSET) -> widgets.VBox:
    """Slide the NF4 offset (the probability of the outermost quantile) and watch the 16 levels move.

    Args:
        codebook_fn: ``codebook_fn(offset) -> (16,)`` sorted levels, e.g. `lora_lab.nf4.nf4_codebook`.
        reference: the released NF4 values (bitsandbytes), drawn as rings.
        offset: the starting offset.

    Returns:
        A VBox(slider, readout, figure) with ``.slider``, ``.view``, ``.artists`` and ``.levels`` (shown now).
    """
    levels = codebook_fn(offset)
    fig, artists = plots.plot_codebook(levels, reference)
    view = FigureView(fig, animated=[artists["dots"], artists["cuts"]])
    # A fixed list of offsets (with bitsandbytes' value on it exactly), so a frontend never snaps the
    # starting value to a slider step and each step moves the levels visibly.
    options = sorted({round(0.9 + 0.005 * i, 3) for i in range(20)} | {0.995, 0.999, offset})
    slider = e2e_slider(widgets.SelectionSlider(options=options, value=offset, description=tr("offset")))
    readout = widgets.HTML()
    box = widgets.VBox([slider, readout, view.image])

    def show(value: float) -> None:
        box.levels = codebook_fn(value)
        plots.update_codebook(artists, box.levels)
        z = float(torch.special.ndtri(torch.tensor(value, dtype=torch.float64)))
        gap = float((box.levels.double() - reference.double()).abs().max())
        readout.value = tr("offset {offset:.4f}: outermost quantile at z = {z:.3f} σ (scaled to ±1); largest "
                           "distance to bitsandbytes' levels {gap:.4f}", offset=value, z=z, gap=gap)
        view.refresh()

    slider.observe(lambda change: show(change["new"]), names="value")
    box.slider, box.view, box.artists = slider, view, artists
    show(offset)
    return box


def error_explorer(grid: dict, sample: str | None = None, quantizer: str | None = None,
                   blocksize: int | None = None) -> widgets.VBox:
    """Dropdowns for weight distribution and quantizer, a block-size slider: error histogram + stats table.

    Args:
        grid: from `lora_lab.plots.quant.error_grid` (every combination computed once, so a move only
            re-bins a precomputed error array).

    Returns:
        A VBox with ``.sample``, ``.quantizer``, ``.blocksize`` controls, ``.table`` (HTML), ``.view``,
        ``.key`` and ``.density`` (the histogram drawn now; None, with the figure hidden and a message in the
        table, for a combination the grid lacks).
    """
    samples = list(dict.fromkeys(k[0] for k in grid))
    quantizers = list(dict.fromkeys(k[1] for k in grid))
    blocksizes = sorted({k[2] for k in grid})
    key = (sample or samples[0], quantizer or quantizers[0], blocksize or blocksizes[0])
    if key not in grid:
        raise ValueError(f"{key} is not in the grid; pick from {samples}, {quantizers}, {blocksizes}.")
    fig, artists = plots.plot_error_explorer(grid, key)
    view = FigureView(fig, animated=[artists["hist"], artists["label"]])
    sample_dd = widgets.Dropdown(options=samples, value=key[0], description=tr("weights"))
    quant_dd = widgets.Dropdown(options=quantizers, value=key[1], description=tr("quantizer"))
    bs_slider = e2e_slider(widgets.SelectionSlider(options=blocksizes, value=key[2], description=tr("blocksize")))
    table = widgets.HTML()
    box = widgets.VBox([widgets.HBox([sample_dd, quant_dd]), bs_slider, widgets.HBox([view.image, table])])

    def show(_=None) -> None:
        box.key = (sample_dd.value, quant_dd.value, bs_slider.value)
        if box.key not in grid:  # a combination the grid lacks: say so instead of showing the last one
            box.density = None
            view.hide()
            table.value = (f"<b>{box.key[0]}, {box.key[1]}, blocksize {box.key[2]} is not in the grid</b>; pick "
                           "another combination, or add it to error_grid(...).")
            return
        box.density = plots.update_error_explorer(artists, box.key)
        table.value = plots.stats_table_html(grid, box.key[0], box.key[2], box.key[1])
        view.refresh()

    for control in (sample_dd, quant_dd, bs_slider):
        control.observe(show, names="value")
    box.sample, box.quantizer, box.blocksize, box.table, box.view, box.artists = (
        sample_dd, quant_dd, bs_slider, table, view, artists)
    show()
    return box
