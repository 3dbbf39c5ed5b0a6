"""Widgets of notebook 02: set values programmatically / click Train, check the data behind the figure."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lora_lab.train import History  # noqa: E402
from lora_lab.widgets import rank as widgets  # noqa: E402

CURVES = {1: ([0, 5, 10], [2.0, 1.5, 1.2]), 8: ([0, 5, 10], [2.0, 1.0, 0.6]), "full": ([0, 5, 10], [2.0, 0.8, 0.5])}


def test_rank_slider_highlights_the_chosen_curve():
    box = widgets.curve_explorer(CURVES)
    assert list(box.slider.options) == [1, 8] and box.final == 1.2
    png = box.view.image.value
    box.slider.value = 8
    assert box.final == 0.6
    np.testing.assert_allclose(box.artists["line"].get_ydata(), CURVES[8][1])
    assert box.view.image.value != png
    assert "lora-lab-e2e" in box.slider._dom_classes


def test_curve_explorer_needs_a_curve_besides_the_reference():
    with pytest.raises(ValueError, match="at least one"):
        widgets.curve_explorer({"full": CURVES["full"]})


def fake_train(r, alpha, callback):
    """Stands in for finetune: 10 steps whose loss depends on r and alpha, calling back every step."""
    history = History(method="lora")
    history.eval_steps, history.eval_loss = [0], [3.0]
    for step in range(1, 11):
        history.train_loss.append(3.0 / (1 + step * r * alpha / 100))
        callback(history)
    history.eval_steps.append(10)
    history.eval_loss.append(history.train_loss[-1])
    return history


def test_train_button_runs_with_the_chosen_rank_and_alpha_and_draws_the_curve():
    box = widgets.train_panel(fake_train, r=8, alpha=16, max_steps=10, every=2)
    box.rank.value, box.alpha.value = 4, 32
    box.button.click()
    expected = fake_train(4, 32, lambda h: None)
    np.testing.assert_allclose(box.artists["train"].get_ydata(), expected.train_loss)
    np.testing.assert_allclose(box.artists["eval"].get_xdata(), [0, 10])
    assert box.progress.value == 10 and not box.button.disabled
    assert "r = 4" in box.status.value and f"{expected.eval_loss[-1]:.3f}" in box.status.value


def test_train_panel_redraws_while_training():
    box = widgets.train_panel(fake_train, max_steps=10, every=2)
    renders = box.view.renders
    box.button.click()
    assert box.view.renders - renders == 5 + 1  # every 2nd of 10 steps, plus the final draw


def test_a_training_error_shows_in_the_status_and_frees_the_button():
    def failing_train(r, alpha, callback):
        raise ValueError("lr must be a positive number <here>")

    box = widgets.train_panel(failing_train, max_steps=10)
    box.button.click()  # must not raise inside the widget callback
    assert "failed" in box.status.value and "lr must be a positive number &lt;here&gt;" in box.status.value
    assert "training r = 8, α = 16 ..." not in box.status.value
    assert box.history is None and not box.button.disabled
