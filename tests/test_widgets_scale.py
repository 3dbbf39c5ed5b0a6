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
