"""The browser checks themselves: a clean notebook passes, and each kind of failure is caught.

Each test writes a tiny notebook (an IntSlider redrawing a matplotlib bar chart) into the
server's root, so these run even before notebooks/ has any notebook. Each runs in JupyterLab and
in Notebook 7, where the slider is dragged and the log console is read from its panel.
"""
import json

import pytest

from lab_driver import E2E_CLASS, LAB, NOTEBOOK7, exercise

pytestmark = [pytest.mark.browser,
              pytest.mark.parametrize("frontend", [pytest.param(f, id=f.name) for f in (LAB, NOTEBOOK7)])]

SLIDER_CELL = f"""import ipywidgets as widgets
import matplotlib.pyplot as plt
from IPython.display import display
slider = widgets.IntSlider(value=3, min=1, max=8, description="r", continuous_update=False)
slider.add_class("{E2E_CLASS}")
out = widgets.Output()
def draw(r):
    with out:
        out.clear_output(wait=True)
        fig, ax = plt.subplots(figsize=(3, 2))
        ax.bar(range(r), range(1, r + 1))
        plt.show()
def on_change(change):
    {{callback}}
slider.observe(on_change, names="value")
draw(slider.value)
display(widgets.VBox([slider, out]))"""


def _write(server, name, callback="draw(change['new'])", last_cell="print('done')"):
    cells = ["%matplotlib inline", SLIDER_CELL.replace("{callback}", callback), last_cell]
    notebook = {
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "cells": [{"cell_type": "code", "id": f"c{i}", "metadata": {}, "execution_count": None,
                   "outputs": [], "source": src} for i, src in enumerate(cells)],
    }
    path = server.root / "selftest" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(notebook))
    return f"selftest/{name}", path


def test_clean_notebook_passes_and_slider_redraws(notebook_tab, lab_server):
    problems = exercise(notebook_tab, *_write(lab_server, "clean.ipynb"))
    assert problems == []
    (move,) = notebook_tab.slider_moves
    assert (move.readout_before, move.readout_after) == ("3", "6")  # 3 ArrowRight steps of 1
    assert move.linear_readout and move.value_text_after == "6"
    assert move.figure_changed


def test_raising_widget_callback_fails(notebook_tab, lab_server):
    rel, path = _write(lab_server, "callback_raises.ipynb",
                       callback="raise RuntimeError('callback broke')")
    problems = exercise(notebook_tab, rel, path)
    assert any("log console" in p for p in problems), problems
    assert "callback broke" in "\n".join(problems)


def test_raising_callback_inside_output_fails(notebook_tab, lab_server):
    # The ipywidgets pattern `with out:` shows the traceback inside the Output widget instead.
    rel, path = _write(lab_server, "output_raises.ipynb",
                       callback="with out:\n        raise RuntimeError('callback broke in Output')")
    problems = exercise(notebook_tab, rel, path)
    assert "callback broke in Output" in "\n".join(problems), problems


def test_cell_error_fails(notebook_tab, lab_server):
    rel, path = _write(lab_server, "cell_raises.ipynb", last_cell="1 / 0")
    problems = exercise(notebook_tab, rel, path)
    assert "ZeroDivisionError" in "\n".join(problems), problems
