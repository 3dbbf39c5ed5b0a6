"""Figures for the memory notebook: stacked memory bars, a memory timeline, and loss curves side by side.

The live dashboard shows, beside the bars, the latest recorded step from the inside (`lora_lab.plots.timeline`).

Every figure is a plain `matplotlib.figure.Figure` (no pyplot, so nothing is displayed behind the notebook's
back); widgets render it to PNG (`lora_lab.plots.to_png`) after updating its artists in place.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
from matplotlib.patches import Patch

from ..timeline import TIMELINE_CATEGORIES
from ..i18n import tr, tr_lines
from ._figure import new_figure, palette_color
from .timeline import CATEGORY_LABELS, category_color

UNITS = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "MB": 10**6, "GB": 10**9}


def breakdown_dict(breakdown) -> dict[str, int]:
    """Bytes by category from a mapping, a dataclass, or an object with `as_dict()`.

    Non-numeric fields (a total, a label) are dropped; a field named `total`/`total_bytes` is dropped too, since
    the bars are stacked from the parts.
    """
    if isinstance(breakdown, Mapping):
        items = dict(breakdown)
    elif hasattr(breakdown, "as_dict"):
        items = dict(breakdown.as_dict())
    elif dataclasses.is_dataclass(breakdown):
        items = dataclasses.asdict(breakdown)
    else:
        raise TypeError(f"cannot read a memory breakdown from {type(breakdown).__name__}; pass a dict of bytes.")
    return {
        k: int(v)
        for k, v in items.items()
        if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
        and k not in ("total", "total_bytes")
    }


class StackedBars(NamedTuple):
    """Data behind a stacked bar chart: `values[i, j]` is category i of bar j, in `unit`."""

    labels: tuple[str, ...]
    categories: tuple[str, ...]
    values: np.ndarray  # (n_categories, n_bars)
    unit: str

    @property
    def totals(self) -> np.ndarray:
        return self.values.sum(axis=0)


def stacked_bar_data(breakdowns: Mapping[str, object], unit: str = "MiB") -> StackedBars:
    """Stack memory breakdowns (one per bar) into one array, categories in first-seen order.

    A category missing from one breakdown counts as zero there.
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {sorted(UNITS)}, not {unit!r}.")
    dicts = {label: breakdown_dict(b) for label, b in breakdowns.items()}
    categories: list[str] = []
    for d in dicts.values():
        categories += [c for c in d if c not in categories]
    values = np.array([[d.get(c, 0) for d in dicts.values()] for c in categories], dtype=float)
    return StackedBars(tuple(dicts), tuple(categories), values.reshape(len(categories), len(dicts)) / UNITS[unit], unit)


def plot_stacked_bars(data: StackedBars, ax=None, title: str | None = None, legend_x: float = 1.0):
    """Draw `data` as stacked bars; returns (figure, {category: BarContainer}) for `update_stacked_bars`."""
    fig = ax.figure if ax is not None else None
    if ax is None:
        fig, ax = new_figure(width=4.0, height=3.5)
    x = np.arange(len(data.labels))
    bottom = np.zeros(len(data.labels))
    bars = {}
    for i, cat in enumerate(data.categories):
        bars[cat] = ax.bar(x, data.values[i], bottom=bottom, color=palette_color(i), label=tr(cat))
        bottom = bottom + data.values[i]
    ax.set_xticks(x, [tr_lines(label) for label in data.labels])
    ax.set_ylabel(tr("memory ({unit})", unit=data.unit))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(legend_x, 1.0))  # beside the axes, never over a bar
    if title:
        ax.set_title(tr(title))
    return fig, bars


def update_stacked_bars(bars: Mapping, data: StackedBars, ax=None, headroom: float = 1.15) -> None:
    """Set heights and bottoms of bars drawn by `plot_stacked_bars` (same labels and categories) to `data`."""
    bottom = np.zeros(len(data.labels))
    for i, cat in enumerate(data.categories):
        for rect, h, b in zip(bars[cat], data.values[i], bottom):
            rect.set_height(h)
            rect.set_y(b)
        bottom = bottom + data.values[i]
    if ax is not None:
        ax.set_ylim(0, max(float(bottom.max()), 1e-9) * headroom)


