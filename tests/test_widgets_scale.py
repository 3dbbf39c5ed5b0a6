"""Tests for lora_lab.widgets.scale: slider moves re-estimate (once per setting) and move the bars."""

import matplotlib

matplotlib.use("Agg")

from types import SimpleNamespace

import numpy as np

from lora_lab.widgets.scale import cached, fit_explorer

GiB = 2**30
SIZE = {"small": 1, "big": 100}


def fake_estimate(preset, method, *, r, target_modules, batch_size, seq_len, gradient_checkpointing, optimizer):
    weights = SIZE[preset] * (0.5 if method == "qlora" else 2) * GiB
    trainable = SIZE[preset] * (12 if method == "full" else 0.01 * r * len(target_modules)) * GiB
    act = batch_size * seq_len * (1 if gradient_checkpointing else 8) * 2**20
    return SimpleNamespace(breakdown={"weights": weights, "training state": trainable, "activations": act})


def test_cached_calls_estimator_once_per_setting():
    calls = []
    est = cached(lambda p, m, **kw: calls.append(1) or len(calls))
    assert est("a", "lora", r=1) == est("a", "lora", r=1) == 1
    assert est("a", "lora", r=2) == 2 and len(est.cache) == 2


def test_seq_len_slider_moves_activation_bars():
    box = fit_explorer(fake_estimate, ["small", "big"])
    act = box.current.categories.index("activations")
    before, png = box.current.values[act].copy(), box.image.value
    box.controls["seq_len"].value = 2048
    np.testing.assert_allclose(box.current.values[act], before * 4)  # 512 -> 2048
    assert box.bars["activations"][0].get_height() == box.current.values[act][0]
    assert box.image.value != png


def test_preset_switch_changes_fit_readout():
    box = fit_explorer(fake_estimate, ["small", "big"])
    assert "<b>qlora</b>" in box.readout.value and "fits on: 24 GB" in box.readout.value
    box.controls["preset"].value = "big"
    assert "none of these GPUs" in box.readout.value
    # the axis stays at 0-100 GiB; bars above it are clipped and say so in their label
    assert box.figure.axes[0].get_ylim() == (0, 100)
    assert box.labels[0].get_text() == f"{box.current.totals[0]:,.1f} GiB (clipped)"


def test_rank_and_targets_only_move_adapter_methods():
    box = fit_explorer(fake_estimate, ["small"])
    low = box.current.totals.copy()
    box.controls["target_modules"].value = "all linear"
    diff = box.current.totals - low
    assert diff[0] == 0 and diff[1] > 0 and diff[2] > 0


def test_depth_extrapolation_equals_full_depth_estimate():
    from lora_lab.memory import estimate
    from lora_lab.model import LlamaConfig
    from lora_lab.widgets.scale import depth_extrapolated

    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=7,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    fast = depth_extrapolated(estimate, lambda name: cfg)
    for method, gc in (("lora", True), ("full", False)):
        kw = dict(r=4, batch_size=2, seq_len=16, gradient_checkpointing=gc)
        want, got = estimate(cfg, method, **kw), fast("tiny", method, **kw)
        assert got.breakdown.as_dict() == want.breakdown.as_dict()  # exact: every category is linear in depth
        assert (got.trainable_params, got.total_params) == (want.trainable_params, want.total_params)


def test_a_setting_the_estimator_rejects_shows_in_the_readout():
    def picky(preset, method, **kw):
        if kw["batch_size"] > 1:
            raise ValueError("pick a smaller batch")
        return fake_estimate(preset, method, **kw)

    box = fit_explorer(picky, ["small"])
    drawn = box.current
    box.controls["batch_size"].value = 4  # must not raise inside the widget callback
    assert "pick a smaller batch" in box.readout.value and box.current is drawn


# ----------------------------------------------------------------------- slider_grid: corners, then arithmetic

def _two_layer(name):
    import dataclasses

    from lora_lab.memory import model_config

    return dataclasses.replace(model_config(name), num_hidden_layers=2)  # depth is linear (test above)


def _estimate_two_layer(preset, method, **kw):
    from lora_lab.memory import estimate

    return estimate(_two_layer(preset), method, **kw)


def test_multilinear_is_exact_on_a_multilinear_function():
    from fractions import Fraction

    from lora_lab.widgets.scale import multilinear

    def f(r, b, t):
        return {"x": 7 + 3 * t + 5 * b * t + 11 * r * b * t + 2 * r}

    axes = ((8, 64), (2, 4), (512, 1024))
    corners = {(r, b, t): f(r, b, t) for r in axes[0] for b in axes[1] for t in axes[2]}
    for point in ((1, 32, 128), (256, 3, 2048), (8, 2, 512)):
        assert multilinear(point, axes, corners) == {"x": Fraction(f(*point)["x"])}


