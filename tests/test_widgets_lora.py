"""Widgets of notebook 01: set slider values programmatically, check the data behind the figure."""

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from lora_lab.plots import lora as plots  # noqa: E402
from lora_lab.widgets import lora as widgets  # noqa: E402


def _weight():
    return torch.randn(48, 32, generator=torch.Generator().manual_seed(0))


def test_rank_slider_updates_counts_error_and_image():
    box = widgets.rank_explorer(_weight(), r=4)
    png_before, renders = box.view.image.value, box.view.renders
    box.slider.value = 12
    assert box.data["lora_params"] == 12 * (32 + 48)
    assert box.data["rel_error"] == pytest.approx(plots.lowrank_error(box.singular_values)[12])
    assert box.artists["marker"].get_xdata()[0] == 12
    assert box.view.renders == renders + 1 and box.view.image.value != png_before
    assert "12" in box.children[1].value


def test_rank_slider_spans_the_full_spectrum_and_is_marked_for_the_browser_test():
    box = widgets.rank_explorer(_weight())
    assert (box.slider.min, box.slider.max) == (1, 32)
    assert "lora-lab-e2e" in box.slider._dom_classes


def test_scaling_alpha_slider_scales_every_convention_linearly():
    box = widgets.scaling_explorer(alpha=8, r=8)
    before = dict(box.sizes)
    box.alpha.value = 32
    for name, size in box.sizes.items():
        # every convention is linear in alpha; only float rounding separates 4x from the measured ratio
        assert size == pytest.approx(4 * before[name], rel=1e-9)


def test_scaling_rank_slider_separates_the_conventions():
    box = widgets.scaling_explorer(alpha=16, r=1)
    at_r1 = dict(box.sizes)
    box.rank.value = 64
    assert box.sizes["α/r (paper)"] < at_r1["α/r (paper)"]        # shrinks like 1/sqrt(r)
    assert box.sizes["raw α"] > 4 * at_r1["raw α"]                # grows like sqrt(r)
    # rsLoRA keeps the size flat: within the random fluctuation of ||BA|| (a few %)
    assert box.sizes["α/√r (rsLoRA)"] == pytest.approx(at_r1["α/√r (rsLoRA)"], rel=0.2)
    assert box.artists["markers"]["raw α"].get_xdata()[0] == 64


def test_scaling_explorer_rejects_a_rank_not_on_the_grid():
    with pytest.raises(ValueError, match="must be one of the ranks"):
        widgets.scaling_explorer(r=3)
