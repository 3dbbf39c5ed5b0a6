"""Tests for lora_lab.plots.table: the closing "paper vs. measured here" table of every notebook."""

import pytest
from IPython.display import Markdown

from lora_lab.plots import markdown_table, paper_table


def test_paper_table_is_markdown_with_one_line_per_row():
    table = paper_table([("bits per NF4 weight", "4.127 (QLoRA §3)", f"{4.1275:.3f}"), ("rank", "1", 8)])
    assert isinstance(table, Markdown)
    assert table.data.splitlines() == ["|  | paper | measured here |", "|---|---|---|",
                                       "| bits per NF4 weight | 4.127 (QLoRA §3) | 4.128 |", "| rank | 1 | 8 |"]


def test_a_pipe_inside_a_cell_is_escaped_not_a_new_column():
    line = markdown_table([("output at init", "same", "max |Δlogits| = 0.0")]).splitlines()[-1]
    assert line == "| output at init | same | max \\|Δlogits\\| = 0.0 |"


def test_other_headers_set_the_columns():
    text = markdown_table([("a", "b")], header=("claim", "note"))
    assert text.splitlines()[:2] == ["| claim | note |", "|---|---|"]
    assert text.splitlines()[2] == "| a | b |"


def test_an_empty_cell_stays_a_cell():
    assert markdown_table([("a", "b", "")]).splitlines()[-1] == "| a | b |  |"


def test_a_row_with_the_wrong_number_of_cells_says_which():
    with pytest.raises(ValueError, match="row 1 has 2 cells but the header has 3"):
        markdown_table([("a", "b", "c"), ("a", "b")])
