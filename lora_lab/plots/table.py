"""The closing "paper vs. measured here" table every notebook ends with, as Markdown."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from IPython.display import Markdown

from ..i18n import tr

PAPER_HEADER = ("", "paper", "measured here")


def markdown_table(rows: Iterable[Sequence[object]], header: Sequence[str] = PAPER_HEADER) -> str:
    """A Markdown table, one line per row; every row has one cell per `header` entry.

    Cells are written with `str` (format numbers before passing them, so a notebook controls its digits); a ``|``
    inside a cell is escaped, so it shows as text instead of splitting the cell. The header and each row's first
    cell (what is compared) are in the language in force (`lora_lab.i18n.tr`); the other cells are as given.

    Raises:
        ValueError: a row has a different number of cells than `header`.
    """
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [line(tr(h) if h else h for h in header), "|" + "---|" * len(header)]
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"row {i} has {len(row)} cells but the header has {len(header)}: {row!r}; give every "
                             f"row one cell per column {tuple(header)}.")
        lines.append(line([tr(row[0]) if isinstance(row[0], str) and row[0] else row[0], *row[1:]]))
    return "\n".join(lines)


def paper_table(rows: Iterable[Sequence[object]], header: Sequence[str] = PAPER_HEADER) -> Markdown:
    """The closing table of a notebook: rows of (what, paper, here), shown as Markdown.

    Args:
        rows: one tuple per claim, e.g. ``("bits per NF4 weight", "4.127 (QLoRA §3)", f"{bits:.3f}")``.
        header: the column titles; a table with other columns (e.g. notebook 05's six) passes its own.

    Returns:
        An ``IPython.display.Markdown`` (the last expression of a cell displays it); ``.data`` is the text.
    """
    return Markdown(markdown_table(rows, header))
