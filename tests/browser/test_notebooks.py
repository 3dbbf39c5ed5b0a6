"""Every notebook in notebooks/, run in headless Chromium as a student would (see conftest.py),
in JupyterLab and in Notebook 7."""
import os
from pathlib import Path

import pytest

from lab_driver import LAB, NOTEBOOK7, exercise

pytestmark = pytest.mark.browser

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# Note: why 01 runs in JupyterLab only. Notebook 7 renders the same notebook, output and widget code as
# JupyterLab; what the second run checks is the front end's own plumbing (URL, kernel status, menus,
# dragging a slider, its log console). 01 is the slowest notebook there (~130 s of ~330 s on 2 busy cores),
# and its slider kinds are covered without it: IntSlider by test_driver.py, FloatLogSlider by 02,
# SelectionSlider by 02-06. LORA_LAB_ALL_FRONTENDS=1 runs it anyway.
JUPYTERLAB_ONLY = {"01_lora_from_scratch"}
ALL_FRONTENDS = os.environ.get("LORA_LAB_ALL_FRONTENDS") == "1"


def _params():
    for nb in NOTEBOOKS:
        yield pytest.param(nb, LAB, id=f"{nb.stem}-{LAB.name}")
        if ALL_FRONTENDS or nb.stem not in JUPYTERLAB_ONLY:
            yield pytest.param(nb, NOTEBOOK7, id=f"{nb.stem}-{NOTEBOOK7.name}")


PARAMS = list(_params()) or [
    pytest.param(None, LAB, id="no-notebooks",
                 marks=pytest.mark.skip(reason="notebooks/ has no .ipynb file yet"))]


@pytest.mark.parametrize(("notebook", "frontend"), PARAMS)
def test_notebook_runs_clean_and_sliders_redraw(notebook_tab, notebook):
    problems = exercise(notebook_tab, f"notebooks/{notebook.name}", notebook)
    assert not problems, f"{notebook.name}:\n" + "\n".join(problems)
