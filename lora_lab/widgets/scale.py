"""The "will it fit?" explorer: sliders on the estimator's inputs, one stacked bar per method, GPU-size lines.

Every slider has `continuous_update=False` and answers come from a cache, so a revisited setting redraws
without calling the estimator again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import ipywidgets as widgets

from ..plots.memory import to_png, update_stacked_bars
from ..plots.scale import ALL_LINEAR, GPU_SIZES_GB, QV, estimate_bars_data, fits_on, plot_fit

TARGETS = {"q_proj, v_proj": QV, "all linear": ALL_LINEAR}
RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
SEQ_LENS = (128, 256, 512, 1024, 2048, 4096, 8192)


def cached(estimate: Callable[..., object]) -> Callable[..., object]:
    """Memoize `estimate(preset, method, **kwargs)` on its (hashable) arguments; `.cache` holds the answers."""
    cache: dict = {}

    def call(preset, method, **kwargs):
        key = (preset, method, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = estimate(preset, method, **kwargs)
        return cache[key]

    call.cache = cache
    return call


def _controls(presets, optimizers):
    c = {
        "preset": widgets.Dropdown(options=list(presets), description="model"),
        "r": widgets.SelectionSlider(options=RANKS, value=8, description="r", continuous_update=False),
        "target_modules": widgets.Dropdown(options=list(TARGETS), description="targets"),
        "batch_size": widgets.SelectionSlider(options=BATCH_SIZES, value=1, description="batch_size",
                                              continuous_update=False),
        "seq_len": widgets.SelectionSlider(options=SEQ_LENS, value=512, description="seq_len",
                                           continuous_update=False),
        "gradient_checkpointing": widgets.Checkbox(value=True, description="gradient checkpointing"),
        "optimizer": widgets.Dropdown(options=list(optimizers), description="optimizer"),
    }
    for name in ("r", "batch_size", "seq_len"):
        c[name].add_class("lora-lab-e2e")
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
    (the StackedBars drawn now) and `estimate` (the cached estimator).
    """
    est = cached(estimate)
    controls = _controls(presets, optimizers)
    if preset is not None:
        controls["preset"].value = preset

    def data():
        return estimate_bars_data({m: est(controls["preset"].value, m, **_kwargs(controls)) for m in methods})

    fig, ax, bars = plot_fit(data(), gpu_sizes, title="estimated training memory")
    image, readout = widgets.Image(format="png"), widgets.HTML()
    c = controls
    box = widgets.VBox([widgets.HBox([c["preset"], c["optimizer"]]), widgets.HBox([c["r"], c["target_modules"]]),
                        widgets.HBox([c["batch_size"], c["seq_len"]]), c["gradient_checkpointing"], image, readout])

    def redraw(_=None):
        box.current = data()
        update_stacked_bars(bars, box.current)
        ax.set_ylim(0, max(float(box.current.totals.max()), max(gpu_sizes)) * 1.1)
        image.value = to_png(fig)
        readout.value = "<br>".join(
            f"<b>{m}</b>: {t:,.1f} GiB &rarr; fits on: "
            f"{', '.join(f'{g:g} GB' for g in fits_on(t * 2**30, gpu_sizes)) or 'none of these GPUs'}"
            for m, t in zip(box.current.labels, box.current.totals))

    box.controls, box.figure, box.bars, box.image, box.readout, box.estimate = controls, fig, bars, image, readout, est
    for w in controls.values():
        w.observe(redraw, names="value")
    redraw()
    return box
