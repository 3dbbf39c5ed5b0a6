"""Tests for lora_lab.plots._figure: every stored figure is wide enough in pixels to read on a projector."""

import matplotlib

matplotlib.use("Agg")

import io

import pytest
from PIL import Image

from lora_lab.plots import new_figure, to_png
from lora_lab.plots._figure import DPI, MIN_WIDTH_PX, figure_dpi


@pytest.mark.parametrize("width", [4.0, 5.5, 6.0, 7.0, 9.0, 10.4])
def test_every_figure_width_the_kit_uses_renders_at_least_the_minimum_pixels(width):
    fig, _ = new_figure(width=width, height=3.0)
    png = Image.open(io.BytesIO(to_png(fig)))
    assert png.width >= MIN_WIDTH_PX
    assert fig.dpi == max(DPI, figure_dpi(width))


def test_wide_figures_keep_the_base_dpi_and_an_explicit_dpi_wins():
    assert figure_dpi(7.0) == DPI and 7.0 * DPI >= MIN_WIDTH_PX
    assert figure_dpi(4.0) == 200  # 4 inches need 200 dpi for 800 pixels
    fig, _ = new_figure(width=7.0, dpi=50)
    assert fig.dpi == 50
