"""Widgets for notebook 01 (LoRA from scratch): a rank slider over a real weight, a scaling panel."""

from __future__ import annotations

import ipywidgets as widgets

from ..plots import lora as plots
from ..i18n import tr
from ._view import FigureView, e2e_slider


def rank_explorer(weight, r: int = 8) -> widgets.VBox:
    """Rank slider over one weight matrix W (out, in): spectrum, rank-r error, and A+B parameter counts.

    The SVD is computed once here; a slider move only recolors bars and moves a marker.

    Returns:
        A VBox(slider, readout, figure); ``.slider``, ``.view``, ``.artists`` and ``.data`` (what is shown
        now, from `lora_lab.plots.lora.rank_panel_data`) are attached for tests and the notebook.
    """
    out_features, in_features = weight.shape
    s = plots.singular_values(weight)
    fig, artists = plots.plot_rank_explorer(s, r, in_features, out_features)
    view = FigureView(fig, animated=[artists["kept"], artists["marker"], artists["text"]])
    slider = e2e_slider(widgets.IntSlider(value=r, min=1, max=len(s), description=tr("rank r")))
    readout = widgets.HTML()
    box = widgets.VBox([slider, readout, view.image])

    def show(r_now: int) -> None:
        box.data = plots.update_rank_explorer(artists, r_now)
        readout.value = tr("r = {r}: A+B hold {params:,} parameters ({percent:.1f}% of W), relative error {error:.3f}",
                           r=r_now, params=box.data["lora_params"], percent=100 * box.data["ratio"],
                           error=box.data["rel_error"])
        view.refresh()

    slider.observe(lambda change: show(change["new"]), names="value")
    box.slider, box.view, box.artists, box.singular_values = slider, view, artists, s
    show(r)
    return box


def scaling_explorer(ranks=(1, 2, 4, 8, 16, 32, 64), alpha: float = 16, r: int = 8,
                     in_features: int = 256, out_features: int = 256) -> widgets.VBox:
    """Sliders for alpha and rank over the effective update size under α/r, α/√r and raw α.

    Returns:
        A VBox(alpha slider, rank slider, readout, figure) with ``.alpha``, ``.rank``, ``.view``,
        ``.artists`` and ``.sizes`` (each convention's update size at the chosen rank).
    """
    ranks = list(ranks)
    if r not in ranks:
        raise ValueError(f"r={r} must be one of the ranks {ranks}.")
    base = plots.random_update_norms(ranks, in_features, out_features)
    fig, artists = plots.plot_update_sizes(ranks, alpha, base, r)
    view = FigureView(fig, animated=[*artists["lines"].values(), *artists["markers"].values()])
    alpha_slider = e2e_slider(widgets.FloatLogSlider(value=alpha, base=2, min=0, max=6, step=1, description="α"))
    rank_slider = e2e_slider(widgets.SelectionSlider(options=ranks, value=r, description=tr("rank r")))
    readout = widgets.HTML()
    box = widgets.VBox([alpha_slider, rank_slider, readout, view.image])

    def show(_=None) -> None:
        a, r_now = alpha_slider.value, rank_slider.value
        box.sizes = plots.update_update_sizes(artists, a, r_now)
        factors = ", ".join(f"{name}: {fn(a, r_now):.3g}" for name, fn in plots.SCALINGS.items())
        readout.value = tr("scaling at α = {alpha:g}, r = {r} → {factors}", alpha=a, r=r_now, factors=factors)
        view.refresh()

    alpha_slider.observe(show, names="value")
    rank_slider.observe(show, names="value")
    box.alpha, box.rank, box.view, box.artists = alpha_slider, rank_slider, view, artists
    show()
    return box
