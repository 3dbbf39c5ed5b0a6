"""Fixtures for the end-to-end browser tests: one JupyterLab server and one headless Chromium per
test session, one fresh tab per notebook. The same server also serves Notebook 7 (the `notebook`
package's server extension, at /tree and /notebooks/<path>); a test picks the front end by
parametrizing the `frontend` fixture with `lab_driver.LAB` (the default) or `lab_driver.NOTEBOOK7`.

Convention for notebook authors (the browser test relies on it):

* A slider the browser test should move is marked with ``lora_lab.widgets.e2e_slider`` (it adds the
  CSS class ``lora-lab-e2e``, `lab_driver.E2E_CLASS`)::

      r_slider = e2e_slider(widgets.IntSlider(value=4, min=1, max=64, description="r", continuous_update=False))

* Its figure is shown by the **same cell** that displays the slider, e.g. an ``Output`` in a
  ``VBox([slider, out])`` or ``interact``'s output. The test moves it a few steps (right, or
  left at the maximum; arrow keys in JupyterLab, a mouse drag in Notebook 7), waits for the
  kernel, and asserts that the figure(s) in that cell's output area look different (element
  screenshots) and that the slider's readout shows the handle's new value. Mark only sliders
  that redraw a figure (matplotlib inline PNG/SVG, ``widgets.Image`` or a canvas).
* Any notebook that shows a slider must mark at least one.
* A widget callback must not raise: an exception inside ``with out:`` shows as a traceback in
  the Output, one outside lands in JupyterLab's log console; the test fails on both.

The server runs from the kit's own environment (this interpreter), on a random free port on
127.0.0.1 with token auth, with Jupyter config/runtime/data/settings/workspace dirs in a temp dir
(nothing from the machine's Jupyter setup leaks in), on a *copy* of notebooks/ (running cells
never rewrites the committed files). It is stopped, with its whole process group, also when a
test fails. Screenshots and the server log of a failed test go to test-artifacts/browser/.

Chromium is Debian's ``/usr/bin/chromium`` (override with ``LORA_LAB_CHROMIUM``), driven by
Playwright; ``scripts/ensure_browser.sh`` installs it. Without it the tests skip with the reason,
except under CI (``CI`` set), where a missing browser is a failure.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "browser"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
    "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
    "--no-proxy-server",  # the server is on 127.0.0.1; ignore any http_proxy in the environment
]
# JupyterLab settings for a quiet, deterministic tab: no autosave (the copy is thrown away
# anyway), every cell rendered (no virtual scrolling, so every widget is in the DOM), no news.
LAB_SETTINGS = {
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "browser: end-to-end test in headless Chromium against a real JupyterLab "
                   "or Notebook 7 (deselect with -m 'not browser')")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)  # lets fixtures see whether the test failed


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # localhost: never via a proxy


@dataclass
class LabServer:
    url: str
    token: str
    root: Path
    log: Path

    def api(self, method: str, path: str):
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     headers={"Authorization": f"token {self.token}"})
        with _DIRECT.open(req, timeout=10) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def shutdown_sessions(self) -> None:
        """Shut down every kernel session, so notebooks run one at a time on 2 cores."""
        for session in self.api("GET", "/api/sessions"):
            self.api("DELETE", f"/api/sessions/{session['id']}")


def _chromium() -> str:
    path = os.environ.get("LORA_LAB_CHROMIUM", "/usr/bin/chromium")
    problem = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        problem = "the playwright package is not installed (pip install -e '.[test]')"
    if problem is None and not os.access(path, os.X_OK):
        problem = (f"Chromium not found at {path}: run scripts/ensure_browser.sh as root "
                   "(apt-get install chromium) or set LORA_LAB_CHROMIUM")
    if problem and os.environ.get("CI"):
        pytest.fail(f"browser tests must run in CI, but {problem}")
    if problem:
        pytest.skip(problem)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_settings(settings_dir: Path) -> None:
    for plugin, values in LAB_SETTINGS.items():
        ext, name = plugin.rsplit("/", 1)
        target = settings_dir / ext / f"{name}.jupyterlab-settings"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(values))


def _wait_until_up(server: LabServer, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {proc.returncode}:\n{server.log.read_text()[-3000:]}")
        try:
            server.api("GET", "/api/status")
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer in {timeout_s:.0f} s:\n{server.log.read_text()[-3000:]}")


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if pytest itself is killed (Linux), so the server still
    shuts its kernels down when no `finally` can run."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # the server and the kernels it started
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    return _chromium()


@pytest.fixture(scope="session")
def lab_server(chromium_path, tmp_path_factory):
    """A JupyterLab server from this interpreter's environment, serving a copy of notebooks/."""
    base = tmp_path_factory.mktemp("jupyter")
    root = base / "root"
    root.mkdir()
    if (REPO / "notebooks").is_dir():
        shutil.copytree(REPO / "notebooks", root / "notebooks",
                        ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    dirs = {name: base / name for name in ("config", "runtime", "data", "settings", "workspaces", "ipython")}
    for d in dirs.values():
        d.mkdir()
    _write_settings(dirs["settings"])
    # No announcements or update checks: nothing but localhost is contacted.
    (dirs["config"] / "jupyter_server_config.json").write_text(json.dumps(
        {"LabApp": {"news_url": None, "check_for_updates_class": "jupyterlab.NeverCheckForUpdate"}}))
    # No "is a rebuild needed?" check on every page load (it hashes all extensions, seconds on 2 cores).
    (dirs["config"] / "labconfig").mkdir()
    (dirs["config"] / "labconfig" / "page_config.json").write_text(
        json.dumps({"buildCheck": False, "buildAvailable": False}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "IPYTHON", "MPLBACKEND"))}
    env.update(
        JUPYTER_CONFIG_DIR=str(dirs["config"]), JUPYTER_RUNTIME_DIR=str(dirs["runtime"]),
        JUPYTER_DATA_DIR=str(dirs["data"]), JUPYTERLAB_SETTINGS_DIR=str(dirs["settings"]),
        JUPYTERLAB_WORKSPACES_DIR=str(dirs["workspaces"]), IPYTHONDIR=str(dirs["ipython"]),
        JUPYTER_PREFER_ENV_PATH="1", PYTHONUNBUFFERED="1",
    )
    token, port = os.urandom(16).hex(), _free_port()
    server = LabServer(f"http://127.0.0.1:{port}", token, root, base / "server.log")
    # `-m jupyterlab`, not `-m jupyter lab`: the latter runs the first `jupyter-lab` on PATH, which may
    # belong to another environment.
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser",
           "--ServerApp.open_browser=False", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", "--ServerApp.allow_root=True",
           "--ServerApp.terminals_enabled=False"]
    with open(server.log, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_die_with_parent)
    try:
        _wait_until_up(server, proc)
        yield server
    finally:
        try:
            server.shutdown_sessions()  # kernels run in their own sessions; end them through the server
        except OSError:
            pass
        _stop(proc)


