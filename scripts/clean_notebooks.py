"""Strip machine-specific metadata from executed notebooks, keeping outputs and widget state.

Usage:
    python scripts/clean_notebooks.py notebooks/01_lora_from_scratch.ipynb [more.ipynb ...]
    python scripts/clean_notebooks.py --check notebooks/*.ipynb   # exit 1 if any file would change

What it does to each notebook, in place:
- cells: drops `execution` timing metadata and any `collapsed`/`scrolled` view state; keeps `tags`;
  renumbers execution counts 1, 2, 3, ... in cell order (outputs keep their count in step);
- notebook metadata: keeps only `kernelspec` (normalized to the plain `python3` kernel),
  `language_info` (name only: the Python version is machine-specific) and `widgets` (the stored widget state);
- outputs are kept as they are (nbval compares them), except stderr streams: nbval does not compare them,
  and what lands there is library noise that names this machine's paths (import warnings, deprecations).
"""

import argparse
import json
import sys
from pathlib import Path

KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
KEEP_CELL_METADATA = ("tags",)


def clean(nb: dict) -> dict:
    """Return a cleaned copy of a notebook's JSON (see the module docstring)."""
    nb = json.loads(json.dumps(nb))
    count = 0
    for cell in nb.get("cells", []):
        cell["metadata"] = {k: v for k, v in cell.get("metadata", {}).items() if k in KEEP_CELL_METADATA}
        if cell.get("cell_type") != "code":
            continue
        if cell.get("execution_count") is None and not cell.get("outputs"):
            continue
        cell["outputs"] = [o for o in cell.get("outputs", [])
                           if not (o.get("output_type") == "stream" and o.get("name") == "stderr")]
        count += 1
        cell["execution_count"] = count
        for out in cell.get("outputs", []):
            if "execution_count" in out:
                out["execution_count"] = count
    meta = nb.get("metadata", {})
    cleaned = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    if "widgets" in meta:
        cleaned["widgets"] = meta["widgets"]
    nb["metadata"] = cleaned
    return nb


def dumps(nb: dict) -> str:
    """Serialize the way Jupyter does (1-space indent, keys sorted, trailing newline)."""
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--check", action="store_true", help="report files that are not clean; change nothing")
    args = parser.parse_args(argv)
    dirty = []
    for path in args.paths:
        text = path.read_text(encoding="utf-8")
        new = dumps(clean(json.loads(text)))
        if new != text:
            dirty.append(path)
            if not args.check:
                path.write_text(new, encoding="utf-8")
    for path in dirty:
        print(f"{'not clean' if args.check else 'cleaned'}: {path}")
    return 1 if (args.check and dirty) else 0


if __name__ == "__main__":
    sys.exit(main())
