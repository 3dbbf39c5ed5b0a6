"""Keep every notebook openable in Colab: one install cell per notebook, and the README's "Open in Colab" links.

Usage:
    python scripts/colab.py                                   # write the cells and links from pyproject.toml
    python scripts/colab.py --repo https://github.com/ORG/REPO   # set the repository once, then write them
    python scripts/colab.py --check                           # exit 1 if a notebook or the README is out of step

The repository URL lives in one place, ``[project.urls] Repository`` in pyproject.toml; an instructor who forks
the kit sets it once with ``--repo``. Each notebook's first code cell (tagged ``kit-install``) then installs the
kit from that repository when ``lora_lab`` is not importable, as on Colab, where it keeps Colab's own torch (the
kit asks for any torch >= 2.4) and the notebooks pick the GPU by themselves. Where the kit is installed (``./kit``,
a wheel) the cell does nothing. ``LORA_LAB_WHEEL=path/to/lora_lab.whl`` installs a wheel instead of the
repository (``tests/test_colab.py`` runs a notebook that way in an environment without the kit).

The Korean edition (``notebooks/ko/``) gets the same cell in Korean, which also sets ``LORA_LAB_LANG=ko`` (figures,
widgets and tables in Korean: `lora_lab.i18n`); it is the one code cell in which a twin differs from its English
notebook (``scripts/twins.py``). README.md links the English notebooks, README.ko.md the Korean ones.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
README = ROOT / "README.md"
READMES = {"en": README, "ko": ROOT / "README.ko.md"}  # each links its edition's notebooks
NOTEBOOKS = ROOT / "notebooks"
TAG = "kit-install"
URL_LINE = re.compile(r'^Repository = "([^"]*)"$', re.M)
BEGIN, END = "<!-- colab-links: written by scripts/colab.py -->", "<!-- /colab-links -->"


def repository() -> str:
    match = URL_LINE.search(PYPROJECT.read_text(encoding="utf-8"))
    if not match:
        raise SystemExit("pyproject.toml has no `Repository = \"...\"` line under [project.urls].")
    return match.group(1)


def language_of(notebook: Path) -> str:
    """The edition a notebook belongs to: "ko" under notebooks/ko/, else "en"."""
    return "ko" if notebook.parent.name == "ko" else "en"


def install_cell(repo: str, language: str = "en") -> list[str]:
    """The first code cell's source lines, for the English or the Korean edition."""
    head = {
        "en": ["# On Colab, or any Python without lora_lab: install it. Where the kit is installed, this does nothing.",
               "import importlib.util, os"],
        "ko": ["# Colab처럼 lora_lab이 없는 환경이면 설치합니다. 키트가 설치된 곳에서는 설치하지 않습니다.",
               "import importlib.util, os",
               "os.environ[\"LORA_LAB_LANG\"] = \"ko\"  # 그림, 위젯, 표의 글자를 한국어로 (lora_lab.i18n)"],
    }[language]
    lines = [
        *head,
        "if importlib.util.find_spec(\"lora_lab\") is None:",
        f"    source = os.environ.get(\"LORA_LAB_WHEEL\", \"git+{repo}\")",
        "    %pip install -q {source}",
    ]
    return [line + "\n" for line in lines[:-1]] + [lines[-1]]


def colab_link(repo: str, notebook: Path) -> str:
    """``https://colab.research.google.com/github/ORG/REPO/blob/main/notebooks/NAME.ipynb``."""
    path = repo.removeprefix("https://").removeprefix("github.com/").rstrip("/")
    return f"https://colab.research.google.com/github/{path}/blob/main/{notebook.relative_to(ROOT).as_posix()}"


def notebooks() -> list[Path]:
    return sorted(p for p in NOTEBOOKS.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def with_install_cell(nb: dict, repo: str, language: str = "en") -> dict:
    """The notebook with its ``kit-install`` cell up to date (inserted after the title cell if missing)."""
    cell = {"cell_type": "code", "execution_count": None, "id": "kit-install",
            "metadata": {"tags": [TAG, "nbval-ignore-output"]}, "outputs": [], "source": install_cell(repo, language)}
    old = [c for c in nb["cells"] if TAG in c.get("metadata", {}).get("tags", [])]
    if old:
        cell["execution_count"] = old[0].get("execution_count")  # scripts/clean_notebooks.py numbers the cells
    cells = [c for c in nb["cells"] if TAG not in c.get("metadata", {}).get("tags", [])]
    first_code = next((i for i, c in enumerate(cells) if c["cell_type"] == "code"), len(cells))
    return {**nb, "cells": cells[:first_code] + [cell] + cells[first_code:]}


def readme_links(repo: str, language: str = "en") -> str:
    header, text = {"en": ("| notebook | Colab |", "Open in Colab"),
                    "ko": ("| 노트북 | Colab |", "Colab에서 열기")}[language]
    rows = [f"| [{p.stem}]({p.relative_to(ROOT).as_posix()}) | [{text}]({colab_link(repo, p)}) |"
            for p in notebooks() if language_of(p) == language]
    return "\n".join([BEGIN, header, "|---|---|", *rows, END])


def planned(repo: str) -> dict[Path, str]:
    """Every file this script writes, with the text it should have."""
    files = {}
    for path in notebooks():
        nb = with_install_cell(json.loads(path.read_text(encoding="utf-8")), repo, language_of(path))
        files[path] = json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"  # as Jupyter writes it
    for language, path in READMES.items():
        if language != "en" and not path.is_file():
            continue
        readme = path.read_text(encoding="utf-8")
        if BEGIN not in readme or END not in readme:
            raise SystemExit(f"{path.name} has no {BEGIN} ... {END} block to write the links into.")
        head, rest = readme.split(BEGIN, 1)
        files[path] = head + readme_links(repo, language) + rest.split(END, 1)[1]
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", help="the repository's URL, e.g. https://github.com/ORG/lora_lab")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything is out of step")
    args = parser.parse_args(argv)
    if args.repo:
        if not re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", args.repo.rstrip("/")):
            parser.error(f"--repo must look like https://github.com/ORG/REPO (Colab opens GitHub), got {args.repo!r}")
        text = PYPROJECT.read_text(encoding="utf-8")
        PYPROJECT.write_text(URL_LINE.sub(f'Repository = "{args.repo.rstrip("/")}"', text), encoding="utf-8")
    stale = [path for path, text in planned(repository()).items() if path.read_text(encoding="utf-8") != text]
    if args.check:
        for path in stale:
            print(f"out of step: {path.relative_to(ROOT)} (run python scripts/colab.py)")
        return 1 if stale else 0
    for path, text in planned(repository()).items():
        if path in stale:
            path.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
