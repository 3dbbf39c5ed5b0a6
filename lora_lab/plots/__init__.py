"""Figure builders for the notebooks: pure functions from data to a matplotlib figure (or an update of one).

One module per notebook topic. Every function returns the figure (and, where a widget redraws it, the
artists it updates), so tests can check the data behind each figure. Every builder makes its figure with
`new_figure` and takes its colours from `PALETTE` (by role: `COLORS`); every notebook closes with `paper_table`.
"""

from ._figure import COLORS, PALETTE, new_figure, palette_color, to_png
from .table import markdown_table, paper_table

__all__ = ["COLORS", "PALETTE", "markdown_table", "new_figure", "palette_color", "paper_table", "to_png"]