def plot_fixed_bars(data: StackedBars, ymax: float, title: str | None = None, headroom: float = 1.15):
    """Stacked bars on a y axis fixed at [0, headroom · ymax], where `ymax` is the largest total a widget will show,
    so heights compare across slider moves and a redraw moves only the bars. Returns (figure, axis, bars)."""
    fig, ax = new_figure(width=6.0, height=3.2)
    _, bars = plot_stacked_bars(data, ax=ax, title=title)
    ax.set_ylim(0, ymax * headroom)
    return fig, ax, bars


def plot_timeline(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], ax=None, unit: str = "MiB",
                  marker: str = "o"):
    """Lines of memory against training step; `series[name] = (steps, bytes)`. Returns (figure, {name: Line2D}).

    Memory is measured only at some steps (`finetune` measures at step 1 and at each evaluation), so every
    measured point gets a `marker`: the line between two markers is drawn, not measured.
    """
    fig = ax.figure if ax is not None else None
    if ax is None:
        fig, ax = new_figure(width=4.0, height=3.5)
    lines = {}
    for i, (name, (steps, nbytes)) in enumerate(series.items()):
        (lines[name],) = ax.plot(steps, np.asarray(nbytes, dtype=float) / UNITS[unit], label=tr(name),
                                 color=palette_color(i), marker=marker, markersize=4)
    ax.set_xlabel(tr("step"))
    ax.set_ylabel(tr("memory ({unit})", unit=unit))
    ax.legend(fontsize=8)
    return fig, lines


def plot_dashboard(data: StackedBars, unit: str = "MiB"):
    """The live dashboard's figure: stacked bars per method (left) and an empty axis (right) where the dashboard
    draws the latest recorded step's timeline (`lora_lab.plots.timeline.draw_step_timeline`).
    Returns (figure, (bar axis, step axis), bars)."""
    fig, (ax_bar, ax_step) = new_figure(width=10.0, height=3.6, ncols=2)
    _, bars = plot_stacked_bars(data, ax=ax_bar, title="memory by category")  # translated there
    ax_bar.get_legend().remove()  # one legend for both panels, under them, with readable names
    ax_bar.set_ylabel(tr("memory ({unit})", unit=unit))
    colors = [palette_color(i) for i in range(len(data.categories))]  # the bars' colours
    names = list(data.categories) + [c for c in TIMELINE_CATEGORIES if c not in data.categories]
    colors += [category_color(c) for c in names[len(colors):]]  # what only the step's timeline shows
    fig.legend([Patch(color=c) for c in colors], [tr(CATEGORY_LABELS.get(c, c)) for c in names],
               loc="outside lower center", ncols=min(len(names), 6), fontsize=8)
    empty_step_axis(ax_step)
    return fig, (ax_bar, ax_step), bars


def empty_step_axis(ax) -> None:
    """The step axis before any step was recorded: says how to fill it."""
    ax.clear()
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, tr("inside the latest step: pass a TimelineRecorder\nto dashboard.callback(method, recorder)"),
            ha="center", va="center", fontsize=9, transform=ax.transAxes)


def loss_curve_data(histories: Mapping[str, object]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(steps, training loss) per method, from History objects (`.train_loss`) or plain loss lists."""
    out = {}
    for name, h in histories.items():
        loss = np.asarray(getattr(h, "train_loss", h), dtype=float)
        out[name] = (np.arange(1, len(loss) + 1), loss)
    return out


def plot_loss_curves(histories: Mapping[str, object], smooth: int = 1, title: str | None = "training loss"):
    """Loss curves side by side on one axis (optionally a running mean over `smooth` steps); `title` is
    translated (`lora_lab.i18n.tr`)."""
    fig, ax = new_figure(width=7.0, height=3.2)
    lines = {}
    for i, (name, (steps, loss)) in enumerate(loss_curve_data(histories).items()):
        if smooth > 1 and len(loss) >= smooth:
            loss = np.convolve(loss, np.ones(smooth) / smooth, mode="valid")
            steps = steps[smooth - 1:]
        (lines[name],) = ax.plot(steps, loss, label=tr(name), color=palette_color(i))
    ax.set_xlabel(tr("step"))
    ax.set_ylabel(tr("loss"))
    if title:
        ax.set_title(tr(title))
    ax.legend(fontsize=8)
    return fig, lines
