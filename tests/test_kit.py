"""The README's first command, run as written in a fresh copy of the repository, serves JupyterLab.

`.ci/run` proves the second Quick start command by running it; this proves the first the same way. The copy
gets its own `.venv` (pip's cache makes that about a minute), so nothing from this checkout's environment
can hide a missing install step. It runs as whoever runs the tests: as root (containers, cloud VMs, CI)
`./kit lab` must pass `--allow-root` and say why, or JupyterLab exits at once.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
URL = re.compile(r"http://(?:127\.0\.0\.1|localhost):\d+/lab\?token=\w+")
STARTUP_S = 900  # a first run creates .venv and installs torch, JupyterLab and the rest


def _quick_start_commands() -> list[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def _fresh_copy(dest: Path) -> Path:
    """The tracked files as they are in this checkout (a clone, plus any edits not yet committed)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True).stdout
    for name in filter(None, files.decode().split("\0")):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def _read_until_url(proc: subprocess.Popen, lines: list[str]) -> None:
    for line in proc.stdout:
        lines.append(line)
        if URL.search(line):
            return


def test_readme_first_command_serves_jupyterlab_in_a_fresh_copy(tmp_path):
    first = _quick_start_commands()[0]
    assert first == "./kit lab", f"the README's first Quick start command is now {first!r}; update this test"
    repo = _fresh_copy(tmp_path / "lora_lab")
    home = tmp_path / "jupyter"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "VIRTUAL_ENV", "PYTHON"))}
    # BROWSER=true: the server's "open a browser" finds a no-op instead of launching one on this machine.
    env.update(BROWSER="true", JUPYTER_CONFIG_DIR=str(home / "config"), JUPYTER_DATA_DIR=str(home / "data"),
               JUPYTER_RUNTIME_DIR=str(home / "runtime"))
    proc = subprocess.Popen(first.split(), cwd=repo, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=_read_until_url, args=(proc, lines), daemon=True)
    reader.start()
    started = time.monotonic()
    try:
        reader.join(STARTUP_S)
        output = "".join(lines)
        assert any(URL.search(line) for line in lines), (
            f"`{first}` printed no JupyterLab URL within {time.monotonic() - started:.0f} s "
            f"(exit code {proc.poll()}):\n{output[-4000:]}")
        assert proc.poll() is None, f"`{first}` printed its URL and then exited:\n{output[-4000:]}"
        if os.geteuid() == 0:
            assert "--allow-root" in output, "as root, ./kit lab should say that it passes --allow-root"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
