"""Every notebook in notebooks/, run in headless Chromium as a student would (see conftest.py),
in JupyterLab and in Notebook 7."""
from pathlib import Path

import pytest

from lab_driver import LAB, NOTEBOOK7, exercise

pytestmark = pytest.mark.browser

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
PARAMS = [pytest.param(nb, id=nb.stem) for nb in NOTEBOOKS] or [
    pytest.param(None, id="no-notebooks",
                 marks=pytest.mark.skip(reason="notebooks/ has no .ipynb file yet"))]
FRONTENDS = [pytest.param(f, id=f.name) for f in (LAB, NOTEBOOK7)]


@pytest.mark.parametrize("frontend", FRONTENDS)
@pytest.mark.parametrize("notebook", PARAMS)
def test_notebook_runs_clean_and_sliders_redraw(notebook_tab, notebook):
    problems = exercise(notebook_tab, f"notebooks/{notebook.name}", notebook)
    assert not problems, f"{notebook.name}:\n" + "\n".join(problems)
