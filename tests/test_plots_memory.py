"""Tests for lora_lab.plots.memory: the data behind the memory bars, timeline and loss curves."""

import dataclasses

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_lab.plots import to_png
from lora_lab.plots.memory import (breakdown_dict, loss_curve_data, plot_dashboard, plot_fixed_bars, plot_loss_curves,
                                   plot_stacked_bars, plot_timeline, stacked_bar_data, update_stacked_bars)

CATS = ("weights", "trainable", "gradients", "optimizer", "activations")


def fake(scale):
    return {c: (i + 1) * scale * 2**20 for i, c in enumerate(CATS)}


def test_breakdown_dict_reads_dataclass_and_drops_total():
    @dataclasses.dataclass
    class B:
        weights: int = 5
        gradients: int = 7
        total_bytes: int = 12
        name: str = "x"

    assert breakdown_dict(B()) == {"weights": 5, "gradients": 7}


def test_breakdown_dict_rejects_unreadable():
    with pytest.raises(TypeError):
        breakdown_dict(object())


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(0, 2**34), min_size=1, max_size=5), st.sampled_from(["MiB", "GB"]))
def test_stacked_totals_equal_sum_of_parts(parts, unit):
    bd = {f"c{i}": v for i, v in enumerate(parts)}
    data = stacked_bar_data({"a": bd, "b": {"c0": parts[0]}}, unit)
    # exact integer sums divided by a power of two / ten: float64 relative error ~1e-16
    np.testing.assert_allclose(data.totals * {"MiB": 2**20, "GB": 1e9}[unit], [sum(parts), parts[0]], rtol=1e-12)


def test_missing_category_counts_as_zero_and_keeps_order():
    data = stacked_bar_data({"full": {"w": 2**20, "g": 2**20}, "lora": {"w": 2**20, "a": 2**21}})
    assert data.categories == ("w", "g", "a")
    np.testing.assert_array_equal(data.values, [[1, 1], [1, 0], [0, 2]])


def test_unknown_unit_raises():
    with pytest.raises(ValueError):
        stacked_bar_data({"a": fake(1)}, unit="parsecs")


def test_update_moves_bar_heights_and_stacking():
    fig, bars = plot_stacked_bars(stacked_bar_data({"lora": fake(1)}))
    update_stacked_bars(bars, stacked_bar_data({"lora": fake(3)}))
    heights = [bars[c][0].get_height() for c in CATS]
    bottoms = [bars[c][0].get_y() for c in CATS]
    np.testing.assert_allclose(heights, [3, 6, 9, 12, 15])
    np.testing.assert_allclose(bottoms, [0, 3, 9, 18, 30])
    assert to_png(fig).startswith(b"\x89PNG")


def test_timeline_plots_in_unit():
    _, lines = plot_timeline({"lora": ([1, 2], [2**20, 2**21])})
    np.testing.assert_allclose(lines["lora"].get_ydata(), [1, 2])


def test_timeline_marks_each_measured_point():
    # memory is measured only at some steps: each measurement must be visible as a marker, not just a line
    _, lines = plot_timeline({"lora": ([1, 10, 20], [1, 1, 1])})
    assert lines["lora"].get_marker() == "o"
    np.testing.assert_array_equal(lines["lora"].get_xdata(), [1, 10, 20])


def test_loss_curves_from_history_or_list():
    class H:
        train_loss = [3.0, 2.0, 1.0]

    data = loss_curve_data({"lora": H(), "full": [1.0, 0.5]})
    np.testing.assert_array_equal(data["lora"][0], [1, 2, 3])
    _, lines = plot_loss_curves({"lora": H()}, smooth=2)
    np.testing.assert_allclose(lines["lora"].get_ydata(), [2.5, 1.5])


def test_fixed_bars_keep_their_axis_when_the_bars_move():
    fig, ax, bars = plot_fixed_bars(stacked_bar_data({"lora": fake(1), "full": fake(2)}), ymax=100.0)
    assert ax.get_ylim() == pytest.approx((0, 115.0))
    update_stacked_bars(bars, stacked_bar_data({"lora": fake(3), "full": fake(4)}))
    assert ax.get_ylim() == pytest.approx((0, 115.0))
    assert bars["activations"][1].get_height() == pytest.approx(20)


def test_dashboard_figure_has_bars_per_method_and_an_empty_step_axis():
    fig, (ax_bar, ax_step), bars = plot_dashboard(stacked_bar_data({"full": fake(1), "qlora": fake(0)}))
    assert fig.axes[:2] == [ax_bar, ax_step]
    assert set(bars) == set(CATS) and len(bars["weights"]) == 2
    assert not ax_step.lines and not ax_step.collections  # nothing drawn until a step is recorded
    assert "TimelineRecorder" in ax_step.texts[0].get_text()


def test_dashboard_legend_names_the_kits_categories_readably():
    from lora_lab.memory import CATEGORIES

    fig, _, _ = plot_dashboard(stacked_bar_data({"lora": dict.fromkeys(CATEGORIES, 2**20)}))
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[:2] == ["frozen weights", "trainable weights"] and "temporaries (dequantized W)" in labels
    assert not any("_" in label for label in labels)
