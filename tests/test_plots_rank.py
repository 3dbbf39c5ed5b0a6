"""Data functions and figures of notebook 02 (rank effects)."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lora_lab.plots import rank as plots  # noqa: E402


def _a(r, n=64, seed=0):
    return torch.randn(r, n, generator=torch.Generator().manual_seed(seed))


def test_similarity_of_a_matrix_with_itself_is_one_everywhere():
    a = _a(8)
    # float64 SVD: exact up to ~1e-12
    np.testing.assert_allclose(plots.subspace_similarity(a, a), np.ones((8, 8)), atol=1e-9)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.01, 100))
def test_similarity_ignores_scale_and_mixing_of_the_rows(seed, scale):
    a = _a(4, seed=seed)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(seed + 1)))
    phi = plots.subspace_similarity(a, scale * q @ a)
    assert phi[3, 3] == pytest.approx(1.0, abs=1e-9)  # same row space; float64 rounding only


def test_similarity_is_in_unit_interval_and_has_the_paper_shape():
    phi = plots.subspace_similarity(_a(8, seed=1), _a(64, seed=2))
    assert phi.shape == (8, 64)
    assert np.all(phi >= -1e-12) and np.all(phi <= 1 + 1e-9)  # float rounding at the ends


def test_random_subspaces_overlap_only_by_chance():
    phi = plots.subspace_similarity(_a(8, n=1024, seed=3), _a(64, n=1024, seed=4))
    # expected overlap of a random direction with a random j-dim subspace of R^1024 is j/1024 = 1/16 at j=64
    assert phi[0, 63] < 0.25 and phi[0, 0] < 0.05


def test_similarity_rejects_different_input_dimensions():
    with pytest.raises(ValueError, match="same input dimension"):
        plots.subspace_similarity(_a(2, n=8), _a(2, n=9))


def test_budget_rank_reproduces_the_lora_papers_table_5():
    per_type = 2 * 12288 * 96  # one matrix type, all 96 layers of GPT-3: r * (d + d) per layer
    budget = 18_000_000 + 900_000  # "18M" in the paper is 18.9M = 8 * 2,359,296 rounded
    assert [plots.budget_rank(budget, k * per_type) for k in (1, 2, 4)] == [8, 4, 2]


def test_curve_highlight_takes_the_chosen_curve():
    curves = {1: ([0, 10], [2.0, 1.0]), 8: ([0, 10], [2.0, 0.5]), "full": ([0, 10], [2.0, 0.4])}
    fig, artists = plots.plot_loss_curves(curves, 1)
    assert plots.update_loss_curves(artists, 8) == 0.5
    np.testing.assert_allclose(artists["line"].get_ydata(), [2.0, 0.5])
    assert "r = 8" in artists["text"].get_text()
    assert plots.final_values(curves) == {1: 1.0, 8: 0.5, "full": 0.4}


def test_readout_says_the_ratio_to_the_reference_and_when_the_threshold_was_crossed():
    curves = {1: ([0, 10, 20], [2.0, 0.5, 0.2]), 8: ([0, 10, 20], [2.0, 0.05, 0.02]),
              "full": ([0, 10, 20], [2.0, 0.01, 0.01])}
    assert plots.first_below(*curves[8], 0.1) == 10 and plots.first_below(*curves[1], 0.1) is None
    assert plots.loss_readout(curves, 8, "full", 0.1) == "r = 8: final 0.020 (2.0x full)\nbelow 0.1 from step 10"
    assert plots.loss_readout(curves, 1, "full", 0.1) == "r = 1: final 0.200 (20.0x full)\nnever below 0.1 in 20 steps"
    fig, artists = plots.plot_loss_curves(curves, 1, threshold=0.1)
    plots.update_loss_curves(artists, 8)
    assert artists["text"].get_text() == plots.loss_readout(curves, 8, "full", 0.1)
    assert any(list(line.get_ydata()) == [0.1, 0.1] for line in fig.axes[0].get_lines())  # the dotted level


def test_exact_match_axes_show_the_whole_scale():
    fig, artists = plots.plot_rank_summary([1, 2], [10, 20], [1.0, 0.5], [0.83, 0.99])
    assert [ax.get_ylim() for ax in artists["axes"][2:]] == [(0, 1.05), (0, 1.05)]


def test_summary_targets_similarity_and_live_figures_hold_their_data():
    fig, artists = plots.plot_rank_summary([1, 2], [10, 20], [1.0, 0.5], [0.1, 0.2], full={"loss": 0.4,
                                                                                          "accuracy": 0.3})
    np.testing.assert_allclose(artists["axes"][1].get_lines()[0].get_xdata(), [10, 20])
    fig, artists = plots.plot_rank_summary([1, 2], [10, 20], [1.0, 0.5], [0.1, 0.2],
                                           full={"loss": 0.4, "accuracy": 0.3, "params": 500})
    full_point = artists["axes"][3].get_lines()[-1]  # exact match against parameters: full's own point
    assert list(full_point.get_xdata()) == [500] and list(full_point.get_ydata()) == [0.3]
    fig, artists = plots.plot_targets({"q": {"r": 8, "params": 100, "loss": 0.3, "accuracy": 0.7}})
    assert artists["accuracy"][0].get_height() == 0.7
    phi = np.eye(2)
    fig, artists = plots.plot_subspace_similarity(phi)
    np.testing.assert_allclose(artists["image"].get_array(), phi)

    class H:
        train_loss, eval_steps, eval_loss = [3.0, 2.0], [0, 2], [3.5, 2.5]

    fig, artists = plots.plot_live(10)
    plots.update_live(artists, H)
    np.testing.assert_allclose(artists["train"].get_xdata(), [1, 2])
    np.testing.assert_allclose(artists["eval"].get_ydata(), [3.5, 2.5])


def test_target_bars_under_the_budget_are_hatched_so_they_do_not_read_as_like_for_like():
    results = {"q": {"r": 14, "params": 100, "loss": 0.2, "accuracy": 0.7},
               "all linear": {"r": 1, "params": 65, "loss": 0.01, "accuracy": 1.0}}
    fig, artists = plots.plot_targets(results)
    assert [bar.get_hatch() for bar in artists["accuracy"]] == [None, "//"]
    assert [t.get_text() for t in fig.axes[1].get_xticklabels()] == ["q\nr = 14\n100", "all linear\nr = 1\n65"]
