"""Figures of memory inside one training step (`lora_lab.timeline`): a stacked area over the step's events.

The x axis is the step's events in order (forward, backward, optimizer step, shaded), the y axis memory in a
unit chosen for the largest value (KiB, MiB or GiB, never "25,000 KiB"); the peak is marked and named
("peak 12.6 MiB at the end of the forward pass: saved activations 9.7 MiB").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from ..timeline import TIMELINE_CATEGORIES, StepTimeline
from ..i18n import tr
from ._figure import GRAY, new_figure, palette_color

CATEGORY_LABELS = {"frozen_weights": "frozen weights", "trainable_weights": "trainable weights",
                   "gradients": "gradients", "optimizer_state": "optimizer state (AdamW)",
                   "activations": "saved activations", "temporaries": "temporaries (dequantized W)"}
PHASE_LABELS = {"forward": "forward pass", "backward": "backward pass", "optimizer": "optimizer step"}
_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))


def human_unit(nbytes: float) -> tuple[str, int]:
    """The largest binary unit that ``nbytes`` fills at least once: ("MiB", 2**20) for 25,000 KiB."""
    return next(((name, size) for name, size in _UNITS if abs(nbytes) >= size), _UNITS[-1])


def format_bytes(nbytes: float, unit: str | None = None) -> str:
    """``nbytes`` in ``unit`` (default: `human_unit`) with one decimal: "9.7 MiB"."""
    name, size = human_unit(nbytes) if unit is None else (unit, dict(_UNITS)[unit])
    return f"{nbytes / size:,.1f} {name}" if size > 1 else f"{int(nbytes):,} B"


def category_color(category: str) -> str:
    """One colour per category, the same in every figure (the order of `TIMELINE_CATEGORIES` in `PALETTE`)."""
    return palette_color(TIMELINE_CATEGORIES.index(category))


def peak_parts(timeline: StepTimeline) -> tuple[str, str, str]:
    """("peak 12.6 MiB", "at the end of the forward pass", "saved activations 9.7 MiB"): the peak, where it is,
    and its largest category (the start is the peak when no event rose above it)."""
    phase, at_end = timeline.peak_phase()
    where = tr("before the step's first event") if phase is None else tr(
        "at the end of the {phase}" if at_end else "during the {phase}", phase=tr(PHASE_LABELS[phase]))
    parts = timeline.at_peak()
    biggest = max(parts, key=parts.get)
    return (tr("peak {size}", size=format_bytes(timeline.peak)), where,
            f"{tr(CATEGORY_LABELS[biggest])} {format_bytes(parts[biggest])}")


def peak_sentence(timeline: StepTimeline) -> str:
    """"peak 12.6 MiB at the end of the forward pass: saved activations 9.7 MiB" (see `peak_parts`)."""
    peak, where, biggest = peak_parts(timeline)
    return f"{peak} {where}: {biggest}"


class TimelineArea(NamedTuple):
    """Data behind one stacked area: ``values[i, j]`` is category i after event j (j = 0: the start), in `unit`."""

    categories: tuple[str, ...]
    values: np.ndarray  # (n_categories, n_events + 1)
    unit: str
    peak_index: int
    spans: tuple[tuple[str, int, int], ...]
    sentence: str

    @property
    def totals(self) -> np.ndarray:
        return self.values.sum(axis=0)


def timeline_area_data(timeline: StepTimeline, unit: str | None = None) -> TimelineArea:
    """The stacked-area data of ``timeline``: every category that holds memory at some point, in `unit`
    (default: `human_unit` of the peak)."""
    unit = unit or human_unit(timeline.peak)[0]
    curve = timeline.curve().T / dict(_UNITS)[unit]  # (n_categories, n_events + 1)
    keep = [i for i in range(len(TIMELINE_CATEGORIES)) if curve[i].any()]
    return TimelineArea(tuple(TIMELINE_CATEGORIES[i] for i in keep), curve[keep], unit, timeline.peak_index,
                        tuple(timeline.phase_spans()), peak_sentence(timeline))


def draw_step_timeline(ax, timeline: StepTimeline, unit: str, ymax: float | None = None, title: str | None = None,
                       legend: bool = True) -> TimelineArea:
    """Draw ``timeline`` on ``ax`` (cleared first): stacked area, shaded phases, the peak marked and named."""
    data = timeline_area_data(timeline, unit)
    ax.clear()
    x = np.arange(data.values.shape[1])
    ax.stackplot(x, data.values, labels=[tr(CATEGORY_LABELS[c]) for c in data.categories],
                 colors=[category_color(c) for c in data.categories], step="post", linewidth=0, zorder=2)
    top = ymax if ymax is not None else max(float(data.totals.max()), 1e-9) * 1.25
    for k, (phase, first, last) in enumerate(data.spans):
        if k % 2:
            ax.axvspan(first - 0.5, last + 0.5, color=GRAY, alpha=0.15, linewidth=0, zorder=1)
        ax.text((first + last) / 2, top * 0.97, tr(PHASE_LABELS[phase].split()[0]), ha="center", va="top", fontsize=8)
    peak = float(data.totals[data.peak_index])
    ax.plot([data.peak_index], [peak], marker="v", color="black", markersize=6, zorder=3)
    ax.annotate(tr("peak"), (data.peak_index, peak), xytext=(0, 5), textcoords="offset points", ha="center",
                fontsize=7, zorder=3)
    ax.set_xlim(0, max(len(x) - 1, 1))
    ax.set_ylim(0, top)
    ax.set_xlabel(tr("events of one step"))
    ax.set_ylabel(tr("memory ({unit})", unit=unit))
    ax.set_title(title or "\n".join(peak_parts(timeline)), fontsize=8)
    if legend:
        ax.legend(fontsize=7, loc="center right")
    return data


def common_unit(timelines: Mapping[str, StepTimeline]) -> tuple[str, float]:
    """(unit, y limit) that hold every timeline's peak, so panels side by side compare heights."""
    top = max(t.peak for t in timelines.values())
    unit, size = human_unit(top)
    return unit, top / size * 1.25


def plot_step_timelines(timelines: Mapping[str, StepTimeline], *, unit: str | None = None, width: float = 10.0,
                        height: float = 3.4):
    """One stacked-area panel per method side by side, on one y axis. Returns (figure, axes, {name: TimelineArea}).

    Each panel's title is its `peak_sentence`; the legend sits under the panels (the categories' colours are
    fixed, see `category_color`).
    """
    if not timelines:
        raise ValueError("no timelines to draw; record some with lora_lab.timeline.record_step(...).")
    fig, axes = new_figure(width=width, height=height, ncols=len(timelines))
    axes = axes if isinstance(axes, list) else [axes]
    unit, top = (unit, None) if unit else common_unit(timelines)
    drawn = redraw_step_timelines(axes, timelines, unit, top)
    handles, labels = axes[int(np.argmax([len(d.categories) for d in drawn.values()]))].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), fontsize=8)
    return fig, axes, drawn


def redraw_step_timelines(axes, timelines: Mapping[str, StepTimeline], unit: str,
                          top: float | None = None) -> dict[str, TimelineArea]:
    """Redraw ``plot_step_timelines``' panels with other timelines (the same number of them)."""
    drawn = {}
    for ax, (name, timeline) in zip(axes, timelines.items()):
        peak, where, biggest = peak_parts(timeline)
        drawn[name] = draw_step_timeline(ax, timeline, unit, top, legend=False,
                                         title=f"{tr(name)}: {peak}\n{where}\n{biggest}")
    return drawn
