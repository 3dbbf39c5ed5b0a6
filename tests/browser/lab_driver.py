"""Drive one notebook in a real JupyterLab or Notebook 7 tab the way a student would.

`NotebookTab` opens a notebook, runs Run > Run All Cells from the menu bar, waits for the kernel,
collects every problem a student would see (tracebacks, cells that never ran, widgets that did not
render, errors in the log console) and moves marked sliders. It only reads the page; the tests in
this folder decide what to assert.

The DOM names used here are JupyterLab 4's and ipywidgets 8's (noUiSlider handles). Notebook 7 is
built from the same components, so cells, prompts, outputs, menus and widgets have the same names;
what differs is collected in a `Frontend` (see `LAB` and `NOTEBOOK7`).
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from lora_lab.widgets import E2E_CLASS  # the CSS class `e2e_slider` adds to the sliders the browser test moves

KEY_PRESSES = 3  # how many steps a slider is moved (arrow-key presses, or the same distance dragged)
NOTEBOOK_TIMEOUT_S = 600  # Run All on the slowest notebook, on 2 busy cores
FIGURE_TIMEOUT_S = 120  # one slider step may retrain a tiny model

_FIGURES = ".jp-RenderedImage img, .jp-RenderedSVG svg, img.widget-image, canvas"


@dataclass(frozen=True)
class Frontend:
    """What differs between the front ends a notebook is driven in.

    Attributes:
        name: short name, used in test ids.
        url: the notebook's URL path, with ``{path}`` for its path under the server root.
        kernel_status_js: a JavaScript expression giving the kernel status text shown on the page.
        idle: a regular expression (Python and JavaScript alike) matching an idle status.
        slider_keys: whether a focused slider handle gets the arrow keys. Notebook 7 starts its
            application without ``bubblingKeydown``, so its shortcut handler sees every keydown first
            (capture phase) and, in command mode, ArrowRight/Left on anything focused in the notebook
            runs a heading-navigation command; the slider never moves. There the handle is dragged.
        log_counter: whether the status bar counts log-console messages (JupyterLab). Without one
            (Notebook 7) the tab opens View > Show Log Console before running and reads it.
    """

    name: str
    url: str
    kernel_status_js: str
    idle: str
    slider_keys: bool
    log_counter: bool


LAB = Frontend(
    "lab", "/lab/tree/{path}?reset",  # reset: a fresh workspace, not the last test's layout
    """document.querySelector('.jp-StatusBar-TextItem[title^="Change kernel"]')?.textContent.trim()""",
    r" Idle$", slider_keys=True, log_counter=True)
NOTEBOOK7 = Frontend(
    "notebook7", "/notebooks/{path}",
    "document.querySelector('.jp-Notebook-ExecutionIndicator')?.dataset.status",  # toolbar circle
    r"^idle$", slider_keys=False, log_counter=False)

# True once Run All has finished: kernel idle, no queued cell ([*]), and either the last code
# cell has an execution count or an error stopped the run.
_RUN_FINISHED_JS = """() => {
  const prompts = [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]
      .map(e => e.textContent.trim());
  const idle = new RegExp(%s).test((%s) || '');
  const error = [...document.querySelectorAll(
      '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')]
      .some(e => /Traceback|Error/.test(e.textContent));
  const last = prompts.length ? prompts[prompts.length - 1] : '[0]:';
  return idle && !prompts.some(p => p.includes('*')) && (/^\\[\\d+\\]:$/.test(last) || error);
}"""

# Widget roots rendered directly in a cell's output area (not those nested in an Output widget).
_WIDGET_OUTPUTS_JS = """() => [...document.querySelectorAll(
    '.jp-Cell-outputArea > .jp-OutputArea-child > .jp-OutputArea-output')]
  .filter(o => o.classList.contains('jupyter-widgets') || o.querySelector(':scope > .jupyter-widgets'))
  .map(o => o.textContent.trim().slice(0, 200))"""


@dataclass
class SliderMove:
    """What happened when one marked slider was moved."""

    label: str
    readout_before: str
    readout_after: str
    value_text_after: str
    linear_readout: bool  # the readout showed the handle's value before the move (Int/FloatSlider)
    figure_changed: bool
    figures_before: list[bytes] = field(repr=False, default_factory=list)
    figures_after: list[bytes] = field(repr=False, default_factory=list)


def widget_outputs_in_file(path: Path) -> int:
    """Number of widget-view outputs saved in a notebook file (what should render again)."""
    cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
    return sum(
        "application/vnd.jupyter.widget-view+json" in out.get("data", {})
        for cell in cells if cell.get("cell_type") == "code"
        for out in cell.get("outputs", [])
    )


class NotebookTab:
    """One browser tab of JupyterLab (or Notebook 7) showing one notebook.

    Args:
        page: a Playwright `Page` (sync API).
        base_url: the server's URL, e.g. ``http://127.0.0.1:8888``.
        token: the server's token (sent in the first URL; the server answers with a login cookie).
        frontend: `LAB` or `NOTEBOOK7`.
    """

    def __init__(self, page, base_url: str, token: str = "", frontend: Frontend = LAB):
        self.page = page
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.frontend = frontend
        self.slider_moves: list[SliderMove] = []  # kept for the failure artifacts

    # -- opening and running ------------------------------------------------------------------

    def open(self, rel_path: str, timeout_s: float = 120) -> None:
        """Open ``rel_path`` (relative to the server root) with a fresh workspace; wait for the kernel."""
        url = self.base_url + self.frontend.url.format(path=rel_path)
        if self.token:
            url += ("&" if "?" in url else "?") + f"token={self.token}"
        self.page.goto(url, wait_until="domcontentloaded")
        self.page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=timeout_s * 1000)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._accept_kernel_dialog()
            if self.is_idle():
                if not self.frontend.log_counter:
                    self._menu("View", "Show Log Console")  # no counter: keep the console in view
                return
            time.sleep(0.25)
        raise TimeoutError(f"kernel for {rel_path} not idle after {timeout_s:.0f} s: "
                           f"{self.kernel_status()!r}")

    def is_idle(self) -> bool:
        return re.search(self.frontend.idle, self.kernel_status()) is not None

    def kernel_status(self) -> str:
        return self.page.evaluate(f"() => ({self.frontend.kernel_status_js}) || ''").strip()

    def _accept_kernel_dialog(self) -> None:
        # A notebook without kernelspec metadata asks which kernel to use; take the default.
        accept = self.page.locator(".jp-Dialog .jp-Dialog-button.jp-mod-accept")
        if accept.count():
            accept.first.click()

    def run_all(self, timeout_s: float = NOTEBOOK_TIMEOUT_S) -> None:
        """Run > Run All Cells from the menu bar, then wait until the run has finished."""
        # Run All acts on the notebook that has focus, as for a person clicking into it first.
        self.page.locator(".jp-Notebook .jp-Cell .jp-InputPrompt").first.click()
        self._menu("Run", "Run All Cells")
        finished = _RUN_FINISHED_JS % (json.dumps(self.frontend.idle), self.frontend.kernel_status_js)
        self.page.wait_for_function(finished, timeout=timeout_s * 1000, polling=250)

    def _menu(self, menu: str, item: str) -> None:
        """Click ``menu`` in the menu bar, then ``item`` (the same Lumino menus in both front ends)."""
        self.page.locator(".lm-MenuBar-item", has_text=re.compile(f"^{re.escape(menu)}$")).click()
        label = self.page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{re.escape(item)}$"))
        self.page.locator(".lm-Menu-item", has=label).click()

    # -- what a student would see ---------------------------------------------------------------

    def problems(self) -> list[str]:
        """Every visible sign that something went wrong, as readable strings (empty when clean)."""
        found = [f"error output:\n{text}" for text in self.error_outputs()]
        skipped = self.unexecuted_cells()
        if skipped:
            found.append(f"{len(skipped)} code cell(s) never ran: number(s) {[i for i, _ in skipped]}")
        found += [f"log console: {text}" for text in self.log_console_errors()]
        return found

    def error_outputs(self) -> list[str]:
        """Texts of stderr / error outputs that carry a traceback, anywhere (widget Outputs included)."""
        texts = self.page.eval_on_selector_all(
            '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]',
            "els => els.map(e => e.textContent)")
        # Error outputs and stream stderr render alike; an error names its exception at a line start
        # (IPython's short form for SyntaxError has no "Traceback"), a warning names its file first.
        return [t.strip()[-2000:] for t in texts
                if re.search(r"Traceback|^\s*\w*(?:Error|Exception)\b", t, flags=re.M)]

    def unexecuted_cells(self) -> list[tuple[int, str]]:
        prompts = self.page.eval_on_selector_all(
            ".jp-CodeCell .jp-InputPrompt", "els => els.map(e => e.textContent.trim())")
        return [(i, p) for i, p in enumerate(prompts, 1) if not re.fullmatch(r"\[\d+\]:", p)]

    def log_console_errors(self) -> list[str]:
        """Messages in the log console (outputs no cell owns, e.g. a raising widget callback).
        JupyterLab's status-bar counter and the console's default filter show only entries at
        warning level or above."""
        if not self.frontend.log_counter:  # Notebook 7: the console was opened by `open`
            texts = self._log_console_texts()
            return [f"{len(texts)} message(s)"] + texts if texts else []
        item = self.page.locator(".jp-LogConsoleStatusItem")
        if not item.count() or "lm-mod-hidden" in (item.first.get_attribute("class") or ""):
            return []
        count = (item.first.text_content() or "").strip()
        if not count or count == "0":
            return []
        item.first.click()  # opens the log console panel, as a person would to see what happened
        try:
            self.page.wait_for_selector(".jp-LogConsolePanel .jp-OutputArea-output", timeout=10_000)
            texts = self._log_console_texts()
        except Exception:  # noqa: BLE001 - the count alone is still a failure worth reporting
            texts = []
        return [f"{count} message(s)"] + texts

    def _log_console_texts(self) -> list[str]:
        texts = self.page.eval_on_selector_all(
            ".jp-LogConsolePanel .jp-OutputArea-output", "els => els.map(e => e.textContent)")
        return [t.strip()[-2000:] for t in texts if t.strip()]

    def widget_problems(self, expected: int, timeout_s: float = 30) -> list[str]:
        """Widgets that did not render: placeholders left, or fewer widget outputs than expected."""
        deadline = time.monotonic() + timeout_s
        while True:
            rendered = self.page.evaluate(_WIDGET_OUTPUTS_JS)
            bad = [t for t in rendered if re.match(r"Error displaying widget|Loading widget", t)]
            if not bad and len(rendered) >= expected or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        found = [f"widget did not render: {t!r}" for t in bad]
        if len(rendered) < expected:
            found.append(f"{len(rendered)} widget outputs rendered, the notebook file has {expected}")
        return found

    def widget_count(self) -> int:
        return self.page.locator(".jupyter-widgets").count()

    def slider_count(self) -> int:
        return self.page.locator(".widget-slider").count()

    # -- sliders --------------------------------------------------------------------------------

    def marked_sliders(self):
        return self.page.locator(f".widget-slider.{E2E_CLASS}")

    def move_slider(self, index: int, timeout_s: float = FIGURE_TIMEOUT_S) -> SliderMove:
        """Move marked slider ``index`` (`_nudge`); wait for the figure in its cell to change.

        Moves right unless the handle is at its maximum. Stops waiting early when an error shows
        up (a raising callback), so `problems()` can report it.
        """
        slider = self.marked_sliders().nth(index)
        slider.scroll_into_view_if_needed()
        handle = slider.locator(".noUi-handle").first
        readout = slider.locator(".widget-readout").first
        label = (slider.locator(".widget-label").first.text_content() or "").strip()
        before = readout.text_content().strip()
        linear = readout_matches(before, handle.get_attribute("aria-valuetext") or "")
        figures = slider.locator(
            "xpath=ancestor::div[contains(concat(' ', @class, ' '), ' jp-Cell-outputArea ')][1]"
        ).locator(_FIGURES)
        shots_before = _screenshots(figures)
        self._nudge(slider, handle)
        changed, shots_after = False, shots_before
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if self.error_outputs() or self.log_console_count():
                break  # a raising callback: stop waiting, problems() reports it
            if not self.is_idle():
                continue
            shots_after = _screenshots(figures)
            changed = bool(shots_before) and shots_after != shots_before
            if changed:
                time.sleep(1.0)  # the later key presses may still be on their way to the kernel
                if self.is_idle():
                    shots_after = _screenshots(figures)
                    break
        return SliderMove(label, before, readout.text_content().strip(),
                          handle.get_attribute("aria-valuetext") or "", linear, changed,
                          shots_before, shots_after)

    def _nudge(self, slider, handle) -> None:
        """Move the handle KEY_PRESSES steps right (left at the maximum): arrow keys where the
        front end lets the handle have them, else a mouse drag to where those steps would land
        (in the handle's own units: the value, a FloatLogSlider's exponent, an option's index)."""
        low, high, now = (float(handle.get_attribute(f"aria-value{a}")) for a in ("min", "max", "now"))
        at_max = now >= high
        if self.frontend.slider_keys:
            handle.focus()
            for _ in range(KEY_PRESSES):
                self.page.keyboard.press("ArrowLeft" if at_max else "ArrowRight")
            return
        target = max(now - KEY_PRESSES, low) if at_max else min(now + KEY_PRESSES, high)
        track, box = slider.locator(".noUi-base").first.bounding_box(), handle.bounding_box()
        y = box["y"] + box["height"] / 2
        self.page.mouse.move(box["x"] + box["width"] / 2, y)
        self.page.mouse.down()
        self.page.mouse.move(track["x"] + (target - low) / (high - low) * track["width"], y, steps=8)
        self.page.mouse.up()

    def log_console_count(self) -> int:
        if not self.frontend.log_counter:
            return len(self._log_console_texts())
        item = self.page.locator(".jp-LogConsoleStatusItem")
        if not item.count() or "lm-mod-hidden" in (item.first.get_attribute("class") or ""):
            return 0
        text = (item.first.text_content() or "").strip()
        return int(text) if text.isdigit() else 0


def _screenshots(figures) -> list[bytes]:
    shots = []
    for i in range(figures.count()):
        figure = figures.nth(i)
        if figure.is_visible():
            shots.append(figure.screenshot(animations="disabled"))
    return shots


def readout_matches(readout: str, value_text: str) -> bool:
    """Does the slider's readout show the handle's value, to the readout's own precision?

    The handle (noUiSlider) holds the value itself only for IntSlider and FloatSlider; a
    FloatLogSlider's holds the exponent and a SelectionSlider's the option's index. So a move is
    checked this way only when the readout matched before it (`SliderMove.linear_readout`).
    The tolerance is half a unit in the readout's last printed digit, since the readout is rounded.
    """
    try:
        shown, value = float(readout), float(value_text)
    except ValueError:
        return False
    decimals = len(readout.split(".")[1]) if "." in readout else 0
    return abs(shown - value) <= 0.5 * 10 ** -decimals + 1e-12


def exercise(tab: NotebookTab, rel_path: str, saved_file: Path) -> list[str]:
    """Open, Run All, check outputs and widgets, move every marked slider; return the problems.

    Args:
        tab: a fresh `NotebookTab`.
        rel_path: the notebook's path relative to the server root.
        saved_file: the notebook file as committed (its widget outputs are the expected count).

    Returns:
        Readable descriptions of everything a student would have seen go wrong; empty when clean.
    """
    tab.open(rel_path)
    tab.run_all()
    problems = tab.problems() + tab.widget_problems(widget_outputs_in_file(saved_file))
    if problems:
        return problems  # sliders on a broken run would only add noise
    marked = tab.marked_sliders().count()
    if tab.slider_count() and not marked:
        return [f"{tab.slider_count()} slider(s) shown but none has the class {E2E_CLASS!r}; "
                f'mark the one(s) that redraw a figure with lora_lab.widgets.e2e_slider(slider)']
    for i in range(marked):
        move = tab.move_slider(i)
        tab.slider_moves.append(move)
        name = f"slider {i} ({move.label or 'no label'})"
        problems += tab.problems()
        if problems:
            return problems
        if move.readout_after == move.readout_before:
            problems.append(f"{name}: readout stayed {move.readout_before!r} after the arrow keys")
        elif move.linear_readout and not readout_matches(move.readout_after, move.value_text_after):
            problems.append(f"{name}: readout {move.readout_after!r} but the handle is at "
                            f"{move.value_text_after!r}")
        if not move.figures_before:
            problems.append(f"{name}: no figure (image, SVG or canvas) in the cell that shows it")
        elif not move.figure_changed:
            problems.append(f"{name}: figure unchanged {FIGURE_TIMEOUT_S} s after "
                            f"{move.readout_before!r} -> {move.readout_after!r}")
    return problems
