"""The "will it fit?" explorer: sliders on the estimator's inputs, one stacked bar per method, GPU-size lines.

Every slider has `continuous_update=False` and answers come from a cache, so a revisited setting redraws
without calling the estimator again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import ipywidgets as widgets

from ..plots.memory import update_stacked_bars
from ..plots.scale import ALL_LINEAR, GPU_SIZES_GB, QV, estimate_bars_data, fits_on, plot_fit
from ._view import FigureView

TARGETS = {"q_proj, v_proj": QV, "all linear": ALL_LINEAR}
RANKS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
SEQ_LENS = (128, 256, 512, 1024, 2048)  # every preset has at least 2048 positions


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
    top = 1.25 * max(gpu_sizes)
    ax.set_ylim(0, top)  # fixed, so a move redraws only bars and labels; taller bars are clipped and labelled
    labels = [ax.text(i, 0, "", ha="center", va="bottom", fontsize=8) for i in range(len(methods))]
    view = FigureView(fig, animated=[r for c in bars.values() for r in c] + labels)
    image, readout = view.image, widgets.HTML()
    c = controls
    box = widgets.VBox([widgets.HBox([c["preset"], c["optimizer"]]), widgets.HBox([c["r"], c["target_modules"]]),
                        widgets.HBox([c["batch_size"], c["seq_len"]]), c["gradient_checkpointing"], image, readout])

    def redraw(_=None):
        try:
            box.current = data()
        except ValueError as err:  # a setting this model cannot run (e.g. seq_len above its positions): say so
            readout.value = f"<b>{err}</b>"
            return
        update_stacked_bars(bars, box.current)
        for label, total in zip(labels, box.current.totals):
            label.set_position((label.get_position()[0], min(total, 0.93 * top)))
            label.set_text(f"{total:,.1f} GiB" + (" (clipped)" if total > top else ""))
        view.refresh()
        readout.value = "<br>".join(
            f"<b>{m}</b>: {t:,.1f} GiB &rarr; fits on: "
            f"{', '.join(f'{g:g} GB' for g in fits_on(t * 2**30, gpu_sizes)) or 'none of these GPUs'}"
            for m, t in zip(box.current.labels, box.current.totals))

    box.controls, box.figure, box.bars, box.image, box.readout, box.estimate = controls, fig, bars, image, readout, est
    box.labels, box.view = labels, view
    for w in controls.values():
        w.observe(redraw, names="value")
    redraw()
    return box


def depth_extrapolated(estimate: Callable[..., object], model_config: Callable[[str], object]):
    """A fast `estimate` for deep presets: run it on 2- and 3-layer copies of the config and extend by depth.

    From two layers on, every category is linear in the number of decoder layers L: each layer adds its
    weights, gradients, optimizer state and saved activations (with gradient checkpointing: its input; the
    last layer keeps all of its activations at every depth). So  m(L) = m(2) + (L − 2) · (m(3) − m(2))
    exactly, for a cost of five layers instead of L (the notebook checks it against a full-depth estimate).
    (One layer is a special case: its input is the embedding output, which it saves anyway.)

    Args:
        estimate: `lora_lab.memory.estimate`; `model_config`: preset name -> LlamaConfig (a dataclass).

    Returns:
        `call(preset, method, **kwargs)` returning the estimate's own dataclass, with the preset's name.
    """
    def call(preset, method, **kwargs):
        cfg = model_config(preset)
        depth = cfg.num_hidden_layers
        if depth <= 3:
            return estimate(preset, method, **kwargs)
        e1, e2 = (estimate(dataclasses.replace(cfg, num_hidden_layers=n), method, **kwargs) for n in (2, 3))

        def grow(a, b):
            return a + (depth - 2) * (b - a)

        b1, b2 = e1.breakdown.as_dict(), e2.breakdown.as_dict()
        breakdown = dataclasses.replace(e1.breakdown, **{k: grow(b1[k], b2[k]) for k in b1})
        return dataclasses.replace(e1, model=preset if isinstance(preset, str) else e1.model, breakdown=breakdown,
                                   trainable_params=grow(e1.trainable_params, e2.trainable_params),
                                   total_params=grow(e1.total_params, e2.total_params))

    return call
