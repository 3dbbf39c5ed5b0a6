"""Every notebook in notebooks/, run in headless Chromium as a student would (see conftest.py), in JupyterLab,
and those with sliders in Notebook 7 too."""
from pathlib import Path

import pytest

from lab_driver import E2E_CLASS, LAB, NOTEBOOK7, exercise

pytestmark = pytest.mark.browser

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def has_sliders(notebook: Path) -> bool:
    """Whether the notebook's stored outputs hold a slider marked for these tests (`lora_lab.widgets.e2e_slider`)."""
    return E2E_CLASS in notebook.read_text(encoding="utf-8")


def _params():
    # Every notebook runs in JupyterLab. Notebook 7 renders widgets through its own page, so it runs the notebooks
    # with sliders; one without any (09) would only repeat there what nbval and JupyterLab already check.
    for nb in NOTEBOOKS:
        for frontend in (LAB, NOTEBOOK7) if has_sliders(nb) else (LAB,):
            yield pytest.param(nb, frontend, id=f"{nb.stem}-{frontend.name}")


PARAMS = list(_params()) or [
    pytest.param(None, LAB, id="no-notebooks",
                 marks=pytest.mark.skip(reason="notebooks/ has no .ipynb file yet"))]


@pytest.mark.parametrize(("notebook", "frontend"), PARAMS)
def test_notebook_runs_clean_and_sliders_redraw(notebook_tab, notebook):
    problems = exercise(notebook_tab, f"notebooks/{notebook.name}", notebook)
    assert not problems, f"{notebook.name}:\n" + "\n".join(problems)