# One combination per method, chosen to cover both target sets, checkpointing on and off, both optimizers;
# points cover batch_size 1 (its own slab) and 2..32, r from 1 to 256, seq_len from 128 to 2048.
GRID_CASES = [
    ("llama-7b", "lora", dict(target_modules=("q_proj", "v_proj"), gradient_checkpointing=True, optimizer="adamw"),
     [(1, 1, 128), (256, 32, 2048), (32, 2, 256), (4, 16, 1024)]),
    ("llama-2-70b", "qlora", dict(target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"), gradient_checkpointing=False, optimizer="sgd"),
     [(2, 1, 2048), (128, 8, 128), (1, 2, 512)]),
    ("gpt3-175b", "full", dict(target_modules=("q_proj", "v_proj"), gradient_checkpointing=False, optimizer="adamw"),
     [(16, 1, 256), (8, 32, 2048), (1, 2, 128)]),
    ("llama-7b", "qlora", dict(target_modules=("q_proj", "v_proj"), gradient_checkpointing=True, optimizer="adamw"),
     [(1, 1, 2048), (64, 4, 128)]),  # QLoRA = LoRA's arithmetic + a constant, here on the first case's corners
]


def test_slider_grid_equals_the_estimator_byte_for_byte():
    from lora_lab.widgets.scale import slider_grid

    grid = slider_grid(_estimate_two_layer, _two_layer)
    for preset, method, combo, points in GRID_CASES:
        for r, b, t in points:
            kw = dict(r=r, batch_size=b, seq_len=t, **combo)
            got, want = grid(preset, method, **kw), _estimate_two_layer(preset, method, **kw)
            assert got.breakdown == want.breakdown, (preset, method, kw)  # integers, no tolerance
            assert (got.trainable_params, got.total_params) == (want.trainable_params, want.total_params)
    # every answer came from the corners: 2x2 at batch 1 + 2x2x2 above (full: r is not an axis, so half);
    # QLoRA runs LoRA's corners and one QLoRA corner per slab
    assert len(grid.corners) == 12 + (12 + 2) + 6 + 2


def test_slider_grid_leaves_other_calls_to_the_estimator():
    import pytest

    from lora_lab.widgets.scale import slider_grid

    calls = []

    def spy(preset, method, **kw):
        calls.append(kw)
        return _estimate_two_layer(preset, method, **kw)

    grid = slider_grid(spy, _two_layer)
    grid("llama-7b", "lora", r=4)  # not the slider set: one direct call, no corners
    assert calls == [{"r": 4}] and not grid.corners
    with pytest.raises(ValueError, match="max_position_embeddings"):  # the estimator's own error, not extrapolated
        grid("llama-7b", "lora", r=8, target_modules=("q_proj", "v_proj"), batch_size=1, seq_len=4096, gradient_checkpointing=True,
             optimizer="adamw")



def test_fit_explorer_moves_sliders_without_new_estimates():
    from lora_lab.memory import Estimate, MemoryBreakdown
    from lora_lab.widgets.scale import slider_grid

    calls = []

    def multilinear_fake(preset, method, *, r, target_modules, batch_size, seq_len, gradient_checkpointing,
                         optimizer):
        calls.append(1)
        act = batch_size * seq_len * (100 + 3 * r) + 7 * seq_len
        return Estimate(preset, method, MemoryBreakdown(frozen_weights=GiB, trainable_weights=1000 * r,
                                                        activations=act), 500 * r, 10**9)

    grid = slider_grid(multilinear_fake, lambda preset: SimpleNamespace(max_position_embeddings=2048))
    box = fit_explorer(grid, ["small"])
    built = len(calls)
    for name, value in (("r", 64), ("batch_size", 32), ("seq_len", 2048), ("batch_size", 1), ("r", 1)):
        box.controls[name].value = value
    assert len(calls) == built  # the build ran every corner; the moves were arithmetic
    from lora_lab.widgets.scale import _kwargs

    lora = box.estimate("small", "lora", **_kwargs(box.controls))  # the answer drawn now (cached), in bytes
    assert lora.breakdown.activations == 1 * 2048 * (100 + 3 * 1) + 7 * 2048  # r=1, batch 1, seq_len 2048
