"""The Korean edition in the browser: a Korean twin runs in JupyterLab as a student runs it, its sliders redraw,
and its widgets and figures are labelled in Korean (the twin's first cell sets ``LORA_LAB_LANG=ko``).

Only one twin, and only in JupyterLab: the twins' code is the English notebooks' (tests/test_twins.py), which
test_notebooks.py runs in both front ends; what this adds is the Korean setting reaching the kernel and the page.
On failure the Korean figure's screenshot is kept with the other artifacts (test-artifacts/browser/<test>/).
"""
import io
from pathlib import Path

import pytest
from PIL import Image

from lab_driver import E2E_CLASS, exercise

pytestmark = pytest.mark.browser

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "ko" / "01_lora_from_scratch.ipynb"
OUTPUT_AREA = "xpath=ancestor::div[contains(concat(' ', @class, ' '), ' jp-Cell-outputArea ')][1]"


def hangul(text: str) -> bool:
    return any("가" <= ch <= "힣" for ch in text)


@pytest.mark.skipif(not NOTEBOOK.is_file(), reason="notebooks/ko/01_lora_from_scratch.ipynb is not built yet")
def test_a_korean_notebook_runs_its_sliders_redraw_and_it_speaks_korean(notebook_tab):
    problems = exercise(notebook_tab, "notebooks/ko/01_lora_from_scratch.ipynb", NOTEBOOK)
    page = notebook_tab.page
    sliders = page.locator(f".widget-slider.{E2E_CLASS}")
    labels = [(text or "").strip() for text in sliders.locator(".widget-label").all_text_contents()]
    slider = sliders.nth(labels.index("랭크 r") if "랭크 r" in labels else 0)  # the label is set in the kernel
    figure = slider.locator(OUTPUT_AREA).locator("img.widget-image").first
    if figure.count():  # kept if anything below fails: the rank explorer, titled and labelled in Korean
        notebook_tab.extra_artifacts["korean-figure.png"] = figure.screenshot(animations="disabled")
    assert not problems, f"ko/{NOTEBOOK.name}:\n" + "\n".join(problems)
    assert hangul(page.locator(".jp-RenderedMarkdown h1").first.text_content() or "")
    assert "랭크 r" in labels, labels
    readouts = " ".join(slider.locator(OUTPUT_AREA).locator(".widget-html").all_text_contents())
    assert hangul(readouts), readouts  # the readout beside the figure: "A+B의 파라미터 ..."
    png = notebook_tab.extra_artifacts["korean-figure.png"]
    image = Image.open(io.BytesIO(png)).convert("L")
    assert image.width >= 800 and image.getextrema()[0] < 100  # a drawn figure, not an empty box
