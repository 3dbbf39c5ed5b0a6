"""Figures for notebook 03 (NF4 quantization): codebooks, code occupancy, error histograms, block sizes.

Data functions are pure and tested; they take tensors and, where quantization is needed, a callable
``quantize(w, blocksize) -> w_hat`` (for example built from `lora_lab.nf4`), so they work for any 4-bit type.
Figure builders return ``(fig, artists)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..nf4 import nearest_code
from ..i18n import tr
from ._figure import COLORS, new_figure, palette_color

ERROR_RANGE = 0.3  # histogram x-range of the error, in units of the weights' standard deviation
ERROR_BINS = 61


def block_normalize(w: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Flatten w, split into blocks of ``blocksize`` and divide each by its absmax: the values in [-1, 1]
    that a 4-bit codebook sees (the last block may be shorter, as in bitsandbytes)."""
    flat = w.detach().float().reshape(-1)
    out = torch.empty_like(flat)
    for start in range(0, flat.numel(), blocksize):
        block = flat[start:start + blocksize]
        out[start:start + blocksize] = block / block.abs().max().clamp(min=1e-38)
    return out


def code_occupancy(codes: torch.Tensor, n_codes: int = 16) -> np.ndarray:
    """Share of values that landed on each code (sums to 1)."""
    counts = torch.bincount(codes.reshape(-1).long(), minlength=n_codes).double()
    return (counts / counts.sum()).numpy()


