"""The package, its tests, benchmarks, scripts and notebooks keep the shape pyproject.toml's [tool.ruff] asks for.

ruff checks unused imports and names (F), syntax errors (E9), lines over 120 characters (E501) and functions whose
cyclomatic complexity passes 12 (C901). It is a test dependency, so a missing ruff fails here rather than skipping.
"""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise",
                             "lora_lab", "tests", "benchmarks", "scripts", "notebooks"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, f"ruff check found problems:\n{result.stdout}{result.stderr}"
