"""Tests for lora_lab.widgets.forgetting: the sliders pick precomputed runs and redraw the figure."""

import matplotlib

matplotlib.use("Agg")

import pytest

from lora_lab.widgets import E2E_CLASS
from lora_lab.widgets.forgetting import forgetting_explorer, mitigation_explorer


def row(method, r, lr, rise, acc):
    return {"method": method, "r": r, "lr": lr, "corpus_loss_rise": rise, "task_accuracy": acc,
            "copy_accuracy": 0.5, "intruders": 1, "stopped": None, "cosines": {"q": [0.9, 0.2]}}


ROWS = [row(m, r, lr, rise, acc) for (m, r), rise0 in ((("full", None), 0.4), (("lora", 4), 0.2))
        for lr, rise, acc in ((1e-3, rise0, 0.5), (1e-2, 2 * rise0, 0.9))]


def test_both_sliders_pick_their_run_and_redraw():
    box = forgetting_explorer(ROWS)
    assert box.current is ROWS[0]
    png, renders = box.view.image.value, box.view.renders
    box.lr.value = 1e-2
    assert box.current is ROWS[1] and box.view.image.value != png
    box.method.value = "r = 4"
    assert box.current is ROWS[3] and box.view.renders == renders + 2
    assert E2E_CLASS in box.method._dom_classes and E2E_CLASS in box.lr._dom_classes


def test_a_grid_with_a_hole_is_refused():
    with pytest.raises(ValueError, match="every method at every learning rate"):
        forgetting_explorer(ROWS[:3])


def test_mitigation_slider_picks_lambda():
    rows = [{"lambda": lam, "task_accuracy": lam, "copy_accuracy": 1 - lam, "corpus_loss_rise": lam}
            for lam in (0.0, 0.5, 1.0)]
    box = mitigation_explorer(rows)
    assert box.current is rows[-1]
    png = box.view.image.value
    box.slider.value = 0.0
    assert box.current is rows[0] and box.view.image.value != png
    assert E2E_CLASS in box.slider._dom_classes
    with pytest.raises(ValueError, match="empty"):
        mitigation_explorer([])


def test_in_korean_the_sliders_show_korean_labels_and_keep_the_runs_values():
    from lora_lab import i18n
    i18n.set_language("ko")
    try:
        box = forgetting_explorer(ROWS)
        assert box.method.description == "방법" and box.lr.description == "학습률"
        assert [label for label, _ in box.method.options] == ["전체", "r = 4"]  # what the student reads
        box.method.value = "r = 4"  # the value the notebook passes stays the run's label
        assert box.current is ROWS[2] and "r = 4, 학습률 0.001" in box.artists["text"].get_text()
        assert i18n.missing_translations() == set()
    finally:
        i18n.set_language(None)
        i18n.apply_font()
