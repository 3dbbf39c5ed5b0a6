"""Tests for lora_lab.widgets.timeline: the checkpointing control switches recorded steps; recording is real."""

import matplotlib

matplotlib.use("Agg")

import pytest
import torch

from lora_lab.lora import LoraConfig
from lora_lab.model import LlamaConfig, LlamaForCausalLM
from lora_lab.widgets import E2E_CLASS
from lora_lab.widgets.timeline import record_timelines, timeline_explorer

from test_timeline import TINY, tiny_batch


@pytest.fixture(scope="module")
def timelines():
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(**TINY))
    before = {k: v.clone() for k, v in base.state_dict().items()}
    out = record_timelines(base, tiny_batch(), config=LoraConfig(r=4))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())  # the base is left untouched
    assert all(p.requires_grad for p in base.parameters())
    return out


def test_recorded_settings_are_real_steps(timelines):
    assert set(timelines) == {(m, c) for m in ("full", "lora", "qlora") for c in (False, True)}
    for method in ("full", "lora", "qlora"):
        off, on = timelines[(method, False)], timelines[(method, True)]
        assert on.maxima()["activations"] < off.maxima()["activations"]  # checkpointing keeps fewer
        assert off.maxima()["activations"] == off.breakdown.activations
    assert timelines[("qlora", False)].maxima()["temporaries"] > 0 == timelines[("lora", False)].maxima()["temporaries"]


def test_the_control_switches_checkpointing(timelines):
    box = timeline_explorer(timelines)
    assert E2E_CLASS in box.slider._dom_classes and box.slider.options == ("off", "on")
    assert box.current["lora"] is timelines[("lora", False)]
    png, ylim = box.image.value, box.axes[0].get_ylim()
    box.slider.value = "on"
    assert box.current["lora"] is timelines[("lora", True)]
    assert box.image.value != png and box.axes[0].get_ylim() == ylim  # heights compare across moves
    assert box.readout.value.count("peak") == 3


def test_the_control_refuses_incomplete_timelines(timelines):
    with pytest.raises(ValueError, match="missing"):
        timeline_explorer({k: v for k, v in timelines.items() if k != ("qlora", True)})
    with pytest.raises(ValueError):
        timeline_explorer({})