def entropy_bits(occupancy) -> float:
    """Shannon entropy of the code distribution in bits (4.0 only if all 16 codes are equally used)."""
    p = np.asarray(occupancy, dtype=np.float64)
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def lloyd_max(x: torch.Tensor, levels: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """Move levels to the MSE-optimal grid for samples x (Lloyd's algorithm); ±1 and 0 stay fixed.

    Keeping the end points and zero pinned keeps the comparison with NF4 fair: absmax scaling puts a
    value exactly on -1 or +1 in every block, and zero must stay exact.
    """
    levels = levels.clone().double()
    x = x.double()
    fixed = (levels.abs() == 1) | (levels == 0)
    for _ in range(iters):
        codes = nearest_code(x, levels).long()  # the quantizer's rounding (`lora_lab.nf4`), as indices
        sums = torch.zeros_like(levels).index_add_(0, codes, x)
        counts = torch.bincount(codes, minlength=len(levels)).double()
        moved = torch.where(counts > 0, sums / counts.clamp(min=1), levels)
        levels = torch.where(fixed, levels, moved).sort().values
    return levels.float()


def error_stats(w: torch.Tensor, w_hat: torch.Tensor) -> dict[str, float]:
    """RMSE, mean and max absolute error, and SQNR = 10 log10(mean w² / mean err²) in dB."""
    w, err = w.double().reshape(-1), (w_hat.double() - w.double()).reshape(-1)
    mse = float((err**2).mean())
    return {"rmse": math.sqrt(mse), "mean_abs": float(err.abs().mean()), "max_abs": float(err.abs().max()),
            "sqnr_db": 10 * math.log10(float((w**2).mean()) / mse) if mse > 0 else math.inf}


def error_grid(samples: dict, quantizers: dict, blocksizes) -> dict:
    """Quantize every sample with every quantizer at every block size, once.

    Args:
        samples: name -> weight tensor.
        quantizers: name -> ``quantize(w, blocksize) -> w_hat``.
        blocksizes: block sizes to try.

    Returns:
        ``{(sample, quantizer, blocksize): {"error": (w_hat - w) / std(w) as float32 numpy, **error_stats}}``.
    """
    grid = {}
    for s_name, w in samples.items():
        std = float(w.double().std())
        for q_name, quantize in quantizers.items():
            for bs in blocksizes:
                w_hat = quantize(w, bs)
                grid[(s_name, q_name, bs)] = {"error": ((w_hat.double() - w.double()) / std).reshape(-1)
                                              .float().numpy(), **error_stats(w, w_hat)}
    return grid


def error_histogram(error: np.ndarray) -> np.ndarray:
    """Density of the scaled error over fixed bins in [-ERROR_RANGE, ERROR_RANGE] (outliers clipped in)."""
    edges = np.linspace(-ERROR_RANGE, ERROR_RANGE, ERROR_BINS + 1)
    counts, _ = np.histogram(np.clip(error, edges[0], edges[-1]), bins=edges)
    return counts / (counts.sum() * np.diff(edges))


def stats_table_html(grid: dict, sample: str, blocksize: int, selected: str) -> str:
    """An HTML table of error statistics for every quantizer at (sample, blocksize); ``selected`` in bold."""
    rows = [(q, v) for (s, q, bs), v in grid.items() if s == sample and bs == blocksize]
    head = "<tr>" + "".join(f"<th>{tr(h)}</th>" for h in ("quantizer", "RMSE", "mean |err|", "max |err|", "SQNR dB"))
    head += "</tr>"
    body = "".join(
        f"<tr style='font-weight:{'bold' if q == selected else 'normal'}'><td>{q}</td><td>{v['rmse']:.4f}</td>"
        f"<td>{v['mean_abs']:.4f}</td><td>{v['max_abs']:.4f}</td><td>{v['sqnr_db']:.1f}</td></tr>" for q, v in rows)
    return f"<table>{head}{body}</table>"


def plot_codebook(levels: torch.Tensor, reference: torch.Tensor | None = None):
    """The 16 levels on [-1, 1] with the midpoint thresholds; ``reference`` (e.g. bitsandbytes') as rings."""
    fig, ax = new_figure(height=2.2)
    levels = np.asarray(levels, dtype=np.float64)
    if reference is not None:
        ax.plot(np.asarray(reference), np.zeros(len(reference)), "o", ms=11, mfc="none", color="k",
                label=tr("bitsandbytes NF4"))
    (dots,) = ax.plot(levels, np.zeros(len(levels)), "o", color=COLORS["nf4"], label=tr("codebook"))
    mids = (levels[1:] + levels[:-1]) / 2
    (cuts,) = ax.plot(np.repeat(mids, 3), np.tile([-0.6, 0.6, np.nan], len(mids)), color=COLORS["fp4"], lw=1,
                      label=tr("thresholds (midpoints)"))
    ax.set(xlim=(-1.08, 1.08), ylim=(-1, 1.2), yticks=[], xlabel=tr("normalized weight (w / absmax)"))
    ax.legend(loc="upper left", ncols=3, fontsize=8, frameon=False)
    return fig, {"dots": dots, "cuts": cuts}


def update_codebook(artists: dict, levels: torch.Tensor) -> None:
    """Move the level dots and threshold lines to a new codebook."""
    levels = np.asarray(levels, dtype=np.float64)
    artists["dots"].set_xdata(levels)
    mids = (levels[1:] + levels[:-1]) / 2
    artists["cuts"].set_xdata(np.repeat(mids, 3))


def plot_levels_over_hist(normalized: torch.Tensor, codebooks: dict):
    """Histogram of block-normalized weights with each codebook's 16 levels as a row of ticks above it."""
    fig, ax = new_figure(height=3.0)
    counts, edges, _ = ax.hist(np.asarray(normalized), bins=101, range=(-1, 1), density=True,
                               color=COLORS["random"], alpha=0.5)
    top = counts.max()
    rows = {}
    for i, (name, levels) in enumerate(codebooks.items()):
        y = top * (1.15 + 0.2 * i)
        color = COLORS.get(name.lower().split()[0], palette_color(i))
        (rows[name],) = ax.plot(np.asarray(levels), np.full(len(levels), y), "|", ms=12, mew=2, color=color)
        ax.text(-1.06, y, name, ha="right", va="center", fontsize=9, color=color)
    ax.set(xlim=(-1.05, 1.05), xlabel=tr("w / absmax of its block"), ylabel=tr("density"), yticks=[])
    return fig, {"rows": rows, "counts": counts}


def plot_occupancy(occupancies: dict):
    """Grouped bars: share of values on each of the 16 codes, per quantizer (uniform use = 1/16 dashed)."""
    fig, ax = new_figure(height=2.8)
    width = 0.8 / len(occupancies)
    bars = {}
    for i, (name, occ) in enumerate(occupancies.items()):
        color = COLORS.get(name.lower().split()[0], palette_color(i))
        label = tr("{name} ({bits:.2f} bits)", name=name, bits=entropy_bits(occ))
        bars[name] = ax.bar(np.arange(len(occ)) + (i - (len(occupancies) - 1) / 2) * width, occ, width,
                            color=color, label=label)
    ax.axhline(1 / 16, color="k", ls="--", lw=1)
    ax.set(xlabel=tr("code (sorted by level)"), ylabel=tr("share of weights"), xticks=range(16))
    ax.legend(fontsize=8)
    return fig, {"bars": bars}


def plot_error_explorer(grid: dict, key: tuple):
    """Histogram of the scaled error for one (sample, quantizer, blocksize) key, fixed axes for redraws."""
    fig, ax = new_figure(width=6.0, height=3.0)
    edges = np.linspace(-ERROR_RANGE, ERROR_RANGE, ERROR_BINS + 1)
    hist = ax.stairs(error_histogram(grid[key]["error"]), edges, fill=True, color=COLORS["nf4"], baseline=1e-3)
    ax.set(yscale="log", ylim=(1e-2, 300), xlim=(edges[0], edges[-1]), ylabel=tr("density"),
           xlabel=tr("quantization error / std(w)\n(the end bins also count errors beyond ±{range:g})",
                     range=ERROR_RANGE))
    label = ax.text(0.02, 0.95, "", transform=ax.transAxes, va="top", fontsize=9)
    artists = {"hist": hist, "label": label, "grid": grid}
    update_error_explorer(artists, key)
    return fig, artists


def update_error_explorer(artists: dict, key: tuple) -> np.ndarray:
    """Show the error histogram of ``key``; returns the densities drawn."""
    density = error_histogram(artists["grid"][key]["error"])
    edges = np.linspace(-ERROR_RANGE, ERROR_RANGE, ERROR_BINS + 1)
    artists["hist"].set_data(np.maximum(density, 1e-3), edges)
    name = {"nf4": COLORS["nf4"], "fp4": COLORS["fp4"], "int4": COLORS["int4"]}
    artists["hist"].set_color(name.get(key[1].lower().split()[0], COLORS["nf4"]))
    artists["label"].set_text(tr("{sample}, {quantizer}, blocksize {blocksize}: RMSE {rmse:.4f}", sample=key[0],
                                 quantizer=key[1], blocksize=key[2], rmse=artists["grid"][key]["rmse"]))
    return density


def blocksize_errors(w: torch.Tensor, quantize, blocksizes) -> np.ndarray:
    """RMSE of ``quantize(w, blocksize)`` at each block size."""
    return np.array([error_stats(w, quantize(w, bs))["rmse"] for bs in blocksizes])


def plot_blocksize_errors(blocksizes, curves: dict):
    """RMSE against block size (log2 x), one line per case (e.g. with and without an outlier)."""
    fig, ax = new_figure(width=5.5, height=3.0)
    lines = {}
    for i, (name, rmse) in enumerate(curves.items()):
        (lines[name],) = ax.plot(blocksizes, rmse, "o-", color=palette_color(i), label=name)
    ax.set(xscale="log", xlabel=tr("blocksize"), ylabel="RMSE", ylim=(0, None))
    ax.set_xticks(list(blocksizes), [str(b) for b in blocksizes])
    ax.legend(fontsize=8)
    return fig, {"lines": lines}