@pytest.fixture(scope="session")
def browser_context(lab_server, chromium_path, tmp_path_factory):
    """One headless Chromium with a fresh profile."""
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def frontend():
    """The front end a tab drives; parametrize ``frontend`` to pick another."""
    from lab_driver import LAB

    return LAB


@pytest.fixture
def notebook_tab(request, browser_context, lab_server, frontend):
    """A fresh tab; on failure its screenshot, the slider shots and the server log are kept."""
    from lab_driver import NotebookTab

    page = browser_context.new_page()
    page.set_default_timeout(60_000)
    tab = NotebookTab(page, lab_server.url, lab_server.token, frontend)
    tab.slider_moves = []
    tab.extra_artifacts = {}  # file name -> bytes a test wants kept if it fails (test_korean.py's figure)
    try:
        yield tab
    finally:
        reports = [getattr(request.node, f"report_{when}", None) for when in ("setup", "call")]
        if any(r is not None and r.failed for r in reports):
            _save_artifacts(request.node.name, tab, lab_server)
        page.close()
        lab_server.shutdown_sessions()


def _save_artifacts(test_name: str, tab, server: LabServer) -> None:
    out = ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]+", "_", test_name)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    try:
        errors = tab.page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
        if errors.count():
            errors.first.scroll_into_view_if_needed(timeout=5_000)  # show the first error, not the end
        tab.page.screenshot(path=str(out / "page.png"))
    except Exception as exc:  # noqa: BLE001 - keep whatever else can be saved
        (out / "page-screenshot-failed.txt").write_text(repr(exc))
    for i, move in enumerate(tab.slider_moves):
        for when, shots in (("before", move.figures_before), ("after", move.figures_after)):
            for j, png in enumerate(shots):
                (out / f"slider{i}-{when}-figure{j}.png").write_bytes(png)
    for name, data in getattr(tab, "extra_artifacts", {}).items():
        (out / name).write_bytes(data)
    if server.log.exists():
        shutil.copy(server.log, out / "jupyter-server.log")
