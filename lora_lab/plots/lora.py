"""Figures for notebook 01 (LoRA from scratch): rank-r approximation, scaling conventions, update spectra.

Data functions are pure (tensors or numbers in, numbers out) and tested; figure builders return
``(fig, artists)`` where ``artists`` names what an update function changes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..i18n import tr
from ._figure import COLORS, new_figure, palette_color

# The three scalings of the update B A that users meet (research notes, users' question 4).
SCALINGS = {
    "α/r (paper)": lambda alpha, r: alpha / r,
    "α/√r (rsLoRA)": lambda alpha, r: alpha / math.sqrt(r),
    "raw α": lambda alpha, r: float(alpha),
}
SCALING_COLORS = {"α/r (paper)": COLORS["paper"], "α/√r (rsLoRA)": COLORS["rslora"], "raw α": COLORS["raw"]}


def singular_values(weight: torch.Tensor) -> torch.Tensor:
    """Singular values of a (out, in) matrix, descending, computed in float64 and returned as float64."""
    if weight.ndim != 2:
        raise ValueError(f"Expected a 2-D weight matrix, got shape {tuple(weight.shape)}.")
    return torch.linalg.svdvals(weight.detach().to("cpu", torch.float64))


def lowrank_error(s: torch.Tensor) -> np.ndarray:
    """Relative error of the best rank-r approximation, for r = 0 .. len(s) (Eckart–Young).

    ``||W - W_r||_F / ||W||_F = sqrt(sum_{k>r} s_k^2 / sum_k s_k^2)``; entry 0 is 1, the last is 0.
    """
    energy = np.asarray(s, dtype=np.float64) ** 2
    tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]])  # tail[r] = sum_{k >= r} s_k^2
    return np.sqrt(tail / energy.sum())


def energy_rank(s: torch.Tensor, fraction: float = 0.9) -> int:
    """Smallest r whose top-r singular values hold ``fraction`` of ``||W||_F^2``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    energy = np.asarray(s, dtype=np.float64) ** 2
    kept = np.cumsum(energy) / energy.sum()
    return int(np.searchsorted(kept, fraction - 1e-12) + 1)


def rank_panel_data(s: torch.Tensor, r: int, in_features: int, out_features: int) -> dict:
    """What the rank slider shows at rank r: LoRA parameters r(in + out) against in·out, and the error."""
    if not 1 <= r <= len(s):
        raise ValueError(f"r must be between 1 and {len(s)}, got {r}.")
    lora, full = r * (in_features + out_features), in_features * out_features
    return {"r": r, "lora_params": lora, "full_params": full, "ratio": lora / full,
            "rel_error": float(lowrank_error(s)[r])}


def update_sizes(ranks, alpha: float, base_norms) -> dict[str, np.ndarray]:
    """Effective update size ``scaling(alpha, r) * ||B A||_F`` per scaling convention, at each rank."""
    base = np.asarray(base_norms, dtype=np.float64)
    return {name: np.array([fn(alpha, r) for r in ranks]) * base for name, fn in SCALINGS.items()}


def random_update_norms(ranks, in_features: int, out_features: int, seed: int = 0) -> np.ndarray:
    """``||B A||_F`` for A, B with entries U(-1/sqrt(in), 1/sqrt(in)) (the scale of A's init), per rank.

    With entries of a fixed scale, ``||B A||_F`` grows like sqrt(r): the reason rsLoRA divides by sqrt(r).
    """
    gen = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(in_features)
    norms = []
    for r in ranks:
        a = (torch.rand(r, in_features, generator=gen) * 2 - 1) * bound
        b = (torch.rand(out_features, r, generator=gen) * 2 - 1) * bound
        norms.append(float(torch.linalg.matrix_norm(b @ a)))
    return np.array(norms)


def plot_rank_explorer(s: torch.Tensor, r: int, in_features: int, out_features: int):
    """Singular values (the r that W_r keeps highlighted) and the rank-r error curve with a marker at r."""
    fig, (ax_s, ax_e) = new_figure(ncols=2)
    values, edges = np.asarray(s), np.arange(len(s) + 1) + 0.5  # bar k spans [k - 0.5, k + 0.5]
    ax_s.stairs(values, edges, fill=True, color=COLORS["random"], baseline=values.min() / 2)
    kept = ax_s.stairs(values[:1], edges[:2], fill=True, color=COLORS["highlight"], baseline=values.min() / 2)
    ax_s.set(yscale="log", xlabel=tr("index k"), ylabel=tr("singular value σ_k"), title=tr("spectrum of W"))
    err = lowrank_error(s)
    ax_e.plot(np.arange(len(err)), err, color=COLORS["lora"])
    (marker,) = ax_e.plot([], [], "o", color=COLORS["highlight"])
    ax_e.set(xlabel=tr("rank r"), ylabel="||W − W_r||_F / ||W||_F", title=tr("best rank-r approximation"),
             ylim=(0, 1.02))
    text = ax_e.text(0.97, 0.95, "", transform=ax_e.transAxes, ha="right", va="top", fontsize=9)
    artists = {"kept": kept, "marker": marker, "text": text, "s": s, "dims": (in_features, out_features)}
    update_rank_explorer(artists, r)
    return fig, artists


