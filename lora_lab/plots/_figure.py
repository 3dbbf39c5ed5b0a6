"""Small helpers shared by the figure builders: a pyplot-free figure and the kit's colors."""

from __future__ import annotations

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# One color per idea, kept across notebooks (matplotlib's tab10 order).
COLORS = {"lora": "tab:blue", "full": "black", "nf4": "tab:blue", "fp4": "tab:orange", "int4": "tab:green",
          "paper": "tab:blue", "rslora": "tab:orange", "raw": "tab:red", "post": "tab:purple",
          "random": "tab:gray", "highlight": "tab:red"}


def new_figure(ncols: int = 1, nrows: int = 1, width: float = 7.0, height: float = 3.2, dpi: int = 80):
    """A figure outside pyplot (so a notebook shows it only when asked) with an Agg canvas.

    Returns:
        (fig, axes): ``axes`` is one Axes for a 1x1 grid, else a flat list.
    """
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel().tolist()
    return fig, (axes[0] if len(axes) == 1 else axes)
