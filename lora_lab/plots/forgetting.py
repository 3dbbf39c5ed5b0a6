"""Figures for notebook 07 (what fine-tuning forgets): the learn-forget plane of a sweep, the chosen run's
intruder dimensions, and the intruder mitigation over λ.

Rows come from `lora_lab.forgetting.forgetting_sweep` / `mitigation_sweep`; builders return ``(fig, artists)``.
"""

from __future__ import annotations

import numpy as np

from ..i18n import tr
from ._figure import COLORS, new_figure, palette_color


def run_label(row: dict) -> str:
    """``"full"`` or ``"r = 4"``: the method-and-rank a sweep row belongs to."""
    return "full" if row["method"] == "full" else f"r = {row['r']}"


def shown_label(label: str) -> str:
    """A `run_label` as a student reads it: ``"full"`` in the language in force, a rank as it is."""
    return tr("full") if label == "full" else label


def series(rows) -> dict[str, list[dict]]:
    """The rows grouped by `run_label` (full first, then ranks ascending), each sorted by learning rate."""
    groups: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda x: (x["method"] != "full", x["r"] or 0, x["lr"])):
        groups.setdefault(run_label(row), []).append(row)
    return groups


def run_readout(row: dict) -> str:
    """Two lines for the highlighted run: what it learned, what it forgot, its intruders."""
    stopped = tr(" (diverged)") if row.get("stopped") else ""
    intruders = tr("{n} intruder" if row["intruders"] == 1 else "{n} intruders", n=row["intruders"])
    return tr("{label}, lr {lr:g}{stopped}: task exact match {task:.2f}\n"
              "corpus loss +{rise:.2f} nats, copy exact match {copy:.2f}, {intruders}",
              label=shown_label(run_label(row)), lr=row["lr"], stopped=stopped, task=row["task_accuracy"],
              rise=row["corpus_loss_rise"], copy=row["copy_accuracy"], intruders=intruders)


def _cosine_points(row: dict, top_k: int) -> np.ndarray:
    """(layers * k, 2): x = singular vector index (1 = largest) with a small offset per layer, y = max cosine."""
    points = []
    layers = list(row["cosines"].values())
    for i, values in enumerate(layers):
        offset = (i - (len(layers) - 1) / 2) * 0.6 / max(len(layers), 1)
        points += [(j + 1 + offset, v) for j, v in enumerate(values[:top_k])]
    return np.array(points, dtype=float).reshape(-1, 2)


def plot_learn_forget(rows, highlight: dict, threshold_epsilon: float = 0.5, top_k: int = 10):
    """Left: every run as (corpus-loss rise, task exact match), one line per method through its learning rates,
    the highlighted run in red. Right: the highlighted run's top-k singular vectors, each at its largest cosine
    with the base weight's (one dot per layer), intruders (below ε, dotted) in red.
    """
    fig, (ax, ax_s) = new_figure(ncols=2, width=8.0, height=3.4)
    groups = series(rows)
    for i, (label, group) in enumerate(groups.items()):
        color = COLORS["full"] if label == "full" else palette_color(i)
        x = [g["corpus_loss_rise"] for g in group]
        ax.plot(x, [g["task_accuracy"] for g in group], "o-", color=color, lw=1, ms=4, label=shown_label(label))
    (point,) = ax.plot([], [], "o", ms=11, mfc="none", mew=2, color=COLORS["highlight"])
    rises = [r["corpus_loss_rise"] for r in rows]
    ax.set(xlabel=tr("forgot: corpus loss rise (nats)"), ylabel=tr("learned: task exact match"), ylim=(-0.05, 1.3),
           yticks=np.linspace(0, 1, 6), xlim=(min(0.0, min(rises)) - 0.1, max(rises) * 1.05 + 0.1))  # room: readout
    ax.legend(fontsize=8, loc="lower right")
    text = ax.text(0.02, 0.98, "", transform=ax.transAxes, ha="left", va="top", fontsize=8)
    ax_s.axhline(threshold_epsilon, color="0.4", ls=":", lw=1)
    ax_s.set(xlabel=tr("singular vector of the tuned W (1 = largest)"), ylabel=tr("max |cos| with W0's"),
             ylim=(0, 1.05),
             xlim=(0.4, top_k + 0.6), xticks=range(1, top_k + 1))
    dots = ax_s.scatter([], [], s=12)
    artists = {"point": point, "text": text, "dots": dots, "epsilon": threshold_epsilon, "top_k": top_k}
    update_learn_forget(artists, highlight)
    return fig, artists


def update_learn_forget(artists: dict, row: dict) -> None:
    """Move the highlight to ``row`` and redraw its readout and its singular vectors' cosines."""
    artists["point"].set_data([row["corpus_loss_rise"]], [row["task_accuracy"]])
    artists["text"].set_text(run_readout(row))
    points = _cosine_points(row, artists["top_k"])
    artists["dots"].set_offsets(points)
    below = points[:, 1] < artists["epsilon"]
    artists["dots"].set_color([COLORS["highlight"] if b else COLORS["lora"] for b in below])


def mitigation_readout(row: dict) -> str:
    """One line for the chosen λ."""
    return tr("λ = {lam:g}: task exact match {task:.2f}, copy exact match {copy:.2f}, corpus loss +{rise:.2f}",
              lam=row["lambda"], task=row["task_accuracy"], copy=row["copy_accuracy"], rise=row["corpus_loss_rise"])


def plot_mitigation(rows, highlight: float):
    """Task exact match (what the adapter learned) and copy exact match (what the base kept) against λ,
    the chosen λ marked; λ = 1 is the adapter as trained."""
    fig, ax = new_figure(width=7.0, height=3.0)
    lambdas = [r["lambda"] for r in rows]
    ax.plot(lambdas, [r["task_accuracy"] for r in rows], "o-", color=COLORS["lora"], label=tr("task (learned)"))
    ax.plot(lambdas, [r["copy_accuracy"] for r in rows], "s-", color=COLORS["full"], label=tr("copy (kept)"))
    ax.set(xlabel=tr("mitigation_lambda λ (share of each intruder kept)"), ylabel=tr("exact match"),
           ylim=(-0.05, 1.1))
    ax.legend(fontsize=8, loc="center right")
    line = ax.axvline(lambdas[0], color=COLORS["highlight"], lw=2, alpha=0.6)
    text = ax.text(0.02, 0.98, "", transform=ax.transAxes, ha="left", va="top", fontsize=9)
    artists = {"line": line, "text": text, "rows": {r["lambda"]: r for r in rows}}
    update_mitigation(artists, highlight)
    return fig, artists


def update_mitigation(artists: dict, lam: float) -> dict:
    """Mark λ and write its readout; returns its row."""
    row = artists["rows"][lam]
    artists["line"].set_xdata([lam, lam])
    artists["text"].set_text(mitigation_readout(row))
    return row
