"""What every figure builder shares: one pyplot-free figure constructor, one palette, PNG rendering."""

from __future__ import annotations

import io
import math

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..i18n import apply_font

# The kit's one palette: colour-blind-safe (Okabe-Ito). Categories (memory parts, merge targets, curves) take
# it in order through `palette_color`; an idea that recurs across notebooks has a fixed entry in `COLORS`.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#999999")
BLUE, ORANGE, GREEN, PURPLE, SKY, VERMILION, YELLOW, GRAY = PALETTE
COLORS = {"lora": BLUE, "full": "black", "nf4": BLUE, "fp4": ORANGE, "int4": GREEN, "paper": BLUE,
          "rslora": ORANGE, "raw": VERMILION, "post": PURPLE, "random": GRAY, "highlight": VERMILION}


def palette_color(i: int) -> str:
    """The i-th colour of `PALETTE`, wrapping around."""
    return PALETTE[i % len(PALETTE)]


# A stored figure must read on a projector: at least this many pixels wide (a 7-inch figure at 120 dpi is 840).
MIN_WIDTH_PX = 800
DPI = 120


def figure_dpi(width: float, dpi: int | None = None) -> int:
    """The dpi a figure `width` inches wide is drawn at: `dpi`, or `DPI` raised until it is `MIN_WIDTH_PX` wide."""
    if dpi is not None:
        return dpi
    return max(DPI, math.ceil(MIN_WIDTH_PX / width))


def new_figure(*, width: float = 7.0, height: float = 3.2, ncols: int = 1, nrows: int = 1, dpi: int | None = None):
    """A figure outside pyplot (so a notebook shows it only when asked) with an Agg canvas, at least
    `MIN_WIDTH_PX` wide (`figure_dpi`), in the font of the language in force (`lora_lab.i18n.apply_font`: Hangul
    in the Korean edition). Keyword arguments only, so a call reads the same wherever it is.

    Returns:
        (fig, axes): ``axes`` is one Axes for a 1x1 grid, else a flat list (row by row).
    """
    apply_font()
    fig = Figure(figsize=(width, height), dpi=figure_dpi(width, dpi), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    return fig, (axes[0] if len(axes) == 1 else axes)


def to_png(fig: Figure) -> bytes:
    """Render `fig` to PNG bytes (what an `ipywidgets.Image` shows)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
