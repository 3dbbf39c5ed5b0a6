"""The committed notebooks are stored clean: no machine-specific metadata, no stderr noise, no local paths."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)  # ko/ too


def test_clean_notebooks_check_passes():
    assert NOTEBOOKS, f"no .ipynb in {ROOT / 'notebooks'}: these checks would check nothing"
    script = ROOT / "scripts" / "clean_notebooks.py"
    proc = subprocess.run([sys.executable, str(script), "--check", *map(str, NOTEBOOKS)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"run scripts/clean_notebooks.py on: {proc.stdout}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.relative_to(ROOT / "notebooks").as_posix())
def test_stored_outputs_name_no_local_paths(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    text = json.dumps([c.get("outputs", []) for c in nb["cells"]])
    for marker in ("site-packages", "/home/", "/root/", str(ROOT)):
        assert marker not in text, f"{path.name} stores an output naming {marker!r}"


# Importing these logs notes to stderr that depend on the CPU and the installed extras (bitsandbytes on an
# AVX-512-BF16 CPU: "Failed to load CPU gemm_4bit_forward from kernels-community"), and nbval compares stderr.
NOISY_IMPORTS = ("import bitsandbytes", "import peft", "import transformers", "from peft", "from transformers",
                 "from bitsandbytes")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.relative_to(ROOT / "notebooks").as_posix())
def test_noisy_libraries_are_first_imported_in_a_cell_whose_output_is_not_compared(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    for i, cell in enumerate(c for c in nb["cells"] if c["cell_type"] == "code"):
        source = "".join(cell["source"])
        if any(line.lstrip().startswith(NOISY_IMPORTS) for line in source.splitlines()):
            assert "NBVAL_IGNORE_OUTPUT" in source, (
                f"{path.name} code cell {i} is the first to import bitsandbytes/peft/transformers; mark it "
                "# NBVAL_IGNORE_OUTPUT (and keep what it prints machine-specific only), or import them earlier")
            return
