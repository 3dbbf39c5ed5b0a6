"""Tests for lora_lab.plots.forgetting: the learn-forget plane, the intruder dots, the mitigation curve."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from lora_lab.plots._figure import COLORS, MIN_WIDTH_PX
from lora_lab.plots.forgetting import (plot_learn_forget, plot_mitigation, run_readout, series, update_learn_forget,
                                       update_mitigation)


def row(method, r, lr, rise, acc, cosines=(0.9, 0.3)):
    return {"method": method, "r": r, "lr": lr, "corpus_loss_rise": rise, "task_accuracy": acc,
            "copy_accuracy": 1 - rise / 5, "intruders": 2 * sum(c < 0.5 for c in cosines), "stopped": None,
            "cosines": {"q": list(cosines), "v": list(cosines)}}


ROWS = [row("lora", 16, 1e-3, 0.1, 0.3), row("full", None, 1e-3, 0.5, 1.0), row("lora", 4, 1e-3, 0.05, 0.2),
        row("full", None, 1e-4, 0.02, 0.6, (1.0, 0.99))]


def test_series_puts_full_first_then_ranks_each_sorted_by_lr():
    groups = series(ROWS)
    assert list(groups) == ["full", "r = 4", "r = 16"]
    assert [g["lr"] for g in groups["full"]] == [1e-4, 1e-3]


def test_highlight_sits_on_the_run_and_colours_its_intruders():
    fig, artists = plot_learn_forget(ROWS, ROWS[0])
    assert fig.get_figwidth() * fig.dpi >= MIN_WIDTH_PX
    update_learn_forget(artists, ROWS[1])
    assert list(artists["point"].get_data()[0]) == [0.5] and list(artists["point"].get_data()[1]) == [1.0]
    colors = artists["dots"].get_facecolors()
    below = artists["dots"].get_offsets()[:, 1] < 0.5
    assert below.sum() == 2  # one intruder in each of the two layers
    assert np.allclose(colors[below], matplotlib.colors.to_rgba(COLORS["highlight"]))
    assert "full, lr 0.001" in artists["text"].get_text() and "2 intruders" in artists["text"].get_text()


def test_readout_says_when_a_run_diverged():
    assert "(diverged)" in run_readout({**ROWS[1], "stopped": "training diverged"})
    assert "(diverged)" not in run_readout(ROWS[1])


def test_mitigation_marks_the_chosen_lambda():
    rows = [{"lambda": lam, "task_accuracy": lam, "copy_accuracy": 1 - lam, "corpus_loss_rise": 0.1 * lam}
            for lam in (0.0, 0.5, 1.0)]
    fig, artists = plot_mitigation(rows, 1.0)
    assert update_mitigation(artists, 0.5) is rows[1]
    assert list(artists["line"].get_xdata()) == [0.5, 0.5]
    assert artists["text"].get_text().startswith("λ = 0.5: task exact match 0.50")
    with pytest.raises(KeyError):
        update_mitigation(artists, 0.25)  # only computed values: the slider picks, it does not interpolate


def test_in_korean_the_axes_legend_and_readout_are_korean_with_the_same_numbers(korean):
    import warnings

    from lora_lab.i18n import missing_translations
    fig, artists = plot_learn_forget(ROWS, ROWS[1])
    ax, ax_s = fig.axes
    assert ax.get_xlabel() == "잊은 것: 코퍼스 손실 상승 (nats)"
    assert ax_s.get_xlabel().startswith("튜닝한 W의 특이벡터")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["전체", "r = 4", "r = 16"]
    assert artists["text"].get_text() == ("전체, 학습률 0.001: 과제 완전 일치율 1.00\n"
                                          "코퍼스 손실 +0.50 nats, 복사 완전 일치율 0.90, 침입 차원 2개")
    _, mitigation = plot_mitigation([{"lambda": 0.5, "task_accuracy": 0.5, "copy_accuracy": 0.25,
                                      "corpus_loss_rise": 0.125}], 0.5)
    readout = "λ = 0.5: 과제 완전 일치율 0.50, 복사 완전 일치율 0.25, 코퍼스 손실 +0.12"
    assert mitigation["text"].get_text() == readout
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.canvas.draw()
    assert [str(w.message) for w in caught if "Glyph" in str(w.message)] == []
    assert missing_translations() == set()
