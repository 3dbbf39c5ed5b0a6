"""Tests for lora_lab.widgets.memory: slider moves look up the measured grid; the dashboard follows updates."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import torch
import pytest

from lora_lab.widgets import E2E_CLASS
from lora_lab.widgets.memory import MemoryDashboard, measure_grid, memory_explorer

CATS = ("weights", "trainable", "gradients", "optimizer", "activations")


def fake_measure(method, *, r, batch_size, seq_len):
    """Synthetic breakdown: activations grow with batch*seq, adapters with r (MiB)."""
    lora = method != "full"
    return {"weights": 10 * 2**20, "trainable": (r if lora else 10) * 2**20, "gradients": (r if lora else 10) * 2**20,
            "optimizer": 2 * (r if lora else 10) * 2**20, "activations": batch_size * seq_len * 2**20}


@pytest.fixture
def grid():
    calls = []

    def measure(method, **kw):
        calls.append((method, kw))
        return fake_measure(method, **kw)

    g = measure_grid(measure, ("full", "lora"), ranks=(1, 8), batch_sizes=(1, 4), seq_lens=(2, 3))
    g["calls"] = calls
    return g


def test_grid_measures_full_once_per_shape(grid):
    calls = grid.pop("calls")
    assert len(grid) == 8
    assert sum(m == "full" for m, _ in calls) == 4  # full does not depend on r
    assert sum(m == "lora" for m, _ in calls) == 8


def test_explorer_slider_looks_up_grid(grid):
    grid.pop("calls")
    box = memory_explorer(grid)
    box.sliders["seq_len"].value = 2
    box.sliders["batch_size"].value = 1
    before = box.current.totals.copy()
    png = box.image.value
    box.sliders["batch_size"].value = 4
    # activations for lora: batch 4 * seq 2 = 8 MiB instead of 2 MiB
    assert box.current.values[CATS.index("activations"), 1] == 8
    assert box.bars["activations"][1].get_height() == 8
    np.testing.assert_allclose(box.current.totals - before, [6, 6])
    assert box.image.value != png
    assert "batch_size=4" in box.readout.value


def test_explorer_sliders_are_marked_for_the_browser_test(grid):
    grid.pop("calls")
    box = memory_explorer(grid)
    assert all(E2E_CLASS in s._dom_classes for s in box.sliders.values())


def test_explorer_rank_changes_only_lora(grid):
    grid.pop("calls")
    box = memory_explorer(grid)
    box.sliders["r"].value = 1
    low = box.current.totals.copy()
    box.sliders["r"].value = 8
    diff = box.current.totals - low
    assert diff[0] == 0 and diff[1] == 28  # (8-1) MiB * (param + grad + 2 optimizer moments)


def test_explorer_rejects_empty_grid():
    with pytest.raises(ValueError):
        memory_explorer({})


def test_dashboard_bars_follow_updates():
    dash = MemoryDashboard(("full", "lora"), CATS, min_interval=0.0, render_share=None)
    png = dash.image.value
    dash.update("lora", 1, fake_measure("lora", r=4, batch_size=1, seq_len=1))
    dash.update("lora", 2, fake_measure("lora", r=4, batch_size=2, seq_len=1), cuda={"allocated": 2**20, "peak": 2**21})
    assert dash.bars["activations"][1].get_height() == 2
    assert dash.image.value != png
    assert "peak 2.0 MiB" in dash.readout.value
    assert dash.timeline is None  # no step recorded: the step axis still says how to fill it


def test_dashboard_shows_the_latest_recorded_step_inside():
    from lora_lab.timeline import MemoryEvent, StepTimeline

    dash = MemoryDashboard(("lora",), CATS, min_interval=0.0, render_share=None)
    step = StepTimeline(start={"frozen_weights": 2**20}, events=[
        MemoryEvent("forward", "activations", "layer", 3 * 2**20), MemoryEvent("backward", "activations", "layer",
                                                                             -3 * 2**20)], step=10)
    dash.update("lora", 10, fake_measure("lora", r=4, batch_size=1, seq_len=1), timeline=step)
    assert dash.timeline == ("lora", 10, step)
    assert "lora, inside step 10: peak 4.0 MiB" in dash.ax_step.get_title()
    assert "peak 4.0 MiB at the end of the forward pass: saved activations 3.0 MiB" in dash.readout.value
    heights = sum(np.asarray(c.get_paths()[0].vertices)[:, 1].max() for c in dash.ax_step.collections[:2])
    assert heights >= 4.0  # the stacked area reaches the peak, in MiB (1 MiB of weights + 3 MiB saved)
    with pytest.raises(TypeError):
        dash.update("lora", 11, {}, timeline={"activations": 1})


def test_dashboard_waits_longer_after_a_slow_redraw_and_finish_always_draws():
    dash = MemoryDashboard(("lora",), CATS, min_interval=0.0, render_share=0.25)
    dash._draw_seconds = 10.0  # as if the last rendering took 10 s: the next may come 30 s later at the earliest
    png = dash.image.value
    dash.update("lora", 1, fake_measure("lora", r=4, batch_size=2, seq_len=1))
    assert dash.image.value == png and dash.bars["activations"][0].get_height() == 0  # not drawn yet
    dash.finish()
    assert dash.bars["activations"][0].get_height() == 2 and dash.image.value != png
    with pytest.raises(ValueError, match="render_share"):
        MemoryDashboard(("lora",), CATS, render_share=0.0)


def test_dashboard_rejects_unknown_method():
    dash = MemoryDashboard(("lora",), CATS)
    with pytest.raises(ValueError):
        dash.update("qlora", 1, {})


def test_tiny_measure_counts_a_real_step():
    from lora_lab.model import LlamaConfig, LlamaForCausalLM
    from lora_lab.widgets.memory import tiny_measure

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    measure = tiny_measure(base)
    lora4, lora8 = (measure("lora", r=r, batch_size=2, seq_len=8).as_dict() for r in (4, 8))
    # q_proj and v_proj in 2 layers: A (r x 32) + B (out x r); doubling r doubles the adapters exactly
    assert lora8["trainable_weights"] == 2 * lora4["trainable_weights"] > 0
    assert measure("full", r=4, batch_size=2, seq_len=8).as_dict()["frozen_weights"] == 0
    assert all(p.requires_grad for p in base.parameters())  # the base model itself is left untouched


def test_dashboard_callback_shows_each_new_measurement_once():
    from types import SimpleNamespace

    dash = MemoryDashboard(("lora",), CATS, min_interval=0.0, render_share=None)
    recorder = SimpleNamespace(latest=None)
    cb = dash.callback("lora", recorder)
    history = SimpleNamespace(memory=[fake_measure("lora", r=1, batch_size=1, seq_len=1)], memory_steps=[1])
    cb(history)
    png = dash.image.value
    cb(history)  # no new measurement: nothing redrawn
    assert dash.image.value == png
    history.memory.append(fake_measure("lora", r=1, batch_size=3, seq_len=1))
    history.memory_steps.append(10)
    cb(history)
    assert dash.bars["activations"][0].get_height() == 3


def test_dashboard_follows_a_real_run_step_by_step():
    from lora_lab.memory import CATEGORIES
    from lora_lab.model import LlamaConfig, LlamaForCausalLM
    from lora_lab.timeline import TimelineRecorder
    from lora_lab.train import finetune

    from test_timeline import TINY, _TinyTask

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY))
    dash = MemoryDashboard(("lora",), CATEGORIES, min_interval=0.0, render_share=None)
    with TimelineRecorder(model, every=2) as recorder:
        history = finetune(model, _TinyTask(), method="lora", steps=4, batch_size=2, eval_every=2,
                           measure_memory=True, callback=dash.callback("lora", recorder))
    method, step, timeline = dash.timeline
    assert (method, step) == ("lora", 4) and timeline is recorder.latest
    assert timeline.maxima()["activations"] == history.memory[-1].activations


def test_tiny_measure_reuses_a_prepared_model_without_carrying_state():
    from lora_lab.model import LlamaConfig, LlamaForCausalLM
    from lora_lab.widgets.memory import tiny_measure

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    measure = tiny_measure(base)
    first = measure("lora", r=4, batch_size=2, seq_len=8).as_dict()
    measure("lora", r=4, batch_size=4, seq_len=16)
    assert measure("lora", r=4, batch_size=2, seq_len=8).as_dict() == first  # same setting, same bytes


def test_explorer_on_a_setting_the_grid_lacks_says_so_and_hides_the_stale_figure(grid):
    grid.pop("calls")
    del grid[(8, 4, 3)]
    box = memory_explorer(grid)
    box.sliders["r"].value, box.sliders["batch_size"].value = 8, 4
    box.sliders["seq_len"].value = 3  # must not raise inside the widget callback
    assert "was not measured" in box.readout.value and "r=8, batch_size=4, seq_len=3" in box.readout.value
    assert box.current is None and box.image.layout.visibility == "hidden"
    box.sliders["seq_len"].value = 2
    assert box.current is not None and box.image.layout.visibility == "visible"
