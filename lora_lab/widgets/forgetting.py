"""Widgets for notebook 07 (what fine-tuning forgets): sliders over a precomputed sweep; they only pick."""

from __future__ import annotations

import ipywidgets as widgets

from ..i18n import tr
from ..plots import forgetting as plots
from ._view import FigureView, e2e_slider


def forgetting_explorer(rows, method: str = "full", lr: float | None = None,
                        threshold_epsilon: float = 0.5) -> widgets.VBox:
    """A method-and-rank slider and a learning-rate slider over `forgetting_sweep`'s rows, highlighting one run.

    Args:
        rows: ``Sweep.rows``; every method-and-rank needs a run at every learning rate (a full grid).
        method: the first run's `lora_lab.plots.forgetting.run_label` (``"full"``, ``"r = 4"``).
        lr: its learning rate (None: the smallest).

    Returns:
        A VBox(sliders, figure) with ``.method``, ``.lr``, ``.view``, ``.artists`` and ``.current`` (the row shown).
    """
    groups = plots.series(rows)
    lrs = sorted({r["lr"] for r in rows})
    missing = [(label, x) for label, group in groups.items() for x in lrs if x not in {g["lr"] for g in group}]
    if not rows or missing:
        raise ValueError(f"rows must hold every method at every learning rate; missing {missing or 'all'}.")
    table = {(label, g["lr"]): g for label, group in groups.items() for g in group}
    lr = lrs[0] if lr is None else float(lr)
    fig, artists = plots.plot_learn_forget(rows, table[(method, lr)], threshold_epsilon)
    view = FigureView(fig, animated=[artists["point"], artists["text"], artists["dots"]])
    method_slider = e2e_slider(widgets.SelectionSlider(options=[(plots.shown_label(k), k) for k in groups],
                                                       value=method, description=tr("method")))
    lr_slider = e2e_slider(widgets.SelectionSlider(options=[(f"{x:g}", x) for x in lrs], value=lr,
                                                   description=tr("lr")))
    box = widgets.VBox([widgets.HBox([method_slider, lr_slider]), view.image])

    def show(_=None) -> None:
        box.current = table[(method_slider.value, lr_slider.value)]
        plots.update_learn_forget(artists, box.current)
        view.refresh()

    method_slider.observe(show, names="value")
    lr_slider.observe(show, names="value")
    box.method, box.lr, box.view, box.artists = method_slider, lr_slider, view, artists
    show()
    return box


def mitigation_explorer(rows, lam: float | None = None) -> widgets.VBox:
    """A λ slider over `mitigation_sweep`'s rows: what the adapter still does, and what the base got back.

    Returns:
        A VBox(slider, figure) with ``.slider``, ``.view``, ``.artists`` and ``.current`` (the chosen λ's row).
    """
    if not rows:
        raise ValueError("rows is empty; build it with lora_lab.forgetting.mitigation_sweep(...).")
    lambdas = [r["lambda"] for r in rows]
    lam = lambdas[-1] if lam is None else float(lam)
    fig, artists = plots.plot_mitigation(rows, lam)
    view = FigureView(fig, animated=[artists["line"], artists["text"]])
    slider = e2e_slider(widgets.SelectionSlider(options=[(f"{x:g}", x) for x in lambdas], value=lam,
                                                description="λ"))
    box = widgets.VBox([slider, view.image])

    def show(_=None) -> None:
        box.current = plots.update_mitigation(artists, slider.value)
        view.refresh()

    slider.observe(show, names="value")
    box.slider, box.view, box.artists = slider, view, artists
    show()
    return box
