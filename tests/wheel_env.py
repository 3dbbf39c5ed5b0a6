"""A wheel built from the tracked files, and new environments without the kit, for the install-path tests."""
from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def build_wheel(root: Path) -> Path:
    """Build the wheel from a copy of the tracked files (what a clone holds), not from this working tree."""
    copy = root / "clone"
    for name in filter(None, run(["git", "ls-files", "-z"], cwd=REPO).stdout.split("\0")):
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            (copy / name).write_bytes((REPO / name).read_bytes())
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(copy),
         "-w", str(root / "dist")])
    (wheel,) = (root / "dist").glob("lora_lab-*.whl")
    return wheel


def new_env(path: Path, with_pip: bool = False) -> Path:
    """A virtual environment without lora_lab whose third-party packages are this environment's; its python.

    They are reached through a ``.pth`` path line, whose own ``.pth`` files (this checkout's editable install
    among them) are not run; installing torch again would cost minutes and the network.
    """
    run([sys.executable, "-m", "venv", *([] if with_pip else ["--without-pip"]), str(path)])
    python = path / "bin" / "python"
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    (Path(purelib) / "shared_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    if with_pip:  # venv's own old setuptools would hide the newer one torch requires
        run([str(python), "-m", "pip", "uninstall", "-q", "-y", "setuptools"])
    missing = subprocess.run([str(python), "-c", "import lora_lab"], capture_output=True, cwd=path)
    assert missing.returncode != 0, "lora_lab was importable in a new environment before anything was installed"
    return python
