"""Widgets for notebook 08 (LoRA's variants against QLoRA's quantization error): a rank slider over a
precomputed sweep of starting errors."""

from __future__ import annotations

import ipywidgets as widgets

from ..i18n import tr
from ..plots import variants as plots
from ._view import FigureView, e2e_slider


def error_explorer(sweep: dict, r=None) -> widgets.VBox:
    """A slider over the sweep's ranks; the figure marks that rank and shows each variant's starting error.

    The sweep is computed once (`lora_lab.variants.error_sweep`); the slider only picks from it.

    Args:
        sweep: ``{r: {label: LogitError}}``. r: the rank shown first (default: the smallest).

    Returns:
        A VBox(slider, figure) with ``.slider``, ``.view``, ``.artists`` and ``.shown`` (``{label: MAE}`` at the
        slider's rank).
    """
    ranks = list(sweep)
    if not ranks:
        raise ValueError("sweep is empty; compute it with lora_lab.variants.error_sweep over a few ranks.")
    r = ranks[0] if r is None else r
    if r not in sweep:
        raise ValueError(f"r = {r!r} is not in the sweep's ranks {ranks}.")
    fig, artists = plots.plot_error_sweep(sweep, r)
    view = FigureView(fig, animated=[artists["marker"], *artists["bars"], artists["text"]])
    slider = e2e_slider(widgets.SelectionSlider(options=ranks, value=r, description=tr("rank r"),
                                                continuous_update=False))
    box = widgets.VBox([slider, view.image])

    def show(rank) -> None:
        box.shown = plots.update_error_sweep(artists, rank)
        view.refresh()

    slider.observe(lambda change: show(change["new"]), names="value")
    box.slider, box.view, box.artists = slider, view, artists
    show(r)
    return box
