"""Widgets of notebook 03: set values programmatically, check the data behind the figure."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from lora_lab.nf4 import nearest_code  # noqa: E402
from lora_lab.plots import quant as plots  # noqa: E402
from lora_lab.widgets import quant as widgets  # noqa: E402

INT4 = torch.linspace(-1, 1, 15)


def quantizer(levels):
    """A plain blockwise-absmax quantizer over ``levels`` (the tests' stand-in for lora_lab.nf4)."""
    def quantize(w, blocksize):
        blocks = w.reshape(-1, blocksize).float()
        absmax = blocks.abs().amax(dim=1, keepdim=True)
        return (levels[nearest_code(blocks / absmax, levels).long()] * absmax).reshape(w.shape)
    return quantize


def quantile_codebook(offset):
    """The NF4 recipe (bitsandbytes create_normal_map), written here so the test does not need lora_lab.nf4."""
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1])
    levels = torch.cat([neg, torch.zeros(1), pos]).sort().values
    return levels / levels.max()


NF4 = quantile_codebook(0.9677083)


def test_offset_slider_moves_the_levels():
    box = widgets.offset_explorer(quantile_codebook, NF4)
    torch.testing.assert_close(box.levels, NF4)
    png = box.view.image.value
    box.slider.value = 0.95
    torch.testing.assert_close(box.levels, quantile_codebook(0.95))
    np.testing.assert_allclose(box.artists["dots"].get_xdata(), quantile_codebook(0.95).numpy(), rtol=1e-6)
    assert box.view.image.value != png
    assert "0.9500" in box.children[1].value and "1.645" in box.children[1].value  # ndtri(0.95) = 1.6449


def test_offset_slider_keeps_the_end_points_and_zero():
    box = widgets.offset_explorer(quantile_codebook, NF4)
    box.slider.value = 0.99
    assert box.levels[0] == -1 and box.levels[-1] == 1 and (box.levels == 0).sum() == 1


@pytest.fixture(scope="module")
def grid():
    gen = torch.Generator().manual_seed(0)
    samples = {"normal": torch.randn(4096, generator=gen), "heavy": torch.distributions.StudentT(3).sample((4096,))}
    return plots.error_grid(samples, {"NF4": quantizer(NF4), "int4": quantizer(INT4)}, [64, 1024])


def test_error_explorer_controls_change_the_histogram_and_table(grid):
    box = widgets.error_explorer(grid)
    assert box.key == ("normal", "NF4", 64)
    first = box.density.copy()
    box.blocksize.value = 1024
    assert box.key == ("normal", "NF4", 1024)
    np.testing.assert_allclose(box.density, plots.error_histogram(grid[("normal", "NF4", 1024)]["error"]))
    assert not np.allclose(box.density, first)
    box.quantizer.value = "int4"
    assert "font-weight:bold'><td>int4" in box.table.value
    box.sample.value = "heavy"
    assert "heavy" in box.artists["label"].get_text()
    assert f"{grid[('heavy', 'int4', 1024)]['rmse']:.4f}" in box.table.value


def test_error_explorer_rejects_a_key_outside_the_grid(grid):
    with pytest.raises(ValueError, match="not in the grid"):
        widgets.error_explorer(grid, blocksize=128)


def test_error_explorer_on_a_combination_the_grid_lacks_says_so_and_hides_the_stale_figure(grid):
    grid = {k: v for k, v in grid.items() if k != ("heavy", "int4", 1024)}
    box = widgets.error_explorer(grid)
    box.blocksize.value, box.quantizer.value = 1024, "int4"
    box.sample.value = "heavy"  # must not raise inside the widget callback
    assert "is not in the grid" in box.table.value and box.density is None
    assert box.view.image.layout.visibility == "hidden"
    box.sample.value = "normal"
    assert box.density is not None and box.view.image.layout.visibility == "visible"
