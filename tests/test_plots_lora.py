"""Data functions and figures of notebook 01 (LoRA from scratch)."""

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lora_lab.plots import lora as plots  # noqa: E402


def _matrix(out_features=24, in_features=16, seed=0):
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=15, deadline=None)
@given(r=st.integers(0, 16), seed=st.integers(0, 1000))
def test_lowrank_error_is_the_error_of_the_truncated_svd(r, seed):
    w = _matrix(seed=seed).double()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    w_r = u[:, :r] @ torch.diag(s[:r]) @ vh[:r]
    measured = float(torch.linalg.matrix_norm(w - w_r) / torch.linalg.matrix_norm(w))
    # float64 SVD of a 24x16 matrix: agreement to ~1e-12; 1e-9 leaves room.
    assert plots.lowrank_error(plots.singular_values(w))[r] == pytest.approx(measured, abs=1e-9)


def test_lowrank_error_runs_from_one_to_zero_and_never_rises():
    err = plots.lowrank_error(plots.singular_values(_matrix()))
    assert err[0] == pytest.approx(1.0) and err[-1] == 0.0
    assert np.all(np.diff(err) <= 0)


def test_energy_rank_of_a_rank_two_matrix_is_two():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(30, 2, generator=gen) @ torch.randn(2, 20, generator=gen)
    s = plots.singular_values(w)
    assert s[1] ** 2 > 0.01 * (s ** 2).sum()  # both directions carry energy, so 99.9% needs both
    assert plots.energy_rank(s, 0.999) == 2  # and the rest is float rounding (~1e-7), so 2 suffice


def test_rank_panel_counts_lora_parameters_as_r_times_in_plus_out():
    data = plots.rank_panel_data(plots.singular_values(_matrix()), 4, in_features=16, out_features=24)
    assert data["lora_params"] == 4 * (16 + 24) and data["full_params"] == 16 * 24


def test_rank_panel_rejects_a_rank_beyond_the_spectrum():
    with pytest.raises(ValueError, match="between 1 and 16"):
        plots.rank_panel_data(plots.singular_values(_matrix()), 17, 16, 24)


def test_update_sizes_follow_each_scaling_rule():
    ranks, base = [1, 4, 16], [2.0, 4.0, 8.0]
    sizes = plots.update_sizes(ranks, 8.0, base)
    np.testing.assert_allclose(sizes["α/r (paper)"], [8 / 1 * 2, 8 / 4 * 4, 8 / 16 * 8])
    np.testing.assert_allclose(sizes["α/√r (rsLoRA)"], [8 * 2, 8 / 2 * 4, 8 / 4 * 8])
    np.testing.assert_allclose(sizes["raw α"], [16, 32, 64])


def test_random_update_norm_grows_like_sqrt_r():
    norms = plots.random_update_norms([4, 64], 256, 256)
    # ||BA||_F ~ sqrt(r): the ratio for r=64 vs 4 is sqrt(16) = 4; random fluctuation at these sizes is a few %.
    assert norms[1] / norms[0] == pytest.approx(4.0, rel=0.15)


def test_rank_explorer_update_moves_marker_and_highlight():
    s = plots.singular_values(_matrix())
    fig, artists = plots.plot_rank_explorer(s, 2, 16, 24)
    data = plots.update_rank_explorer(artists, 10)
    assert artists["marker"].get_xdata()[0] == 10
    assert artists["marker"].get_ydata()[0] == pytest.approx(plots.lowrank_error(s)[10])
    np.testing.assert_allclose(artists["kept"].get_data().values, np.asarray(s)[:10])
    assert f"{data['lora_params']:,}" in artists["text"].get_text()


def test_update_sizes_plot_tracks_alpha():
    fig, artists = plots.plot_update_sizes([1, 2, 4], 4.0, [1.0, 1.0, 1.0], r=2)
    plots.update_update_sizes(artists, 8.0, 2)
    np.testing.assert_allclose(artists["lines"]["raw α"].get_ydata(), [8, 8, 8])
    assert artists["markers"]["α/r (paper)"].get_ydata()[0] == pytest.approx(4.0)


def test_spectra_plot_normalizes_by_the_largest_singular_value():
    fig, artists = plots.plot_spectra({"ΔW": torch.tensor([4.0, 2.0, 1.0])}, top=3)
    np.testing.assert_allclose(artists["lines"]["ΔW"].get_ydata(), [1.0, 0.5, 0.25])


def test_loss_grid_has_one_panel_per_convention_and_one_line_per_rank():
    curves = {"a": {1: [1.0, 0.5], 4: [1.0, 0.1]}, "b": {1: [2.0, 1.0], 4: [2.0, 0.2]}}
    fig, artists = plots.plot_loss_grid(curves)
    assert [len(ax.get_lines()) for ax in artists["axes"]] == [2, 2]
    assert math.isclose(artists["axes"][1].get_lines()[1].get_ydata()[-1], 0.2)


def test_loss_grid_shares_one_y_axis_that_holds_every_curve_overshoots_included():
    # the second panel's overshoot (30 > anything in the first) must not be cut off by the first panel's limits
    curves = {"a": {2: [1.0, 0.5, 0.1]}, "b": {2: [1.0, 30.0, 0.01]}}
    fig, artists = plots.plot_loss_grid(curves)
    low, high = artists["axes"][0].get_ylim()
    assert low < 0.01 and high > 30.0
    assert artists["axes"][1].get_ylim() == (low, high)
