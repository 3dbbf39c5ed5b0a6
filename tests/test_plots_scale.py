"""Tests for lora_lab.plots.scale: GPU-fit checks and the paper-vs-estimate table."""

import matplotlib

matplotlib.use("Agg")

from types import SimpleNamespace

import numpy as np
import pytest

from lora_lab.plots import paper_table
from lora_lab.plots.scale import (COMPARISON_HEADER, MORE_PAPER_FIGURES, PAPER_FIGURES, estimate_bars_data, fits_on,
                                  paper_comparison, plot_fit, plot_fit_explorer, update_fit)

GiB = 2**30


def test_fits_on_is_inclusive_and_ordered():
    assert fits_on(24 * GiB) == (24, 48, 80)
    assert fits_on(24 * GiB + 1) == (48, 80)
    assert fits_on(81 * GiB) == ()


def test_fit_plot_draws_one_line_per_gpu():
    data = estimate_bars_data({"lora": SimpleNamespace(breakdown={"w": 30 * GiB, "a": 2 * GiB})})
    np.testing.assert_allclose(data.totals, [32])
    fig, ax, bars = plot_fit(data, gpu_sizes=(24, 48))
    assert sorted(line.get_ydata()[0] for line in ax.get_lines()) == [24, 48]
    assert bars["a"][0].get_y() == 30


def test_fit_explorer_axis_is_fixed_and_logarithmic_so_bars_far_apart_stay_apart():
    data = estimate_bars_data({"qlora": {"w": 30 * GiB}, "lora": {"w": 120 * GiB}, "full": {"w": 730 * GiB}})
    fig, ax, bars, labels = plot_fit_explorer(data, gpu_sizes=(24, 80))
    assert ax.get_yscale() == "log" and ax.get_ylim() == pytest.approx((1, 4096))
    assert [label.get_text() for label in labels] == ["", "", ""]
    update_fit(ax, bars, labels, data)
    assert [label.get_text() for label in labels] == ["30.0 GiB", "120.0 GiB", "730.0 GiB"]
    heights = [bar.get_height() for bar in bars["w"]]
    assert heights == [30, 120, 730] and all(h < ax.get_ylim()[1] for h in heights)  # none clipped: all differ
    assert ax.get_ylim() == pytest.approx((1, 4096))  # redraws move bars, never the axis


def test_fit_explorer_labels_a_bar_above_the_axis_as_clipped_and_keeps_the_label_inside():
    data = estimate_bars_data({"huge": {"w": 5000 * GiB}})
    fig, ax, bars, labels = plot_fit_explorer(data, gpu_sizes=(24,))
    update_fit(ax, bars, labels, data)
    assert labels[0].get_text() == "5,000.0 GiB (clipped)"
    assert labels[0].get_position()[1] < ax.get_ylim()[1]


def test_paper_comparison_converts_to_paper_units():
    def fake_estimate(preset, method, **kw):
        r = kw.get("r", 8)
        n = 2 * 96 * 12288 * r * 2
        return SimpleNamespace(trainable_params=n, adapter_bytes=2 * n, total_bytes=45.0e9,
                               breakdown={"frozen_weights": 5048e6, "optimizer_state": 1})

    rows = paper_comparison(fake_estimate)
    assert len(rows) == len(PAPER_FIGURES)
    by_claim = {row.figure.claim: row for row in rows}
    # the LoRA paper's 18.8M is 18,874,368 rounded to 0.1M: ratio within 0.5%
    assert by_claim["GPT-3 175B trainable params, r=4 on q,v"].ratio == pytest.approx(1, abs=0.005)
    assert by_claim["GPT-3 175B adapter checkpoint, r=4 on q,v"].estimated == pytest.approx(37.748736)
    assert by_claim["LLaMA 65B QLoRA, total"].ratio == pytest.approx(1.0)
    assert by_claim["LLaMA 7B, 4-bit base model"].ratio == pytest.approx(1.0)  # read from the breakdown
    table = paper_table([row.cells for row in rows], header=COMPARISON_HEADER).data
    assert table.count("\n") == len(rows) + 1 and "| 18.9 M |" in table


def test_the_benchmarks_extra_figures_read_what_the_estimate_has():
    from lora_lab.memory import CATEGORIES

    known = {"total_bytes", "trainable_params", "adapter_bytes"} | {f"breakdown:{c}" for c in CATEGORIES}
    assert {f.field for f in MORE_PAPER_FIGURES} <= known
    assert len({f.claim for f in PAPER_FIGURES + MORE_PAPER_FIGURES}) == len(PAPER_FIGURES) + len(MORE_PAPER_FIGURES)

    def fake_estimate(preset, method, **kw):
        n = 2 * 96 * 12288 * kw.get("r", 8) * 2
        return SimpleNamespace(trainable_params=n, adapter_bytes=2 * n, total_bytes=0,
                               breakdown={c: 1e6 for c in CATEGORIES})

    rows = {row.figure.claim: row for row in paper_comparison(fake_estimate, MORE_PAPER_FIGURES)}
    # LoRA Table 4's 4.7M is 4,718,592 rounded to 0.1M
    assert rows["GPT-3 175B trainable params, r=1 on q,v"].ratio == pytest.approx(1, abs=0.005)
    assert rows["LLaMA 65B QLoRA, adapters"].estimated == pytest.approx(1.0)  # 1e6 bytes = 1 MB
