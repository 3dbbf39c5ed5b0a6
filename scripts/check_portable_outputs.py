"""Which printed numbers in the notebooks could round differently on another CPU?

torch picks vector kernels by CPU (scalar, AVX2, AVX-512, ARM's), so a trained model's numbers differ in their
last bits between machines. nbval compares every stored output, so a number printed to more digits than hold
from one CPU to another fails somebody's `./kit test`. `./kit test` checks two levels; this script checks all the
x86 levels and, more usefully, says how close each number came to flipping:

1. copies each notebook with every format spec widened by three digits (``:.3f`` -> ``:.6f``, ``:.0%`` -> ``:.3%``);
2. runs each copy under ``ATEN_CPU_CAPABILITY=default``, ``avx2`` and ``avx512`` (levels this CPU lacks are left
   out);
3. for every number printed through a format spec, compares the three runs: its spread (max - min) and its
   margin (the distance from the nearest rounding boundary of the original spec).

A number is reported when its rounding differs between levels, or when its margin is under five times its
spread: another CPU's kernels may well move it that far. Numbers that are the same at every level are exact
arithmetic (counts, bytes, quantization of fixed weights) and are not reported. Takes about 3x the notebooks'
own run time; run it after changing a notebook, before committing its outputs.

Usage:
    .venv/bin/python scripts/check_portable_outputs.py [notebooks/02_rank_effects.ipynb ...]
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LEVELS = ("default", "avx2", "avx512")
SPEC = re.compile(r"(:[<>^=]?[+ -]?\d*,?)\.(\d+)([f%])")
NUMBER = re.compile(r"-?\d+\.\d+")
EXTRA = 3  # digits added to each format spec


def widen(source: str) -> str:
    return SPEC.sub(lambda m: f"{m.group(1)}.{int(m.group(2)) + EXTRA}{m.group(3)}", source)


def available_levels() -> list[str]:
    native = torch.backends.cpu.get_cpu_capability().lower()
    return list(LEVELS[:LEVELS.index(native) + 1]) if native in LEVELS else ["default"]


def compared_outputs(path: Path) -> dict[int, str]:
    """Text that nbval compares, per code cell (cells marked NBVAL_IGNORE_OUTPUT left out)."""
    out = {}
    for i, cell in enumerate(json.loads(path.read_text(encoding="utf-8"))["cells"]):
        if cell["cell_type"] != "code" or "NBVAL_IGNORE_OUTPUT" in "".join(cell["source"]):
            continue
        parts = []
        for o in cell.get("outputs", []):
            parts.append("".join(o.get("text", "")))
            parts += ["".join(o.get("data", {}).get(k, "")) for k in ("text/plain", "text/markdown")]
        out[i] = "".join(parts)
    return out


def run_widened(notebook: Path, level: str, workdir: Path) -> Path:
    nb = json.loads(notebook.read_text(encoding="utf-8"))
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["source"] = widen("".join(cell["source"]))
    src = workdir / f"{level}-{notebook.name}"
    src.write_text(json.dumps(nb), encoding="utf-8")
    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--inplace",
                    "--ExecutePreprocessor.timeout=1200", str(src)], check=True, cwd=notebook.parent,
                   env={**os.environ, "ATEN_CPU_CAPABILITY": level}, capture_output=True)
    return src


def report(notebook: Path, runs: dict[str, Path]) -> int:
    texts = {level: compared_outputs(path) for level, path in runs.items()}
    first = next(iter(texts.values()))
    flagged = 0
    for cell, text in first.items():
        numbers = {level: NUMBER.findall(t.get(cell, "")) for level, t in texts.items()}
        if len({len(n) for n in numbers.values()}) != 1:
            print(f"{notebook.name} cell {cell}: prints a different number of numbers per level")
            flagged += 1
            continue
        for j, printed in enumerate(zip(*numbers.values())):
            digits = len(printed[0].split(".")[1]) - EXTRA
            if digits < 0:
                continue
            values = [float(v) for v in printed]
            spread, step = max(values) - min(values), 10.0 ** -digits
            if spread == 0:
                continue
            margin = min(abs(abs(v / step - round(v / step)) - 0.5) * step for v in values)
            shown = {f"{v:.{digits}f}" for v in values}
            if len(shown) > 1 or margin < 5 * spread:
                at = [m.start() for m in NUMBER.finditer(text)][j]
                print(f"{notebook.name} cell {cell}: {' / '.join(printed)} printed to {digits} decimals: "
                      f"spread {spread:.2g}, margin {margin:.2g}  | ...{text[max(0, at - 50):at]!r}")
                flagged += 1
    return flagged


def main(paths: list[str]) -> int:
    notebooks = [Path(p).resolve() for p in paths] or sorted((REPO / "notebooks").glob("[0-9]*.ipynb"))
    levels = available_levels()
    print(f"levels: {', '.join(levels)}")
    flagged = 0
    with tempfile.TemporaryDirectory() as tmp:
        for notebook in notebooks:
            runs = {level: run_widened(notebook, level, Path(tmp)) for level in levels}
            flagged += report(notebook, runs)
    print(f"{flagged} number(s) at risk" if flagged else "every printed number holds at these levels")
    return 1 if flagged else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
