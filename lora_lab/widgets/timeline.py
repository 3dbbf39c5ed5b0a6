"""A control over recorded step timelines: full, LoRA and QLoRA side by side, gradient checkpointing off or on.

The control never records: `record_timelines` records every setting once when the notebook runs, and a move
only redraws the panels from what was recorded.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import ipywidgets as widgets

from ..lora import LoraConfig
from ..plots.timeline import common_unit, peak_sentence, plot_step_timelines, redraw_step_timelines
from ..timeline import StepTimeline, record_step
from ..train import prepare_model
from ..i18n import tr
from ._view import FigureView, e2e_slider

CHECKPOINTING = ("off", "on")  # the control's two positions


def record_timelines(base_model, batch, methods: Sequence[str] = ("full", "lora", "qlora"),
                     config: LoraConfig | None = None) -> dict[tuple[str, bool], StepTimeline]:
    """One recorded training step (`record_step`) per method, without and with gradient checkpointing.

    Each step runs on a fresh copy of ``base_model`` prepared as ``finetune`` prepares it (``config`` for LoRA
    and QLoRA; default ``LoraConfig(lora_alpha=16)``), with a throwaway AdamW (lr=0) whose two moments appear
    at the step's optimizer step, as at a real run's first step. ``base_model`` itself is left untouched.

    Returns:
        ``timelines[(method, gradient_checkpointing)]``.
    """
    device = next(base_model.parameters()).device
    batch = tuple(t.to(device) for t in batch)
    out = {}
    for method in methods:
        for checkpointing in (False, True):
            model = prepare_model(copy.deepcopy(base_model), method, None if method == "full" else config).train()
            out[(method, checkpointing)] = record_step(model, batch, gradient_checkpointing=checkpointing)
    return out


def timeline_explorer(timelines: Mapping[tuple[str, bool], StepTimeline]) -> widgets.VBox:
    """One panel per method (one y axis for all, in the unit of the largest peak) and a two-position slider for
    gradient checkpointing; the readout names each panel's peak.

    The returned box has attributes `slider`, `figure`, `axes`, `image`, `readout` and `current` (the
    ``{method: StepTimeline}`` drawn now), so tests and notebooks can read the data behind it.
    """
    methods = list(dict.fromkeys(m for m, _ in timelines))
    missing = [(m, c) for m in methods for c in (False, True) if (m, c) not in timelines]
    if not timelines or missing:
        raise ValueError(f"timelines must hold every method with and without checkpointing; missing {missing}. "
                         "Record them with record_timelines(...).")
    unit, top = common_unit(timelines)
    slider = e2e_slider(widgets.SelectionSlider(options=CHECKPOINTING, value="off",
                                                description=tr("gradient checkpointing"),
                                                style={"description_width": "initial"}, continuous_update=False))
    first = {m: timelines[(m, False)] for m in methods}
    fig, axes, _ = plot_step_timelines(first, unit=unit)
    for ax in axes:
        ax.set_ylim(0, top)
    view = FigureView(fig)
    readout = widgets.HTML()
    box = widgets.VBox([slider, view.image, readout])

    def redraw(_=None):
        checkpointing = slider.value == "on"
        box.current = {m: timelines[(m, checkpointing)] for m in methods}
        redraw_step_timelines(axes, box.current, unit, top)
        view.refresh()
        readout.value = "<br>".join(f"<b>{tr(m)}</b>: {peak_sentence(t)}" for m, t in box.current.items())

    slider.observe(redraw, names="value")
    box.slider, box.figure, box.axes, box.image, box.readout, box.view = slider, fig, axes, view.image, readout, view
    redraw()
    return box

