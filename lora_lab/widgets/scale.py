"""The "will it fit?" explorer: sliders on the estimator's inputs, one stacked bar per method, GPU-size lines.

Every slider has `continuous_update=False` and answers come from a cache, so a revisited setting redraws
without calling the estimator again.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from fractions import Fraction

import ipywidgets as widgets

from ..plots.scale import (GPU_SIZES_GB, LLAMA_LINEAR_NAMES, QV, estimate_bars_data, fits_on, plot_fit_explorer,
                           update_fit)
from ._view import FigureView, e2e_slider

TARGETS = {"q_proj, v_proj": QV, "all linear": LLAMA_LINEAR_NAMES}
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
        e2e_slider(c[name])
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
    if hasattr(estimate, "warm"):  # a `slider_grid`: run the starting setting's corners, so moves are arithmetic
        kw = _kwargs(controls)
        estimate.warm(controls["preset"].value, methods, **{k: kw[k] for k in _COMBO})

    def data():
        return estimate_bars_data({m: est(controls["preset"].value, m, **_kwargs(controls)) for m in methods})

    fig, ax, bars, labels = plot_fit_explorer(data(), gpu_sizes, title="estimated training memory")
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
        update_fit(ax, bars, labels, box.current)
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


_SLIDERS = ("r", "batch_size", "seq_len")
_COMBO = ("target_modules", "gradient_checkpointing", "optimizer")


def multilinear(point, axes, corners: dict) -> dict:
    """Evaluate the multilinear function through `corners` at `point`, in exact rationals.

    Args:
        point: one value per axis; axes: per axis the anchor values, two (x0, x1) or one (x0,) for an axis the
            function does not vary along; corners: {one anchor per axis: {name: int}}.

    Returns:
        {name: Fraction}: f(x) = Σ_corners Π_axes w_axis · f(corner), w = (x − x_other) / (x_corner − x_other).
    """
    out = dict.fromkeys(next(iter(corners.values())), Fraction(0))
    for corner, values in corners.items():
        w = Fraction(1)
        for x, c, anchors in zip(point, corner, axes):
            if len(anchors) == 2:
                other = anchors[1] if c == anchors[0] else anchors[0]
                w *= Fraction(x - other, c - other)
        for name in out:
            out[name] += w * values[name]
    return out


def slider_grid(estimate: Callable[..., object], model_config: Callable[[str], object], ranks=(8, 64),
                batch_sizes=(2, 4), seq_lens=(512, 1024)):
    """A fast `estimate` for the sliders: a few corner estimates, then exact arithmetic for r, batch, seq_len.

    For one model, method, target set, checkpointing choice and optimizer, every byte count the estimator
    returns is multilinear in (r, batch_size, seq_len): weights, gradients and optimizer state are
    a + b·r (adapters are r·(in + out) per target), and each saved activation is a tensor whose size is a
    product such as B·T·C, B·T·r (lora_A's output) or T·D (the RoPE tables; with flash attention there is no
    T×T matrix). A multilinear function is fixed by its values at the 2×2×2 corners (two anchors per axis):
    f(x) = Σ_corners Π_axes (x − x_other) / (x_corner − x_other) · f(corner).

    One exception, found by the tests: the loss flattens ``labels[:, 1:]`` (and ``logits[:, :-1]``), a view
    of the whole storage at batch_size 1 but a copy from 2 on, so batch_size 1 is its own (r, seq_len) slab
    and the corners of batch_size ≥ 2 sit at `batch_sizes`. ``full`` ignores r, so its corners are 1×2 (or
    2×2).

    # Note: QLoRA is LoRA plus a constant
    QLoRA trains the same adapters (same trainable weights, gradients, optimizer state) and saves the same
    activations: its dequantize-matmul keeps the quantized state, not a tensor, and the frozen 16-bit weight
    LoRA's linear saves is a parameter, which costs nothing extra. Only the frozen weights differ (NF4 codes
    and absmax against 16 bit), and they do not move with the sliders. So qlora(x) = lora(x) + qlora(c) −
    lora(c) for one corner c of each slab: two QLoRA runs instead of twelve (QLoRA's runs are the slowest,
    they quantize every weight). The tests check this byte for byte too.

    Anything else (other keyword arguments, a config instead of a preset name, seq_len above the
    model's positions, a non-integer result) goes to `estimate` itself. tests/test_widgets_scale.py compares
    the arithmetic with direct estimates byte for byte.

    Args:
        estimate: `call(preset, method, r=, target_modules=, batch_size=, seq_len=, gradient_checkpointing=,
            optimizer=)`, e.g. `depth_extrapolated(lora_lab.memory.estimate, model_config)`.
        model_config: preset name -> LlamaConfig (for its ``max_position_embeddings``).
        ranks, batch_sizes, seq_lens: the anchors (two distinct values each; batch sizes ≥ 2).

    Returns:
        `call(preset, method, **kwargs)` with `.corners` (the estimates it ran) and
        `.warm(preset, methods, **combo)` (run both slabs' corners for every method now).
    """
    corners: dict = {}

    def axes(method, batch_size):
        return ((ranks[0],) if method == "full" else ranks, (1,) if batch_size == 1 else batch_sizes, seq_lens)

    def corner(preset, method, point, combo):
        key = (preset, method, point, tuple(sorted(combo.items())))
        if key not in corners:
            corners[key] = estimate(preset, method, **dict(zip(_SLIDERS, point)), **combo)
        return corners[key]

    def values(e):
        return {**e.breakdown.as_dict(), "trainable_params": e.trainable_params, "total_params": e.total_params}

    def interpolate(preset, method, x, combo):
        ax = axes(method, x[1])
        ests = {p: corner(preset, method, p, combo) for p in itertools.product(*ax)}
        return multilinear(x, ax, {p: values(e) for p, e in ests.items()}), next(iter(ests.values()))

    def call(preset, method, **kwargs):
        combo = {k: kwargs[k] for k in _COMBO if k in kwargs}
        fits = (isinstance(preset, str) and set(kwargs) == set(_SLIDERS + _COMBO)
                and max(kwargs["seq_len"], *seq_lens) <= model_config(preset).max_position_embeddings)
        if not fits:
            return estimate(preset, method, **kwargs)
        x = tuple(kwargs[k] for k in _SLIDERS)
        if method == "qlora":  # Note: QLoRA is LoRA plus a constant (docstring); one corner gives the constant
            got, _ = interpolate(preset, "lora", x, combo)
            c0 = next(itertools.product(*axes(method, x[1])))
            first = corner(preset, method, c0, combo)
            q0, l0 = values(first), values(corner(preset, "lora", c0, combo))
            got = {k: v + q0[k] - l0[k] for k, v in got.items()}
        else:
            got, first = interpolate(preset, method, x, combo)
        if any(v.denominator != 1 or v < 0 for v in got.values()):  # not multilinear after all: ask directly
            return estimate(preset, method, **kwargs)
        got = {k: int(v) for k, v in got.items()}
        params = {k: got.pop(k) for k in ("trainable_params", "total_params")}
        return dataclasses.replace(first, breakdown=dataclasses.replace(first.breakdown, **got), **params)

    def warm(preset, methods, **combo):
        for method, b in itertools.product(methods, (1, batch_sizes[0])):  # one point of each slab runs its corners
            call(preset, method, r=ranks[0], batch_size=b, seq_len=seq_lens[0], **combo)

    call.corners, call.warm = corners, warm
    return call