def update_rank_explorer(artists: dict, r: int) -> dict:
    """Move the highlight to rank r; returns the panel data now shown."""
    data = rank_panel_data(artists["s"], r, *artists["dims"])
    values = np.asarray(artists["s"])
    artists["kept"].set_data(values[:r], np.arange(r + 1) + 0.5)  # the r singular values a rank-r W_r keeps
    artists["marker"].set_data([r], [data["rel_error"]])
    artists["text"].set_text(tr("r = {r}\nA+B: {params:,} params\n= {percent:.1f}% of {full:,}\nerror {error:.3f}",
                                r=r, params=data["lora_params"], percent=100 * data["ratio"],
                                full=data["full_params"], error=data["rel_error"]))
    return data


def plot_update_sizes(ranks, alpha: float, base_norms, r: int):
    """Effective update size against rank (log-log), one line per scaling convention, a marker at r."""
    fig, ax = new_figure(width=5.5, height=3.2)
    lines, markers = {}, {}
    for name in SCALINGS:
        (lines[name],) = ax.plot(ranks, np.ones(len(ranks)), "-", color=SCALING_COLORS[name], label=name)
        (markers[name],) = ax.plot([], [], "o", color=SCALING_COLORS[name])
    ax.set(xscale="log", yscale="log", xlabel=tr("rank r"), ylabel="||scaling · B A||_F",
           title=tr("effective update size (A, B entries of fixed scale)"))
    ax.set_xticks(list(ranks), [str(x) for x in ranks])
    ax.legend(loc="upper left", fontsize=8)
    artists = {"ax": ax, "lines": lines, "markers": markers, "ranks": list(ranks), "base": np.asarray(base_norms)}
    low, high = update_sizes(ranks, 1.0, base_norms), update_sizes(ranks, 64.0, base_norms)
    ax.set_ylim(min(v.min() for v in low.values()) / 2, max(v.max() for v in high.values()) * 2)
    update_update_sizes(artists, alpha, r)
    return fig, artists


def update_update_sizes(artists: dict, alpha: float, r: int) -> dict[str, float]:
    """Redraw for a new alpha and rank; returns each convention's update size at rank r."""
    sizes = update_sizes(artists["ranks"], alpha, artists["base"])
    i = artists["ranks"].index(r)
    for name, values in sizes.items():
        artists["lines"][name].set_ydata(values)
        artists["markers"][name].set_data([r], [values[i]])
    return {name: float(values[i]) for name, values in sizes.items()}


def plot_loss_grid(curves: dict[str, dict[int, list[float]]]):
    """One panel per scaling convention, one loss curve per rank (log y, shared, spanning every curve's range)."""
    fig, axes = new_figure(ncols=len(curves), width=2.6 * len(curves), height=2.8)
    axes = axes if isinstance(axes, list) else [axes]
    ranks = sorted({r for per_rank in curves.values() for r in per_rank})
    shades = {r: c for r, c in zip(ranks, ["#9ecae1", "#4292c6", "#08306b", "#000000"])}
    for ax, (name, per_rank) in zip(axes, curves.items()):
        for r, losses in per_rank.items():
            ax.plot(losses, color=shades[r], label=f"r={r}")
        ax.set(yscale="log", title=name, xlabel=tr("step"))
    axes[0].set_ylabel(tr("loss"))
    axes[0].legend(fontsize=8)
    for ax in axes[1:]:
        ax.sharey(axes[0])
    every = np.concatenate([np.asarray(c, dtype=float) for per_rank in curves.values() for c in per_rank.values()])
    axes[0].set_ylim(every.min() / 1.5, every.max() * 1.5)  # shared, and holding every curve: overshoots included
    return fig, {"axes": axes}


def plot_spectra(spectra: dict[str, torch.Tensor], top: int = 32):
    """Normalized singular values σ_k/σ_1 (left) and cumulative energy (right) of several matrices."""
    fig, (ax_s, ax_c) = new_figure(ncols=2)
    lines = {}
    for i, (name, s) in enumerate(spectra.items()):
        s = np.asarray(s, dtype=np.float64)
        color = COLORS["random"] if "random" in name.lower() else palette_color(i)
        k = np.arange(1, min(top, len(s)) + 1)
        (lines[name],) = ax_s.plot(k, s[: len(k)] / s[0], "o-", ms=3, color=color, label=tr(name))
        ax_c.plot(np.arange(1, len(s) + 1), np.cumsum(s**2) / np.sum(s**2), color=color, label=tr(name))
    ax_s.set(xlabel=tr("index k"), ylabel="σ_k / σ_1", title=tr("top {top} singular values", top=top), ylim=(0, 1.05))
    ax_c.set(xlabel=tr("rank r"), ylabel=tr("share of ||ΔW||_F²"), title=tr("cumulative energy"), ylim=(0, 1.02))
    ax_c.axhline(0.9, color="k", lw=0.5, ls=":")
    ax_s.legend(fontsize=8)
    return fig, {"lines": lines}
