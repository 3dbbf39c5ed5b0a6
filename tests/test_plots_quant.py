"""Data functions and figures of notebook 03 (NF4 quantization)."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lora_lab.nf4 import nearest_code  # noqa: E402
from lora_lab.plots import quant as plots  # noqa: E402

# The released NF4 levels (bitsandbytes get_4bit_type("nf4")), used as a fixed codebook here.
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])
INT4 = torch.linspace(-1, 1, 15)


def absmax_quantizer(levels):
    """A plain blockwise-absmax quantizer over ``levels`` (the tests' stand-in for lora_lab.nf4)."""
    def quantize(w, blocksize):
        flat = w.reshape(-1).float()
        out = torch.empty_like(flat)
        for i in range(0, flat.numel(), blocksize):
            block = flat[i:i + blocksize]
            absmax = block.abs().max()
            out[i:i + blocksize] = levels[nearest_code(block / absmax, levels).long()] * absmax
        return out.reshape(w.shape)
    return quantize


def _weights(n=4096, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.02


def test_block_normalize_puts_each_block_max_at_one():
    x = plots.block_normalize(_weights(), 64).reshape(-1, 64)
    torch.testing.assert_close(x.abs().amax(dim=1), torch.ones(64))


@settings(max_examples=10, deadline=None)
@given(n_codes=st.integers(2, 16))
def test_entropy_is_log2_n_for_uniform_use(n_codes):
    codes = torch.arange(n_codes).repeat(10)
    assert plots.entropy_bits(plots.code_occupancy(codes, 16)) == pytest.approx(np.log2(n_codes))


def test_lloyd_max_lowers_the_mse_of_nf4_on_normal_weights():
    x = plots.block_normalize(_weights(16384), 64)
    lloyd = plots.lloyd_max(x, NF4)
    mse = lambda levels: float(((levels[nearest_code(x, levels).long()] - x) ** 2).mean())  # noqa: E731
    assert mse(lloyd) < mse(NF4)
    assert lloyd[0] == -1 and lloyd[-1] == 1 and (lloyd == 0).any()


def test_error_stats_on_a_known_error():
    w = torch.tensor([1.0, -1.0, 1.0, -1.0])
    stats = plots.error_stats(w, w + torch.tensor([0.1, -0.1, 0.1, -0.1]))
    assert stats["rmse"] == pytest.approx(0.1) and stats["max_abs"] == pytest.approx(0.1)
    assert stats["sqnr_db"] == pytest.approx(20.0)  # 10 log10(1 / 0.01)


def test_error_grid_holds_every_combination_and_nf4_beats_int4_on_normal_weights():
    grid = plots.error_grid({"normal": _weights()}, {"NF4": absmax_quantizer(NF4), "int4": absmax_quantizer(INT4)},
                            [64, 256])
    assert set(grid) == {("normal", q, b) for q in ("NF4", "int4") for b in (64, 256)}
    assert grid[("normal", "NF4", 64)]["rmse"] < grid[("normal", "int4", 64)]["rmse"]
    assert grid[("normal", "NF4", 64)]["rmse"] < grid[("normal", "NF4", 256)]["rmse"]


def test_error_histogram_is_a_density_over_fixed_bins():
    density = plots.error_histogram(np.array([0.0, 0.01, -0.01, 5.0]))
    width = 2 * plots.ERROR_RANGE / plots.ERROR_BINS
    assert density.sum() * width == pytest.approx(1.0)
    assert density[-1] > 0  # the far outlier is counted in the last bin


def test_stats_table_bolds_the_selected_quantizer():
    grid = plots.error_grid({"normal": _weights(512)}, {"NF4": absmax_quantizer(NF4), "int4": absmax_quantizer(INT4)},
                            [64])
    html = plots.stats_table_html(grid, "normal", 64, "int4")
    assert "font-weight:bold'><td>int4" in html and "font-weight:normal'><td>NF4" in html


def test_codebook_update_moves_levels_and_thresholds():
    fig, artists = plots.plot_codebook(NF4, reference=NF4)
    plots.update_codebook(artists, INT4)
    np.testing.assert_allclose(artists["dots"].get_xdata(), INT4.numpy(), rtol=1e-6)
    mids = artists["cuts"].get_xdata()[::3]
    np.testing.assert_allclose(mids, ((INT4[1:] + INT4[:-1]) / 2).numpy(), rtol=1e-6, atol=1e-7)


def test_error_explorer_update_redraws_the_chosen_histogram():
    grid = plots.error_grid({"normal": _weights()}, {"NF4": absmax_quantizer(NF4), "int4": absmax_quantizer(INT4)},
                            [64])
    fig, artists = plots.plot_error_explorer(grid, ("normal", "NF4", 64))
    density = plots.update_error_explorer(artists, ("normal", "int4", 64))
    np.testing.assert_allclose(artists["hist"].get_data().values, np.maximum(density, 1e-3))
    assert "int4" in artists["label"].get_text()


def test_blocksize_errors_grow_with_an_outlier_in_large_blocks():
    w = _weights()
    spiked = w.clone()
    spiked[100] = 1.0  # a 50-sigma outlier
    quantize = absmax_quantizer(NF4)
    clean, spike = plots.blocksize_errors(w, quantize, [64, 1024]), plots.blocksize_errors(spiked, quantize, [64, 1024])
    assert spike[1] - clean[1] > spike[0] - clean[0]  # the outlier costs more in the larger block


def test_static_figures_build_with_one_artist_per_quantizer():
    x = plots.block_normalize(_weights(), 64)
    fig, artists = plots.plot_levels_over_hist(x, {"NF4": NF4, "int4": INT4})
    assert set(artists["rows"]) == {"NF4", "int4"}
    occ = {"NF4": plots.code_occupancy(nearest_code(x, NF4))}
    fig, artists = plots.plot_occupancy(occ)
    np.testing.assert_allclose([b.get_height() for b in artists["bars"]["NF4"]], occ["NF4"])
    fig, artists = plots.plot_blocksize_errors([64, 256], {"a": [0.1, 0.2]})
    np.testing.assert_allclose(artists["lines"]["a"].get_ydata(), [0.1, 0.2])
