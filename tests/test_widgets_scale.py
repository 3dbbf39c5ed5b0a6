"""Tests for lora_lab.widgets.scale: slider moves re-estimate (once per setting) and move the bars."""

import matplotlib

matplotlib.use("Agg")

from types import SimpleNamespace

import numpy as np

from lora_lab.widgets.scale import fit_explorer

GiB = 2**30
SIZE = {"small": 1, "big": 100}


def fake_estimate(preset, method, *, r, target_modules, batch_size, seq_len, gradient_checkpointing, optimizer):
    weights = SIZE[preset] * (0.5 if method == "qlora" else 2) * GiB
    trainable = SIZE[preset] * (12 if method == "full" else 0.01 * r * len(target_modules)) * GiB
    act = batch_size * seq_len * (1 if gradient_checkpointing else 8) * 2**20
    return SimpleNamespace(breakdown={"weights": weights, "training state": trainable, "activations": act})


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
    # the log axis stays fixed at 1-4096 GiB across presets; each bar's label gives its total
    assert box.figure.axes[0].get_ylim() == (1, 4096)
    total = box.current.totals[0]
    assert box.labels[0].get_text() == f"{total:,.1f} GiB" + (" (clipped)" if total > 4096 else "")


def test_rank_and_targets_only_move_adapter_methods():
    box = fit_explorer(fake_estimate, ["small"])
    low = box.current.totals.copy()
    box.controls["target_modules"].value = "all linear"
    diff = box.current.totals - low
    assert diff[0] == 0 and diff[1] > 0 and diff[2] > 0


def test_a_setting_the_estimator_rejects_shows_in_the_readout():
    def picky(preset, method, **kw):
        if kw["batch_size"] > 1:
            raise ValueError("pick a smaller batch")
        return fake_estimate(preset, method, **kw)

    box = fit_explorer(picky, ["small"])
    drawn = box.current
    box.controls["batch_size"].value = 4  # must not raise inside the widget callback
    assert "pick a smaller batch" in box.readout.value and box.current is drawn


def test_fit_explorer_moves_sliders_without_new_estimates():
    from lora_lab.estimator import Estimate, EstimateGrid
    from lora_lab.memory import MemoryBreakdown

    calls = []

    def multilinear_fake(preset, method, *, r, target_modules, batch_size, seq_len, gradient_checkpointing,
                         optimizer):
        calls.append(1)
        act = batch_size * seq_len * (100 + 3 * r) + 7 * seq_len
        return Estimate(preset, method, MemoryBreakdown(frozen_weights=GiB, trainable_weights=1000 * r,
                                                        activations=act), 500 * r, 10**9)

    grid = EstimateGrid(multilinear_fake, lambda preset: SimpleNamespace(max_position_embeddings=2048))
    box = fit_explorer(grid, ["small"])
    built = len(calls)
    for name, value in (("r", 64), ("batch_size", 32), ("seq_len", 2048), ("batch_size", 1), ("r", 1)):
        box.controls[name].value = value
    assert len(calls) == built  # the build ran every corner; the moves were arithmetic
    from lora_lab.widgets.scale import _kwargs

    lora = box.estimate("small", "lora", **_kwargs(box.controls))  # the answer drawn now (cached), in bytes
    assert lora.breakdown.activations == 1 * 2048 * (100 + 3 * 1) + 7 * 2048  # r=1, batch 1, seq_len 2048
