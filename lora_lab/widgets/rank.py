"""Widgets for notebook 02 (rank effects): a rank slider over precomputed curves, and a live Train panel."""

from __future__ import annotations

import html

import ipywidgets as widgets

from ..plots import rank as plots
from ..i18n import tr
from ._view import FigureView, e2e_slider


def curve_explorer(curves: dict, highlight=None, reference: str | None = "full",
                   ylabel: str = "eval loss", threshold: float | None = None) -> widgets.VBox:
    """A slider over the curves' labels (ranks, computed once when the notebook runs) highlighting one.

    Args:
        curves: ``{label: (steps, values)}``; labels are ranks, plus ``reference`` (drawn dashed, not on the
            slider).
        threshold: a loss level; the readout says when the chosen rank first fell below it
            (`lora_lab.plots.rank.loss_readout`).

    Returns:
        A VBox(slider, figure) with ``.slider``, ``.view``, ``.artists`` and ``.final`` (highlighted curve's
        last value).
    """
    options = [label for label in curves if label != reference]
    if not options:
        raise ValueError("curves needs at least one labeled curve besides the reference.")
    highlight = options[0] if highlight is None else highlight
    fig, artists = plots.plot_loss_curves(curves, highlight, reference, ylabel, threshold)
    view = FigureView(fig, animated=[artists["line"], artists["text"]])
    slider = e2e_slider(widgets.SelectionSlider(options=options, value=highlight, description=tr("rank r")))
    box = widgets.VBox([slider, view.image])

    def show(label) -> None:
        box.final = plots.update_loss_curves(artists, label)
        view.refresh()

    slider.observe(lambda change: show(change["new"]), names="value")
    box.slider, box.view, box.artists = slider, view, artists
    show(highlight)
    return box


def train_panel(train_fn, ranks=(1, 2, 4, 8, 16, 32, 64), r: int = 8, alpha: float = 16,
                max_steps: int = 100, every: int = 5) -> widgets.VBox:
    """Pick rank and alpha, press Train, watch the curve grow (and a progress bar).

    Args:
        train_fn: ``train_fn(r, alpha, callback) -> History``; it must call ``callback(history)`` as it trains
            (`lora_lab.train.finetune`'s ``callback``); the panel redraws every ``every`` steps.
        max_steps: the x-range of the plot (the number of steps ``train_fn`` runs).

    Returns:
        A VBox with ``.rank``, ``.alpha``, ``.button``, ``.progress``, ``.status``, ``.view``, ``.artists``
        and ``.history`` (the last run's History, None before the first or after a run that raised; the
        status then shows the error).
    """
    fig, artists = plots.plot_live(max_steps)
    view = FigureView(fig, animated=[artists["train"], artists["eval"]])
    rank_dd = widgets.Dropdown(options=list(ranks), value=r, description=tr("rank r"))
    alpha_slider = widgets.FloatLogSlider(value=alpha, base=2, min=0, max=7, step=1, description="α",
                                          continuous_update=False)
    button = widgets.Button(description=tr("Train"), button_style="primary", icon="play")
    progress = widgets.IntProgress(value=0, min=0, max=max_steps, description=tr("steps"))
    status = widgets.HTML(tr("Pick a rank and α, then press Train."))
    box = widgets.VBox([widgets.HBox([rank_dd, alpha_slider, button]), progress, status, view.image])
    box.history = None

    def on_step(history) -> None:
        progress.value = min(history.steps, max_steps)
        if history.steps % every == 0 or history.steps >= max_steps:
            plots.update_live(artists, history)
            view.refresh()

    def run(_=None) -> None:
        button.disabled = True
        status.value = tr("training r = {r}, α = {alpha:g} ...", r=rank_dd.value, alpha=alpha_slider.value)
        try:
            box.history = train_fn(rank_dd.value, alpha_slider.value, on_step)
        except Exception as err:  # shown where the user is looking; a widget callback's traceback goes to a log
            box.history = None
            status.value = (tr("<b>training r = {r}, α = {alpha:g} failed</b>: ", r=rank_dd.value,
                               alpha=alpha_slider.value) + html.escape(f"{type(err).__name__}: {err}"))
            return
        finally:
            button.disabled = False
        plots.update_live(artists, box.history)
        view.refresh()
        final = box.history.eval_loss[-1] if box.history.eval_loss else float("nan")
        status.value = tr("r = {r}, α = {alpha:g}: {steps} steps, final eval loss {final:.3f}", r=rank_dd.value,
                          alpha=alpha_slider.value, steps=box.history.steps, final=final)

    button.on_click(run)
    box.rank, box.alpha, box.button, box.progress, box.status, box.view, box.artists = (
        rank_dd, alpha_slider, button, progress, status, view, artists)
    box.run = run
    return box
