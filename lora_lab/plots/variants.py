"""Figures for notebook 08 (LoRA's variants against QLoRA's quantization error): starting logit error per
variant, the same error against rank (the slider's figure), equal-budget training curves, and the DoRA
paper's ΔM-ΔD scatter (Liu et al. 2024, arXiv 2402.09353, Fig. 2).

Data come from `lora_lab.variants`; builders return ``(fig, artists)``.
"""

from __future__ import annotations

import numpy as np

from ..i18n import tr
from ..variants import VARIANTS
from ._figure import COLORS, new_figure, palette_color


def variant_color(label: str, labels) -> str:
    """One colour per variant in every figure: `VARIANTS` in their order, then the other ``labels`` in theirs;
    full fine-tuning in black, as everywhere."""
    if label == "full":
        return COLORS["full"]
    if label in VARIANTS:
        return palette_color(VARIANTS.index(label))
    others = [k for k in labels if k not in VARIANTS and k != "full"]
    return palette_color(len(VARIANTS) + others.index(label))


def plot_starting_errors(errors: dict):
    """Bars of the starting logit MAE (left) and MSE (right) against the 16-bit model, one bar per variant.

    Args:
        errors: ``{label: LogitError}`` (`lora_lab.variants.starting_errors`), drawn in that order.
    """
    fig, axes = new_figure(ncols=2, width=7.0, height=2.8)
    labels = list(errors)
    x = np.arange(len(labels))
    bars = {}
    for ax, key, name in ((axes[0], "mae", "MAE"), (axes[1], "mse", "MSE")):
        values = [getattr(errors[k], key) for k in labels]
        bars[key] = ax.bar(x, values, color=[variant_color(k, labels) for k in labels])
        ax.set_xticks(x, [tr(k) for k in labels], fontsize=8, rotation=20)
        ax.set(ylabel=tr("logit {name} vs 16-bit", name=name), ylim=(0, max(values) * 1.15))
    return fig, {"bars": bars}


def plot_error_sweep(sweep: dict, r):
    """Starting logit MAE against rank for each variant (left) and the chosen rank's bars (right).

    Args:
        sweep: ``{r: {label: LogitError}}`` (`lora_lab.variants.error_sweep`). r: the rank shown first.
    """
    fig, (ax_line, ax_bar) = new_figure(ncols=2, width=7.0, height=2.8)
    ranks = list(sweep)
    labels = list(sweep[ranks[0]])
    for label in labels:
        ax_line.plot(ranks, [sweep[k][label].mae for k in ranks], "o-", color=variant_color(label, labels),
                     label=tr(label), ms=4)
    top = max(e.mae for row in sweep.values() for e in row.values()) * 1.15
    ax_line.set(xscale="log", xlabel=tr("rank r"), ylabel=tr("logit {name} vs 16-bit", name="MAE"),
                ylim=(0, top))
    ax_line.set_xticks(ranks, [str(k) for k in ranks])
    ax_line.legend(fontsize=8, loc="lower left")
    marker = ax_line.axvline(ranks[0], color="k", lw=1, ls=":")
    x = np.arange(len(labels))
    bars = ax_bar.bar(x, [0.0] * len(labels), color=[variant_color(k, labels) for k in labels])
    ax_bar.set_xticks(x, [tr(k) for k in labels], fontsize=8)
    ax_bar.set(ylim=(0, top))
    text = ax_bar.text(0.97, 0.95, "", transform=ax_bar.transAxes, ha="right", va="top", fontsize=9)
    artists = {"sweep": sweep, "marker": marker, "bars": bars, "text": text, "labels": labels}
    update_error_sweep(artists, r)
    return fig, artists


def update_error_sweep(artists: dict, r) -> dict:
    """Show rank ``r``: move the marker, set the bars, write each variant's MAE relative to plain QLoRA's.

    Returns:
        ``{label: MAE}`` at that rank.
    """
    row = artists["sweep"][r]
    artists["marker"].set_xdata([r, r])
    for bar, label in zip(artists["bars"], artists["labels"]):
        bar.set_height(row[label].mae)
    first = artists["labels"][0]
    lines = [f"r = {r}"] + [tr("{name}: {ratio:.2f}x {reference}", name=tr(k), ratio=row[k].mae / row[first].mae,
                               reference=tr(first)) for k in artists["labels"][1:]]
    artists["text"].set_text("\n".join(lines))
    return {k: row[k].mae for k in artists["labels"]}


def plot_training_curves(runs: dict, ylabel: str = "eval loss"):
    """Eval loss against step for each variant's equal-budget run (log scale), full fine-tuning dashed.

    Args:
        runs: ``{label: VariantRun}`` or ``{label: History}`` (anything with ``eval_steps`` and ``eval_loss``).
    """
    fig, ax = new_figure(width=7.0, height=3.2)
    labels = list(runs)
    lines = {}
    for label, run in runs.items():
        history = getattr(run, "history", run)
        style = dict(ls="--", lw=1.5) if label == "full" else dict(lw=2)
        (lines[label],) = ax.plot(history.eval_steps, history.eval_loss, color=variant_color(label, labels),
                                  label=tr("full fine-tuning (16-bit)") if label == "full" else tr(label), **style)
    ax.set(yscale="log", xlabel=tr("step"), ylabel=tr(ylabel))
    ax.legend(fontsize=8)
    return fig, {"lines": lines}


def fit_slope(points) -> float:
    """The least-squares slope of ΔM on ΔD over ``[(step, ΔM, ΔD), ...]``."""
    d = np.array([p[2] for p in points], dtype=float)
    m = np.array([p[1] for p in points], dtype=float)
    if len(d) < 2 or np.ptp(d) == 0:
        raise ValueError("A slope needs at least two points with different ΔD.")
    return float(np.polyfit(d, m, 1)[0])


def plot_magnitude_direction(points: dict, correlations: dict | None = None):
    """The DoRA paper's Fig. 2: ΔD (x) against ΔM (y), one panel per method, one colour per layer, the
    checkpoints' steps written at the points, and the least-squares line over every point.

    Args:
        points: ``{method: {layer: [(step, ΔM, ΔD), ...]}}`` (`lora_lab.variants.magnitude_direction_points`).
        correlations: ``{method: r}`` to write in each panel's title.
    """
    fig, axes = new_figure(ncols=len(points), width=7.0, height=2.8)
    axes = axes if isinstance(axes, list) else [axes]
    fits = {}
    for ax, (method, series) in zip(axes, points.items()):
        every = [p for layer in series.values() for p in layer]
        for i, (layer, pts) in enumerate(series.items()):
            ax.scatter([p[2] for p in pts], [p[1] for p in pts], s=14, color=palette_color(i),
                       label=layer.split(".")[2] if layer.count(".") > 2 else layer)
        fits[method] = fit_slope(every)
        d = np.array([p[2] for p in every])
        ax.plot(d, np.polyval(np.polyfit(d, [p[1] for p in every], 1), d), color="k", lw=1)
        title = tr(method) if correlations is None else f"{tr(method)}: r = {correlations[method]:+.2f}"
        ax.set(title=title, xlabel="ΔD")
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("ΔM")
    axes[0].legend(fontsize=7, title=tr("layer"), title_fontsize=7)
    return fig, {"axes": axes, "slopes": fits}
