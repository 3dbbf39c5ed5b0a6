"""Widgets for the memory notebook: a slider explorer over a grid of measured breakdowns, and a live dashboard
that shows the latest recorded step from the inside.

Sliders never measure: `measure_grid` measures every setting once when the notebook runs, and the explorer
looks the answer up, so a slider move only updates bar heights and re-renders a small PNG.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable, Mapping, Sequence

import ipywidgets as widgets
import torch

from ..lora import LoraConfig
from ..plots import to_png
from ..plots.memory import breakdown_dict, plot_dashboard, plot_fixed_bars, stacked_bar_data, update_stacked_bars
from ..plots.timeline import draw_step_timeline, human_unit, peak_parts, peak_sentence
from ..timeline import StepTimeline, TimelineRecorder
from ..train import measure, prepare_model
from ..i18n import tr
from ._view import FigureView, e2e_slider

GridKey = tuple[int, int, int]  # (r, batch_size, seq_len)


def measure_grid(measure: Callable[..., object], methods: Sequence[str], ranks: Sequence[int],
                 batch_sizes: Sequence[int], seq_lens: Sequence[int]) -> dict[GridKey, dict[str, dict[str, int]]]:
    """Measured breakdowns for every (r, batch_size, seq_len) and method.

    Args:
        measure: `measure(method, r=..., batch_size=..., seq_len=...)` returning a breakdown (bytes by category).
        methods: e.g. ("full", "lora", "qlora"). "full" does not depend on r, so it is measured once per
            (batch_size, seq_len) and reused across ranks.

    Returns:
        `grid[(r, batch_size, seq_len)][method] = {category: bytes}`.
    """
    grid: dict[GridKey, dict[str, dict[str, int]]] = {}
    full_cache: dict[tuple[int, int], dict[str, int]] = {}
    for r, b, t in itertools.product(ranks, batch_sizes, seq_lens):
        row = {}
        for m in methods:
            if m == "full":
                if (b, t) not in full_cache:
                    full_cache[(b, t)] = breakdown_dict(measure(m, r=r, batch_size=b, seq_len=t))
                row[m] = full_cache[(b, t)]
            else:
                row[m] = breakdown_dict(measure(m, r=r, batch_size=b, seq_len=t))
        grid[(r, b, t)] = row
    return grid


def tiny_measure(base_model, target_modules=("q_proj", "v_proj"), device=None, seed: int = 0):
    """A `measure(method, r=, batch_size=, seq_len=)` for `measure_grid`: one real training step on a fresh copy
    of `base_model` prepared as `finetune` prepares it, counted by `lora_lab.train.measure`.

    The batch is random token ids (memory does not depend on their values); `lora_alpha = 2r`.
    """
    vocab = base_model.config.vocab_size
    prepared: dict = {}  # (method, r) -> model: preparing (quantizing) once per rank; each step still starts
    # from no gradients and a fresh optimizer (`measure` sets grads to None and uses a throwaway AdamW, lr=0)

    def run(method, *, r, batch_size, seq_len):
        key = (method, None if method == "full" else r)
        if key not in prepared:
            config = None if method == "full" else LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules)
            prepared[key] = prepare_model(copy.deepcopy(base_model).to(device or "cpu"), method, config)
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g).to(device or "cpu")
        return measure(prepared[key], (ids, ids))

    return run


def _axis_values(grid: Mapping[GridKey, object], i: int) -> list[int]:
    return sorted({k[i] for k in grid})


def memory_explorer(grid: Mapping[GridKey, Mapping[str, Mapping[str, int]]], unit: str = "MiB") -> widgets.VBox:
    """Sliders for rank, batch size and sequence length over a measured grid; one stacked bar per method.

    The returned box has attributes `sliders` (dict name -> SelectionSlider), `figure`, `bars`, `image`,
    `readout` and `current` (the StackedBars drawn now), so tests and notebooks can read the data behind it.
    A combination the grid lacks hides the figure, sets `current` to None and says so in the readout.
    """
    if not grid:
        raise ValueError("the grid is empty; measure at least one setting with measure_grid(...).")
    names = ("r", "batch_size", "seq_len")
    sliders = {n: widgets.SelectionSlider(options=_axis_values(grid, i), description=n,
                                          continuous_update=False) for i, n in enumerate(names)}
    first = tuple(s.options[len(s.options) // 2] for s in sliders.values())  # start in the middle of the grid
    if first not in grid:
        first = next(iter(grid))
    for n, v in zip(names, first):
        sliders[n].value = v
    ymax = max(stacked_bar_data(row, unit).totals.max() for row in grid.values())  # the axis holds the whole grid
    fig, _, bars = plot_fixed_bars(stacked_bar_data(grid[first], unit), ymax, title="measured memory")
    view = FigureView(fig, animated=[rect for container in bars.values() for rect in container])
    image, readout = view.image, widgets.HTML()
    box = widgets.VBox([widgets.HBox(list(sliders.values())[:2]), sliders["seq_len"], image, readout])
    for s in sliders.values():
        e2e_slider(s)

    def redraw(_=None):
        key = tuple(sliders[n].value for n in names)
        if key not in grid:  # a setting the grid lacks: say so, and do not leave the last setting's bars up
            box.current = None
            view.hide()
            readout.value = (f"<b>r={key[0]}, batch_size={key[1]}, seq_len={key[2]} was not measured</b>; pick "
                             "another setting, or add it to measure_grid(...).")
            return
        box.current = stacked_bar_data(grid[key], unit)
        update_stacked_bars(bars, box.current)
        view.refresh()  # axes limits are fixed over the grid: only the bars are redrawn (blitting)
        totals = ", ".join(f"{m}: {t:,.2f} {unit}" for m, t in zip(box.current.labels, box.current.totals))
        readout.value = f"r={key[0]}, batch_size={key[1]}, seq_len={key[2]} &rarr; {totals}"

    for s in sliders.values():
        s.observe(redraw, names="value")
    box.sliders, box.figure, box.bars, box.image, box.readout, box.view = sliders, fig, bars, image, readout, view
    redraw()
    return box


def cuda_stats() -> dict[str, int] | None:
    """{"allocated", "peak"} bytes from `torch.cuda` on a CUDA machine, else None."""
    if not torch.cuda.is_available():
        return None
    return {"allocated": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()}


class MemoryDashboard:
    """A live memory dashboard: stacked bars (one per method) and, beside them, the latest recorded step from
    the inside (a stacked area over its events: `lora_lab.plots.timeline`).

    Feed it with `update(method, step, breakdown, cuda=None, timeline=None)` from a training callback
    (`callback` builds one); it redraws at most every `min_interval` seconds, and so that rendering takes at most
    `render_share` of the time (a redraw that took 0.3 s waits 0.9 s at 0.25: training must not wait for PNG
    rendering; None: no such limit), and always on `finish()`. `cuda` is an optional dict such as
    {"allocated": bytes, "peak": bytes} from `torch.cuda`, shown beside it; `timeline` a `StepTimeline` of the
    same step (`TimelineRecorder`).

    Attributes:
        latest: the latest breakdown per method (bytes by category); ``timeline``: the latest step timeline and
            its method and step, ``(method, step, StepTimeline)``, or None before the first.
    """

    def __init__(self, methods: Sequence[str], categories: Sequence[str], unit: str = "MiB",
                 min_interval: float = 0.25, render_share: float | None = 0.25):
        if render_share is not None and not 0 < render_share <= 1:
            raise ValueError(f"render_share must be in (0, 1] or None, got {render_share!r}.")
        self.methods, self.categories = tuple(methods), tuple(categories)
        self.unit, self.min_interval, self.render_share = unit, min_interval, render_share
        self.latest = {m: dict.fromkeys(self.categories, 0) for m in self.methods}
        self.timeline: tuple[str, int, StepTimeline] | None = None
        self.cuda: dict[str, dict[str, int]] = {}
        self.figure, (self.ax_bar, self.ax_step), self.bars = plot_dashboard(self.data(), unit)
        self.image, self.readout = widgets.Image(format="png"), widgets.HTML()
        self.widget = widgets.VBox([self.image, self.readout])
        self._last_draw, self._draw_seconds, self._drawn_timeline = 0.0, 0.0, None
        self.redraw()

    def data(self):
        """The StackedBars behind the bar chart (latest breakdown per method)."""
        return stacked_bar_data({m: self.latest[m] for m in self.methods}, self.unit)

    def update(self, method: str, step: int, breakdown, cuda: Mapping[str, int] | None = None,
               timeline: StepTimeline | None = None) -> None:
        if method not in self.latest:
            raise ValueError(f"unknown method {method!r}; the dashboard was built for {self.methods}.")
        if timeline is not None and not isinstance(timeline, StepTimeline):
            raise TypeError(f"timeline must be a StepTimeline (from TimelineRecorder), got {type(timeline).__name__}.")
        parts = breakdown_dict(breakdown)
        self.latest[method] = {c: parts.get(c, 0) for c in self.categories}
        if timeline is not None:
            self.timeline = (method, step, timeline)
        if cuda:
            self.cuda[method] = dict(cuda)
        if time.perf_counter() - self._last_draw >= self._gap():
            self.redraw()

    def _gap(self) -> float:
        """Seconds to wait after a redraw: `min_interval`, or longer where the last rendering was slow."""
        if self.render_share is None:
            return self.min_interval
        return max(self.min_interval, self._draw_seconds * (1 / self.render_share - 1))

    def callback(self, method: str, recorder: TimelineRecorder | None = None):
        """A `finetune(callback=...)` hook: shows each new measured breakdown in `history.memory` (and, on CUDA,
        `torch.cuda.memory_allocated` / `max_memory_allocated`), and with a `TimelineRecorder` open around the
        training, the latest step it recorded."""
        seen = [0]

        def on_step(history) -> None:
            if len(history.memory) > seen[0]:
                seen[0] = len(history.memory)
                timeline = recorder.latest if recorder is not None else None
                self.update(method, history.memory_steps[-1], history.memory[-1], cuda=cuda_stats(),
                            timeline=timeline)

        return on_step

    def redraw(self) -> None:
        start = time.perf_counter()
        data = self.data()
        update_stacked_bars(self.bars, data, ax=self.ax_bar)
        if self.timeline is not None and self.timeline is not self._drawn_timeline:
            method, step, timeline = self.timeline
            peak, where, biggest = peak_parts(timeline)
            draw_step_timeline(self.ax_step, timeline, human_unit(timeline.peak)[0], legend=False,
                               title=tr("{method}, inside step {step}: {peak}\n{where}: {biggest}", method=tr(method),
                                        step=step, peak=peak, where=where, biggest=biggest))
            self._drawn_timeline = self.timeline
        self.image.value = to_png(self.figure)
        self.readout.value = self._readout_html(data)
        self._last_draw = time.perf_counter()
        self._draw_seconds = self._last_draw - start

    def finish(self) -> None:
        """Final redraw after training (the throttle may have skipped the last updates)."""
        self.redraw()

    def _readout_html(self, data) -> str:
        rows = [f"{tr(m)}: {t:,.2f} {self.unit}" for m, t in zip(data.labels, data.totals)]
        for m, c in self.cuda.items():
            rows.append(f"{m} (CUDA): allocated {c.get('allocated', 0) / 2**20:,.1f} MiB, "
                        f"peak {c.get('peak', 0) / 2**20:,.1f} MiB")
        if self.timeline is not None:
            method, step, timeline = self.timeline
            rows.append(tr("{method}, step {step}: {peak}", method=tr(method), step=step, peak=peak_sentence(timeline)))
        return "<br>".join(rows)
