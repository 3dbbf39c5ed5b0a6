"""``lora-lab``: the kit for students who ``pip install`` it instead of cloning the repository.

    lora-lab lab [--dir DIR] [jupyter args]       copy the notebooks into DIR, open JupyterLab there
    lora-lab notebook [--dir DIR] [jupyter args]  the same, in Jupyter Notebook 7
    lora-lab copy [--dir DIR] [--force]           only copy the notebooks

The wheel carries the notebooks (``lora_lab/notebooks/``, put there by the build) and the tiny model's weights,
so nothing else is downloaded. A notebook already in DIR is a student's work and is kept unless ``--force``.
In a clone the notebooks are read from the repository's ``notebooks/`` (an editable install), and ``./kit lab``
remains the way to start.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

DEFAULT_DIR = "lora_lab_notebooks"


def notebooks_source() -> Path:
    """Where the shipped notebooks are: inside the installed package, or a clone's ``notebooks/``."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "notebooks", here.parent / "notebooks"):
        if any(candidate.glob("*.ipynb")):
            return candidate
    raise FileNotFoundError("This lora_lab installation has no notebooks; reinstall it from the wheel or a clone.")


def copy_notebooks(dest: str | os.PathLike, force: bool = False) -> tuple[list[Path], list[Path]]:
    """Copy every shipped notebook (subfolders such as an edition in another language included) into ``dest``.

    Returns:
        ``(copied, kept)``: the files written, and the ones already there that were left as they were.
    """
    source, dest = notebooks_source(), Path(dest)
    copied, kept = [], []
    for notebook in sorted(source.rglob("*.ipynb")):
        if ".ipynb_checkpoints" in notebook.parts:
            continue
        target = dest / notebook.relative_to(source)
        if target.exists() and not force:
            kept.append(target)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(notebook, target)
        copied.append(target)
    return copied, kept


def root_flag(extra: list[str]) -> list[str]:
    """``["--allow-root"]`` when running as root and not already asked for (Jupyter refuses root otherwise)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or "--allow-root" in extra:
        return []
    print("lora-lab: running as root, so passing --allow-root: code in any notebook opened here can change the "
          "whole machine; use an ordinary user where you can", file=sys.stderr)
    return ["--allow-root"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lora-lab", description="Open lora_lab's notebooks in Jupyter.")
    parser.add_argument("command", choices=("lab", "notebook", "copy"))
    parser.add_argument("--dir", default=DEFAULT_DIR, help=f"working folder for the notebooks (default {DEFAULT_DIR})")
    parser.add_argument("--force", action="store_true", help="overwrite notebooks already in the folder")
    args, extra = parser.parse_known_args(argv)
    if args.command == "copy" and extra:
        parser.error(f"copy takes no Jupyter arguments, got {extra}")
    copied, kept = copy_notebooks(args.dir, args.force)
    print(f"lora-lab: {len(copied)} notebooks copied into {args.dir}"
          + (f", {len(kept)} already there kept (--force overwrites them)" if kept else ""))
    if args.command == "copy":
        return 0
    module = "jupyterlab" if args.command == "lab" else "notebook"
    command = [sys.executable, "-m", module, args.dir, *root_flag(extra), *extra]
    os.execv(sys.executable, command)
    return 0  # not reached: execv replaces this process


if __name__ == "__main__":
    sys.exit(main())
