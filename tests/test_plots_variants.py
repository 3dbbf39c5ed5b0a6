"""Figures of notebook 08: the data each builder draws is the data it was given."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lora_lab.plots import variants as plots  # noqa: E402
from lora_lab.plots._figure import MIN_WIDTH_PX  # noqa: E402
from lora_lab.train import History  # noqa: E402
from lora_lab.variants import LogitError, VariantRun  # noqa: E402

ERRORS = {"QLoRA": LogitError(0.12, 0.05), "LoftQ": LogitError(0.08, 0.02), "LoftQ + callback": LogitError(0.07, 0.01)}
SWEEP = {r: {"QLoRA": LogitError(0.12, 0.05), "LoftQ": LogitError(0.12 / r, 0.05 / r)} for r in (1, 2, 4)}


def test_starting_error_bars_are_the_errors():
    fig, art = plots.plot_starting_errors(ERRORS)
    assert [b.get_height() for b in art["bars"]["mae"]] == [0.12, 0.08, 0.07]
    assert [b.get_height() for b in art["bars"]["mse"]] == [0.05, 0.02, 0.01]
    assert fig.get_figwidth() * fig.dpi >= MIN_WIDTH_PX


def test_a_variant_has_one_colour_in_every_figure():
    assert plots.variant_color("LoftQ", ["LoftQ"]) == plots.variant_color("LoftQ", ["full", "QLoRA", "LoftQ"])
    assert plots.variant_color("LoftQ + callback", list(ERRORS)) not in {
        plots.variant_color(k, ERRORS) for k in ("QLoRA", "LoftQ", "PiSSA", "QDoRA")}


def test_the_sweep_shows_the_chosen_rank():
    fig, art = plots.plot_error_sweep(SWEEP, 1)
    shown = plots.update_error_sweep(art, 4)
    assert shown == {"QLoRA": 0.12, "LoftQ": 0.03}
    assert [b.get_height() for b in art["bars"]] == [0.12, 0.03]
    assert list(art["marker"].get_xdata()) == [4, 4]
    assert "LoftQ: 0.25x QLoRA" in art["text"].get_text()


def test_training_curves_are_the_histories():
    runs = {"full": History(eval_steps=[0, 5], eval_loss=[2.0, 0.5]),
            "PiSSA": VariantRun(history=History(eval_steps=[0, 5], eval_loss=[2.0, 0.9]))}
    _, art = plots.plot_training_curves(runs)
    np.testing.assert_array_equal(art["lines"]["PiSSA"].get_ydata(), [2.0, 0.9])
    assert art["lines"]["full"].get_linestyle() == "--"


def test_the_magnitude_direction_panels_fit_every_point():
    points = {"LoRA": {"l0": [(10, 1.0, 1.0), (20, 2.0, 2.0)], "l1": [(10, 3.0, 3.0)]},
              "DoRA": {"l0": [(10, 3.0, 1.0), (20, 1.0, 3.0)]}}
    fig, art = plots.plot_magnitude_direction(points, {"LoRA": 1.0, "DoRA": -1.0})
    assert art["slopes"] == pytest.approx({"LoRA": 1.0, "DoRA": -1.0})
    assert [ax.get_title() for ax in art["axes"]] == ["LoRA: r = +1.00", "DoRA: r = -1.00"]
    offsets = art["axes"][0].collections[0].get_offsets()
    np.testing.assert_array_equal(offsets, [[1.0, 1.0], [2.0, 2.0]])  # (ΔD, ΔM)


def test_a_slope_needs_two_different_directions():
    with pytest.raises(ValueError, match="two points"):
        plots.fit_slope([(10, 1.0, 2.0), (20, 3.0, 2.0)])


def test_in_korean_the_labels_and_readout_are_korean_with_the_same_numbers(korean):
    import warnings

    from lora_lab.i18n import missing_translations
    fig, art = plots.plot_error_sweep(SWEEP, 4)
    ax_line, ax_bar = fig.axes
    assert ax_line.get_xlabel() == "랭크 r" and ax_line.get_ylabel() == "16비트 대비 로짓 MAE"
    assert art["text"].get_text() == "r = 4\nLoftQ: QLoRA의 0.25배"
    fig_s, _ = plots.plot_starting_errors(ERRORS)
    assert [t.get_text() for t in fig_s.axes[0].get_xticklabels()] == ["QLoRA", "LoftQ", "LoftQ + 콜백"]
    assert fig_s.axes[1].get_ylabel() == "16비트 대비 로짓 MSE"
    runs = {"full": History(eval_steps=[0, 5], eval_loss=[2.0, 0.5])}
    fig_t, _ = plots.plot_training_curves(runs)
    assert [t.get_text() for t in fig_t.axes[0].get_legend().get_texts()] == ["전체 파인튜닝 (16비트)"]
    assert fig_t.axes[0].get_ylabel() == "평가 손실"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for f in (fig, fig_s, fig_t):
            f.canvas.draw()
    assert [str(w.message) for w in caught if "Glyph" in str(w.message)] == []
    assert missing_translations() == set()
