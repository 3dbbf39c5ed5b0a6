"""Widgets of notebook 08: move the rank slider, check the data behind the figure."""

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from lora_lab.variants import LogitError  # noqa: E402
from lora_lab.widgets import variants as widgets  # noqa: E402

SWEEP = {r: {"QLoRA": LogitError(0.12, 0.05), "PiSSA": LogitError(0.1 / r, 0.04 / r)} for r in (1, 8, 64)}


def test_the_rank_slider_picks_from_the_sweep_and_redraws():
    box = widgets.error_explorer(SWEEP, r=8)
    assert list(box.slider.options) == [1, 8, 64] and box.shown["PiSSA"] == pytest.approx(0.1 / 8)
    png, renders = box.view.image.value, box.view.renders
    box.slider.value = 64
    assert box.shown == {"QLoRA": 0.12, "PiSSA": pytest.approx(0.1 / 64)}
    assert box.view.renders == renders + 1 and box.view.image.value != png
    assert "lora-lab-e2e" in box.slider._dom_classes


def test_a_rank_outside_the_sweep_or_an_empty_sweep_is_refused():
    with pytest.raises(ValueError, match="not in the sweep"):
        widgets.error_explorer(SWEEP, r=4)
    with pytest.raises(ValueError, match="empty"):
        widgets.error_explorer({})


def test_in_korean_the_slider_is_labelled_in_korean_and_picks_the_same_ranks():
    from lora_lab import i18n
    i18n.set_language("ko")
    try:
        box = widgets.error_explorer(SWEEP, r=8)
        assert box.slider.description == "랭크 r" and list(box.slider.options) == [1, 8, 64]
        assert box.artists["text"].get_text().splitlines()[1] == "PiSSA: QLoRA의 0.10배"  # (0.1 / 8) / 0.12
        assert i18n.missing_translations() == set()
    finally:
        i18n.set_language(None)
        i18n.apply_font()
