"""Figures and tables for the memory-at-scale notebook: "will it fit?" bars against GPU sizes, and the papers'
published memory figures beside the estimator's.

GPU cards sold as "24 GB", "48 GB" and "80 GB" hold 24, 48 and 80 GiB, so the bars are drawn in GiB.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch

from ._figure import new_figure
from ..i18n import tr
from .memory import UNITS, breakdown_dict, plot_stacked_bars, stacked_bar_data, update_stacked_bars

GPU_SIZES_GB = (24, 48, 80)
# Llama's linear layers by name: in a Llama model, what PEFT's "all-linear" (`lora_lab.lora.ALL_LINEAR`) selects.
LLAMA_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QV = ("q_proj", "v_proj")


def estimate_bars_data(estimates: Mapping[str, object], unit: str = "GiB"):
    """StackedBars (one bar per label) from `Estimate` objects (`.breakdown`) or plain breakdown dicts."""
    return stacked_bar_data({k: getattr(e, "breakdown", e) for k, e in estimates.items()}, unit)


def fits_on(total_bytes: float, gpu_sizes: Sequence[float] = GPU_SIZES_GB) -> tuple[float, ...]:
    """The GPU sizes (GiB) that hold `total_bytes`; an empty tuple when none does."""
    return tuple(g for g in gpu_sizes if total_bytes <= g * UNITS["GiB"])


def plot_fit(data, gpu_sizes: Sequence[float] = GPU_SIZES_GB, title: str | None = None, yscale: str = "linear"):
    """Stacked bars with a dashed horizontal line at each GPU size. Returns (figure, axis, {category: bars})."""
    fig, ax = new_figure(width=7.0, height=3.5)
    ax.set_yscale(yscale)  # before the GPU-size axis below, which copies the scale when it is made
    _, bars = plot_stacked_bars(data, ax=ax, title=title, legend_x=1.17)  # right of the GPU-size ticks
    for g in gpu_sizes:
        ax.axhline(g, color="0.4", linestyle="--", linewidth=1)
    right = ax.secondary_yaxis("right")  # GPU sizes as ticks on the right edge: never hidden behind a bar
    right.set_yticks(list(gpu_sizes), [tr("{size:g} GB GPU", size=g) for g in gpu_sizes], fontsize=8)
    return fig, ax, bars


def plot_fit_explorer(data, gpu_sizes: Sequence[float] = GPU_SIZES_GB, title: str | None = None,
                      ylim: tuple[float, float] = (1.0, 4096.0)):
    """`plot_fit` on a fixed logarithmic y axis (`ylim`, GiB), with an (empty) total label per bar.

    The axis is logarithmic because one model's bars span two orders of magnitude (LLaMA-65B: QLoRA ~33 GiB,
    LoRA ~120, full ~730), and a linear axis cut at the largest GPU would show LoRA and full as equal clipped
    bars. It is fixed so that `update_fit` moves only bars and labels, and it holds every preset (GPT-3 175B full
    fine-tuning is ~2,000 GiB). Returns (figure, axis, {category: bars}, [label per bar]).
    """
    fig, ax, bars = plot_fit(data, gpu_sizes, title=title, yscale="log")
    ax.set_ylim(*ylim)
    ticks = [t for t in (1, 4, 16, 64, 256, 1024, 4096) if ylim[0] <= t <= ylim[1]]
    ax.set_yticks(ticks, [f"{t:,}" for t in ticks])
    ax.set_ylabel(tr("memory ({unit}, log scale)", unit=data.unit))
    labels = [ax.text(i, ylim[0], "", ha="center", va="bottom", fontsize=8) for i in range(len(data.labels))]
    return fig, ax, bars, labels


def update_fit(ax, bars, labels, data) -> None:
    """Show `data` (same labels and categories) in a figure from `plot_fit_explorer`: bar heights and total labels."""
    update_stacked_bars(bars, data)
    low, top = ax.get_ylim()
    for label, total in zip(labels, data.totals):
        label.set_position((label.get_position()[0], min(max(total, low) * 1.05, top / 1.5)))
        label.set_text(f"{total:,.1f} GiB" + (tr(" (clipped)") if total > top else ""))


class PaperFigure(NamedTuple):
    """One published figure and the estimator call that answers the same question.

    `field` names what to read from the Estimate: "total_bytes", "trainable_params", "adapter_bytes", or
    "breakdown:<category>" (one bar of the breakdown).
    """

    claim: str
    source: str
    paper_value: float
    unit: str  # "params", "MB" (10**6 bytes), "GB" (10**9 bytes)
    preset: str
    method: str
    kwargs: dict
    field: str
    note: str


_QLORA_G = dict(r=64, target_modules=LLAMA_LINEAR_NAMES, batch_size=1, seq_len=512,
                gradient_checkpointing=True)

PAPER_FIGURES = (
    PaperFigure("GPT-3 175B trainable params, r=4 on q,v", "LoRA Table 15", 18.8e6, "params", "gpt3-175b", "lora",
                dict(r=4, target_modules=QV), "trainable_params", "formula 2·96·12288·r·2"),
    PaperFigure("GPT-3 175B trainable params, r=8 on q,v", "LoRA Table 4", 37.7e6, "params", "gpt3-175b", "lora",
                dict(r=8, target_modules=QV), "trainable_params", "formula 2·96·12288·r·2"),
    PaperFigure("GPT-3 175B adapter checkpoint, r=4 on q,v", "LoRA §4.2", 35, "MB", "gpt3-175b", "lora",
                dict(r=4, target_modules=QV), "adapter_bytes", "paper: 'roughly 35MB' for 37.7 MB of fp16"),
    PaperFigure("GPT-3 175B VRAM, full fine-tuning with Adam", "LoRA §4.2", 1200, "GB", "gpt3-175b", "full",
                dict(batch_size=1, seq_len=2048), "total_bytes", "paper gives no breakdown or batch size"),
    PaperFigure("GPT-3 175B VRAM, full, Adam moments in 16 bit", "LoRA §4.2", 1200, "GB", "gpt3-175b", "full",
                dict(batch_size=1, seq_len=2048, optimizer_state_dtype=torch.bfloat16), "total_bytes",
                "8 bytes/param instead of 12: one guess at the paper's accounting"),
    PaperFigure("GPT-3 175B VRAM, LoRA r=4 on q,v", "LoRA §4.2", 350, "GB", "gpt3-175b", "lora",
                dict(r=4, target_modules=QV, batch_size=1, seq_len=2048), "total_bytes",
                "350 GB = 175e9 fp16 weights alone"),
    PaperFigure("LLaMA 65B, regular 16-bit fine-tuning", "QLoRA §1", 780, "GB", "llama-65b", "full",
                dict(batch_size=1, seq_len=512), "total_bytes", "'more than 780 GB'; ≈ 12 bytes/param"),
    PaperFigure("LLaMA 65B QLoRA, total", "QLoRA Fig. 6", 45.0, "GB", "llama-65b", "qlora", _QLORA_G,
                "total_bytes", "r=64 all linear, batch 1, seq 512; '<48GB' in the abstract"),
    PaperFigure("LLaMA 33B QLoRA, total", "QLoRA Fig. 6", 24.7, "GB", "llama-33b", "qlora", _QLORA_G,
                "total_bytes", "24.7 GB = 23.0 GiB: a '24 GB' card (24 GiB) with little to spare"),
    PaperFigure("LLaMA 13B QLoRA, total", "QLoRA Fig. 6", 11.3, "GB", "llama-13b", "qlora", _QLORA_G,
                "total_bytes", ""),
    PaperFigure("LLaMA 7B QLoRA, total", "QLoRA Fig. 6", 6.9, "GB", "llama-7b", "qlora", _QLORA_G,
                "total_bytes", ""),
    PaperFigure("LLaMA 7B, 4-bit base model", "QLoRA §2", 5048, "MB", "llama-7b", "qlora", _QLORA_G,
                "breakdown:frozen_weights", "the paper does not say what its 1.2 GB more holds"),
    PaperFigure("LLaMA 65B QLoRA, optimizer state", "QLoRA Fig. 6", 5760, "MB", "llama-65b", "qlora", _QLORA_G,
                "breakdown:optimizer_state", "fp32 Adam moments: 4x the 16-bit adapters"),
)

# The rest of the papers' memory figures: benchmarks/bench_estimate.py prints these after PAPER_FIGURES (the table
# notebook 05 shows, kept to one screen). QLoRA Fig. 6 (Appendix G): model, adapters and optimizer per size, in MB.
_FIG6 = (("llama-7b", "7B", 5046, 288, 1152), ("llama-13b", "13B", 8476, 450, 1800),
         ("llama-33b", "33B", 19302, 877.5, 3510), ("llama-65b", "65B", 37074, 1440, 5760))
MORE_PAPER_FIGURES = (
    PaperFigure("GPT-3 175B trainable params, r=1 on q,v", "LoRA Table 4", 4.7e6, "params", "gpt3-175b", "lora",
                dict(r=1, target_modules=QV), "trainable_params", "formula 2·96·12288·r·2"),
    PaperFigure("GPT-3 175B checkpoint, full fine-tuning", "LoRA §4.2", 350, "GB", "gpt3-175b", "full", {},
                "adapter_bytes", "every weight is the checkpoint"),
    *(PaperFigure(f"LLaMA {size} QLoRA, {what}", "QLoRA Fig. 6", value, "MB", preset, "qlora", _QLORA_G,
                  f"breakdown:{field}", "")
      for preset, size, model_mb, adapter_mb, optimizer_mb in _FIG6
      for what, value, field in (("4-bit model", model_mb, "frozen_weights"),
                                 ("adapters", adapter_mb, "trainable_weights"),
                                 ("optimizer state", optimizer_mb, "optimizer_state"))
      if (size, what) != ("65B", "optimizer state")),  # that one is in PAPER_FIGURES
)

_SCALE = {"params": 1, "MB": 10**6, "GB": 10**9}


def read_field(est, field: str) -> float:
    """Read `field` (see PaperFigure) from an Estimate."""
    if field.startswith("breakdown:"):
        return float(breakdown_dict(est.breakdown)[field.split(":", 1)[1]])
    return float(getattr(est, field))


COMPARISON_HEADER = ("claim", "source", "paper", "estimate", "estimate / paper", "note")


class ComparisonRow(NamedTuple):
    figure: PaperFigure
    estimated: float  # in figure.unit

    @property
    def ratio(self) -> float:
        """estimated / paper."""
        return self.estimated / self.figure.paper_value

    @property
    def cells(self) -> tuple[str, ...]:
        """The row as `COMPARISON_HEADER`'s columns, for `lora_lab.plots.paper_table`."""
        f = self.figure
        return (f.claim, f.source, _fmt(f.paper_value, f.unit), _fmt(self.estimated, f.unit), f"{self.ratio:.2f}",
                f.note)


def paper_comparison(estimate: Callable[..., object],
                     figures: Sequence[PaperFigure] = PAPER_FIGURES) -> list[ComparisonRow]:
    """Run `estimate(preset, method, **kwargs)` for each published figure and convert to the paper's unit."""
    rows = []
    for f in figures:
        value = read_field(estimate(f.preset, f.method, **f.kwargs), f.field)
        rows.append(ComparisonRow(f, value / _SCALE[f.unit]))
    return rows


def _fmt(value: float, unit: str) -> str:
    return f"{value / 1e6:,.1f} M" if unit == "params" else f"{value:,.1f} {unit}"
