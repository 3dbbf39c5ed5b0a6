"""Every notebook in notebooks/, run in headless Chromium as a student would (see conftest.py),
in JupyterLab and in Notebook 7."""
from pathlib import Path

import pytest

from lab_driver import LAB, NOTEBOOK7, exercise

pytestmark = pytest.mark.browser

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def _params():
    for nb in NOTEBOOKS:
        for frontend in (LAB, NOTEBOOK7):
            yield pytest.param(nb, frontend, id=f"{nb.stem}-{frontend.name}")


PARAMS = list(_params()) or [
    pytest.param(None, LAB, id="no-notebooks",
                 marks=pytest.mark.skip(reason="notebooks/ has no .ipynb file yet"))]


@pytest.mark.parametrize(("notebook", "frontend"), PARAMS)
def test_notebook_runs_clean_and_sliders_redraw(notebook_tab, notebook):
    problems = exercise(notebook_tab, f"notebooks/{notebook.name}", notebook)
    assert not problems, f"{notebook.name}:\n" + "\n".join(problems)
