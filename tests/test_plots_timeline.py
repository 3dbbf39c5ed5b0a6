"""Tests for lora_lab.plots.timeline: the data behind the step's stacked area, its units and its peak's name."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_lab.plots import to_png
from lora_lab.plots.timeline import (CATEGORY_LABELS, format_bytes, human_unit, peak_sentence, plot_step_timelines,
                                     timeline_area_data)
from lora_lab.timeline import TIMELINE_CATEGORIES, MemoryEvent, StepTimeline

MiB = 2**20


def step(activations=3 * MiB, weights=MiB, grads=MiB // 2):
    return StepTimeline(start={"frozen_weights": weights}, events=[
        MemoryEvent("forward", "activations", "a", activations // 3),
        MemoryEvent("forward", "activations", "b", activations - activations // 3),
        MemoryEvent("backward", "activations", "b", -(activations - activations // 3)),
        MemoryEvent("backward", "gradients", "a", grads),
        MemoryEvent("backward", "activations", "a", -(activations // 3))])


def test_units_are_human():
    assert human_unit(25_000 * 2**10) == ("MiB", MiB)  # never "25,000 KiB"
    assert human_unit(3 * 2**30)[0] == "GiB" and human_unit(512)[0] == "B" and human_unit(2048)[0] == "KiB"
    assert format_bytes(25_000 * 2**10) == "24.4 MiB" and format_bytes(300) == "300 B"


def test_every_category_has_a_readable_name():
    assert set(CATEGORY_LABELS) == set(TIMELINE_CATEGORIES)
    assert not any("_" in label for label in CATEGORY_LABELS.values())


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 2**32), st.integers(0, 2**32), st.integers(0, 2**30))
def test_stacked_area_adds_up_to_the_totals(activations, weights, grads):
    timeline = step(activations, weights, grads)
    data = timeline_area_data(timeline)
    size = {"B": 1, "KiB": 2**10, "MiB": MiB, "GiB": 2**30}[data.unit]
    # exact integer sums divided by a power of two: float64 relative error ~1e-16
    np.testing.assert_allclose(data.totals * size, timeline.totals, rtol=1e-12)
    assert data.unit == human_unit(timeline.peak)[0]
    assert "temporaries" not in data.categories  # a category that never holds memory is not drawn


def test_the_peak_is_named_by_phase_and_largest_category():
    assert peak_sentence(step()) == "peak 4.0 MiB at the end of the forward pass: saved activations 3.0 MiB"
    during = StepTimeline(start={}, events=[MemoryEvent("forward", "activations", "", 2 * MiB),
                                            MemoryEvent("forward", "activations", "", -MiB)])
    assert peak_sentence(during) == "peak 2.0 MiB during the forward pass: saved activations 2.0 MiB"


def test_panels_side_by_side_share_one_axis():
    fig, axes, drawn = plot_step_timelines({"full": step(8 * MiB), "lora": step()})
    assert len(axes) == 2 and axes[0].get_ylim() == axes[1].get_ylim()
    assert axes[0].get_ylim()[1] >= drawn["full"].totals.max()
    assert axes[1].get_title().startswith("lora: peak 4.0 MiB")
    assert "saved activations" in [t.get_text() for t in fig.legends[0].get_texts()]
    assert to_png(fig).startswith(b"\x89PNG")
    with pytest.raises(ValueError):
        plot_step_timelines({})
