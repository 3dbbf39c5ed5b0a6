"""Figures for notebook 02 (rank effects): loss curves over ranks, results against rank and parameters,
target modules under one budget, and the subspace similarity of adapters (LoRA paper §7.2).

Curves come in as ``{label: (steps, losses)}``; figure builders return ``(fig, artists)``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..i18n import tr
from ._figure import COLORS, new_figure


def subspace_similarity(a_small: torch.Tensor, a_large: torch.Tensor) -> np.ndarray:
    """The LoRA paper's φ (Eq. 4): ``phi[i-1, j-1] = ||U_i^T V_j||_F^2 / min(i, j)`` for all i, j.

    ``U_i`` (``V_j``) are the top-i (top-j) right-singular vectors of ``a_small`` (r1, in) and ``a_large``
    (r2, in), i.e. of ``lora_A``. 1 means one subspace contains the other; 0 means orthogonal.

    Returns:
        (r1, r2) array with entries in [0, 1].
    """
    if a_small.shape[1] != a_large.shape[1]:
        raise ValueError(f"Both matrices need the same input dimension, got {tuple(a_small.shape)} and "
                         f"{tuple(a_large.shape)}.")
    u = torch.linalg.svd(a_small.detach().double().cpu(), full_matrices=False).Vh  # (r1, in), rows descending
    v = torch.linalg.svd(a_large.detach().double().cpu(), full_matrices=False).Vh  # (r2, in)
    overlap = (u @ v.T) ** 2  # (r1, r2): squared cosines between singular directions
    cum = overlap.cumsum(0).cumsum(1).numpy()  # cum[i-1, j-1] = ||U_i^T V_j||_F^2
    i, j = np.meshgrid(np.arange(1, cum.shape[0] + 1), np.arange(1, cum.shape[1] + 1), indexing="ij")
    return cum / np.minimum(i, j)


def budget_rank(budget: int, params_per_rank: int) -> int:
    """Largest rank whose adapters fit a parameter budget (``r * params_per_rank <= budget``), at least 1."""
    if params_per_rank <= 0:
        raise ValueError(f"params_per_rank must be positive, got {params_per_rank}.")
    return max(1, budget // params_per_rank)


def final_values(curves: dict) -> dict:
    """The last value of each curve ``{label: (steps, values)}``."""
    return {label: float(values[-1]) for label, (steps, values) in curves.items()}


def plot_loss_curves(curves: dict, highlight, reference: str | None = "full", ylabel: str = "eval loss",
                     threshold: float | None = None):
    """Every curve thin and gray, one highlighted (the slider's choice), the reference dashed black.

    Args:
        threshold: a loss level drawn dotted; the readout then says at which step the highlighted curve first
            falls below it (`first_below`), which is how fast that rank learns, not only where it ends.
    """
    fig, ax = new_figure(width=6.0, height=3.2)
    for label, (steps, values) in curves.items():
        style = dict(color=COLORS["full"], ls="--", lw=1.5) if label == reference else dict(color="0.75", lw=1)
        ax.plot(steps, values, **style, label=tr("full fine-tuning") if label == reference else None)
    (line,) = ax.plot([], [], color=COLORS["highlight"], lw=2.5)
    every = np.concatenate([np.asarray(v, dtype=float) for _, v in curves.values()])
    ax.set(yscale="log", xlabel=tr("step"), ylabel=tr(ylabel), ylim=(every.min() * 0.8, every.max() * 1.2))
    if threshold is not None:
        ax.axhline(threshold, color="k", ls=":", lw=1, label=tr("loss {threshold:g}", threshold=threshold))
    text = ax.text(0.97, 0.95, "", transform=ax.transAxes, ha="right", va="top", fontsize=10)
    ax.legend(loc="lower left", fontsize=8)
    artists = {"line": line, "text": text, "curves": curves, "reference": reference, "threshold": threshold}
    update_loss_curves(artists, highlight)
    return fig, artists


def first_below(steps, values, threshold: float):
    """The first step at which ``values`` is below ``threshold``, or None if it never is."""
    return next((int(s) for s, v in zip(steps, values) if v < threshold), None)


def loss_readout(curves: dict, highlight, reference: str | None = None, threshold: float | None = None) -> str:
    """The explorer's readout: the curve's final value, its ratio to the reference's, and when it crossed
    ``threshold``, e.g. ``"r = 8: final 0.029 (5.8x full)\nbelow 0.1 from step 30"``."""
    steps, values = curves[highlight]
    name = tr(highlight) if isinstance(highlight, str) else f"r = {highlight}"
    text = tr("{name}: final {value:.3f}", name=name, value=values[-1])
    if reference is not None and reference in curves and reference != highlight:
        text += tr(" ({ratio:.1f}x {reference})", ratio=values[-1] / curves[reference][1][-1], reference=tr(reference))
    if threshold is not None:
        step = first_below(steps, values, threshold)
        text += (tr("\nbelow {threshold:g} from step {step}", threshold=threshold, step=step) if step is not None
                 else tr("\nnever below {threshold:g} in {steps} steps", threshold=threshold, steps=int(steps[-1])))
    return text


def update_loss_curves(artists: dict, highlight) -> float:
    """Highlight one curve and write its readout (`loss_readout`); returns its final value."""
    steps, values = artists["curves"][highlight]
    artists["line"].set_data(steps, values)
    artists["text"].set_text(loss_readout(artists["curves"], highlight, artists.get("reference"),
                                          artists.get("threshold")))
    return float(values[-1])


def plot_rank_summary(ranks, params, eval_loss, accuracy, full: dict | None = None):
    """Final eval loss and exact match against rank (left) and against trainable parameters (right).

    Args:
        full: full fine-tuning's ``{"loss", "accuracy"}``, drawn as a dashed line; with ``"params"`` also
            as a point at its parameter count on the right.
    """
    fig, axes = new_figure(ncols=2, nrows=2, width=7.0, height=4.6)
    series = [(eval_loss, tr("eval loss"), "loss"), (accuracy, tr("exact match"), "accuracy")]
    for row, (values, label, key) in enumerate(series):
        for col, x in enumerate([ranks, params]):
            ax = axes[2 * row + col]
            ax.plot(x, values, "o-", color=COLORS["lora"], label="LoRA")
            if full is not None:
                ax.axhline(full[key], color=COLORS["full"], ls="--", lw=1, label=tr("full fine-tuning"))
                if col == 1 and "params" in full:
                    ax.plot([full["params"]], [full[key]], "s", color=COLORS["full"])
            ax.set(xscale="log", ylabel=label if col == 0 else None)
            if key == "accuracy":
                ax.set_ylim(0, 1.05)  # the whole scale: a 0.83-to-1.00 axis would make seed noise look large
            if row == 1:
                ax.set_xlabel(tr("rank r") if col == 0 else tr("trainable parameters"))
    axes[0].set_xticks(list(ranks), [str(r) for r in ranks])
    axes[2].set_xticks(list(ranks), [str(r) for r in ranks])
    axes[0].legend(fontsize=8)
    return fig, {"axes": axes}


def plot_targets(results: dict):
    """Bars of final eval loss and accuracy per target-module choice, labeled with rank and parameters; a choice
    with fewer parameters than the largest (under the budget, so not like for like) is hatched.

    Args:
        results: ``{label: {"r", "params", "loss", "accuracy"}}``.
    """
    fig, (ax_l, ax_a) = new_figure(ncols=2, width=7.0, height=2.8)
    labels = list(results)
    x = np.arange(len(labels))
    ticks = [f"{tr(k)}\nr = {v['r']}\n{v['params']:,}" for k, v in results.items()]
    budget = max(v["params"] for v in results.values())
    hatch = ["//" if v["params"] < budget else None for v in results.values()]  # under budget: not like for like
    bars_l = ax_l.bar(x, [v["loss"] for v in results.values()], color=COLORS["lora"], hatch=hatch, edgecolor="white")
    bars_a = ax_a.bar(x, [v["accuracy"] for v in results.values()], color=COLORS["lora"], hatch=hatch,
                      edgecolor="white")
    for ax, name in ((ax_l, tr("eval loss")), (ax_a, tr("exact match"))):
        ax.set_xticks(x, ticks, fontsize=8)
        ax.set_ylabel(name)
    return fig, {"loss": bars_l, "accuracy": bars_a}


def plot_subspace_similarity(phi: np.ndarray, title: str = "φ(A_r=8, A_r=64, i, j)"):
    """Heatmap of φ over i (rows, the small rank) and j (columns, the large rank), as in the paper's Fig. 3."""
    fig, ax = new_figure(width=7.0, height=2.2)
    image = ax.imshow(phi, aspect="auto", vmin=0, vmax=1, cmap="viridis", origin="upper",
                      extent=(0.5, phi.shape[1] + 0.5, phi.shape[0] + 0.5, 0.5))
    ax.set(xlabel=tr("j (top-j directions of the larger rank)"), ylabel="i", title=tr(title))
    fig.colorbar(image, ax=ax, fraction=0.03)
    return fig, {"image": image}


def plot_live(max_steps: int, ylim=(1e-3, 10.0)):
    """An empty train-loss / eval-loss axes for the Train button's live curve."""
    fig, ax = new_figure(width=6.0, height=3.0)
    (train,) = ax.plot([], [], color=COLORS["lora"], lw=1, alpha=0.6, label=tr("train loss"))
    (evals,) = ax.plot([], [], "o-", color=COLORS["highlight"], label=tr("eval loss"))
    ax.set(xlim=(0, max_steps), ylim=ylim, yscale="log", xlabel=tr("step"), ylabel=tr("loss"))
    ax.legend(loc="upper right", fontsize=8)
    return fig, {"train": train, "eval": evals}


def update_live(artists: dict, history) -> None:
    """Draw a `lora_lab.train.History` (train_loss, eval_steps, eval_loss) so far."""
    artists["train"].set_data(np.arange(1, len(history.train_loss) + 1), history.train_loss)
    artists["eval"].set_data(history.eval_steps, history.eval_loss)
