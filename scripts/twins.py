"""Build the Korean edition's notebooks from the English ones: one code, two languages of prose.

Usage:
    python scripts/twins.py                 # write notebooks/ko/NN_name.ipynb for every translated notebook
    python scripts/twins.py --new NN_name   # start translations/ko/NN_name.md from the English Markdown cells
    python scripts/twins.py --accept NN_name  # after updating the Korean for changed English cells
    python scripts/twins.py --check         # change nothing; exit 1 if any twin is missing or out of step

A twin is the English notebook with each Markdown cell replaced, in order, by the matching cell of
``translations/ko/NN_name.md`` (cells separated by ``<!-- en: HASH -->`` lines, HASH the first 12 hex digits of the
SHA-256 of the English cell it translates). Its code cells are the English ones byte for byte, except the first, the
Colab install cell, which `scripts/colab.py` writes for the Korean edition: it also sets ``LORA_LAB_LANG=ko``, so
`lora_lab.plots` and `lora_lab.widgets` label figures, widgets and tables in Korean (`lora_lab.i18n`).

When the English notebook changes:
- its code: the twin is rebuilt with empty outputs; execute and clean it as any notebook (CONTRIBUTING.md);
- a Markdown cell: the build stops and names the Korean cell translated from the old text; update the Korean,
  then ``--accept`` records the new English cell's hash;
- a Markdown cell added or removed: the build stops; add or remove the Korean cell (``--new`` into another file
  shows the English cells with their hashes).
``tests/test_twins.py`` fails until the twins are in step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import colab  # noqa: E402

NOTEBOOKS = ROOT / "notebooks"
LANGUAGE = "ko"
TWINS = NOTEBOOKS / LANGUAGE
SOURCES = ROOT / "translations" / LANGUAGE
MARK = re.compile(r"^<!-- en: ([0-9a-f]{12}) -->\n", re.M)


def english_notebooks() -> list[Path]:
    return sorted(NOTEBOOKS.glob("[0-9]*.ipynb"))


def cell_hash(cell: dict) -> str:
    return hashlib.sha256("".join(cell["source"]).encode("utf-8")).hexdigest()[:12]


def source_lines(text: str) -> list[str]:
    """A cell's text as Jupyter stores it: lines with their newlines, the last without."""
    lines = text.splitlines(keepends=True)
    if lines:
        lines[-1] = lines[-1].rstrip("\n")
    return lines


def read_prose(path: Path) -> list[tuple[str, str]]:
    """(English hash, Korean text) for each cell of a translation file."""
    text = path.read_text(encoding="utf-8")
    parts = MARK.split(text)
    if parts[0].strip():
        raise SystemExit(f"{path.relative_to(ROOT)}: text before the first <!-- en: HASH --> line.")
    return [(parts[i], parts[i + 1].strip("\n")) for i in range(1, len(parts), 2)]


def write_prose(path: Path, cells: list[tuple[str, str]]) -> None:
    path.write_text("".join(f"<!-- en: {h} -->\n{text}\n\n" for h, text in cells).rstrip("\n") + "\n",
                    encoding="utf-8")


class OutOfStep(Exception):
    pass


def build(english: Path, old_twin: dict | None) -> dict:
    """The twin of `english`: its cells with the Korean Markdown; the old twin's outputs when the code is the same."""
    nb = json.loads(english.read_text(encoding="utf-8"))
    prose = read_prose(SOURCES / f"{english.stem}.md")
    markdown = [c for c in nb["cells"] if c["cell_type"] == "markdown"]
    where = f"translations/{LANGUAGE}/{english.stem}.md"
    if len(prose) != len(markdown):
        raise OutOfStep(f"{where} has {len(prose)} cells, {english.name} has {len(markdown)} Markdown cells; add or "
                        "remove Korean cells to match (python scripts/twins.py --new NAME shows the English ones).")
    stale = [i for i, ((h, _), cell) in enumerate(zip(prose, markdown)) if h != cell_hash(cell)]
    if stale:
        raise OutOfStep(f"{where}: Korean cells {stale} (0-based) were translated from older English cells; update "
                        f"them, then run python scripts/twins.py --accept {english.stem}.")
    korean = iter(prose)
    cells = []
    for cell in nb["cells"]:
        cell = json.loads(json.dumps(cell))
        if cell["cell_type"] == "markdown":
            cell["source"] = source_lines(next(korean)[1])
        else:
            cell["outputs"], cell["execution_count"] = [], None
        cells.append(cell)
    twin = colab.with_install_cell({**nb, "cells": cells}, colab.repository(), LANGUAGE)
    if old_twin is not None and code_sources(old_twin) == code_sources(twin):
        for new, old in zip(twin["cells"], old_twin["cells"]):
            if new["cell_type"] == "code":  # same code: the outputs of the twin's own run still hold
                new["outputs"], new["execution_count"] = old["outputs"], old["execution_count"]
        twin["metadata"] = old_twin["metadata"]
    return twin


def code_sources(nb: dict) -> list[str]:
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def planned() -> tuple[dict[Path, str], list[str]]:
    """Every twin's text, and the problems that stop a build."""
    files, problems = {}, []
    for english in english_notebooks():
        if not (SOURCES / f"{english.stem}.md").is_file():
            problems.append(f"{english.name} has no Korean prose: python scripts/twins.py --new {english.stem}, then "
                            f"translate translations/{LANGUAGE}/{english.stem}.md")
            continue
        path = TWINS / english.name
        old = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        try:
            files[path] = json.dumps(build(english, old), indent=1, sort_keys=True, ensure_ascii=False) + "\n"
        except OutOfStep as err:
            problems.append(str(err))
    for twin in sorted(TWINS.glob("*.ipynb")):
        if not (NOTEBOOKS / twin.name).is_file():
            problems.append(f"{twin.relative_to(ROOT)} has no English notebook: remove it or restore the English one")
    return files, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a twin is out of step")
    parser.add_argument("--new", metavar="NAME", help="write translations/ko/NAME.md from the English cells")
    parser.add_argument("--accept", metavar="NAME", help="record the English cells' hashes in translations/ko/NAME.md")
    args = parser.parse_args(argv)
    if args.new or args.accept:
        name = args.new or args.accept
        english = json.loads((NOTEBOOKS / f"{name}.ipynb").read_text(encoding="utf-8"))
        markdown = [c for c in english["cells"] if c["cell_type"] == "markdown"]
        path = SOURCES / f"{name}.md"
        if args.new:
            if path.exists():
                parser.error(f"{path.relative_to(ROOT)} exists; edit it, or --accept after updating it")
            write_prose(path, [(cell_hash(c), "".join(c["source"])) for c in markdown])
        else:
            prose = read_prose(path)
            if len(prose) != len(markdown):
                parser.error(f"{path.relative_to(ROOT)} has {len(prose)} cells for {len(markdown)} English ones")
            write_prose(path, [(cell_hash(c), text) for c, (_, text) in zip(markdown, prose)])
        return 0
    files, problems = planned()
    stale = [p for p, text in files.items() if not p.is_file() or p.read_text(encoding="utf-8") != text]
    if args.check:
        for line in problems + [f"out of step: {p.relative_to(ROOT)} (run python scripts/twins.py)" for p in stale]:
            print(line)
        return 1 if problems or stale else 0
    TWINS.mkdir(exist_ok=True)
    for path in stale:
        path.write_text(files[path], encoding="utf-8")
        executed = any(c.get("outputs") for c in json.loads(files[path])["cells"])
        print(f"wrote {path.relative_to(ROOT)}" + ("" if executed else " (new code: execute and clean it)"))
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
