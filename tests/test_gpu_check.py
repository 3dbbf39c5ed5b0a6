"""benchmarks/gpu_check.py runs on a machine without CUDA: GPU parts skipped with a message, CPU parts checked."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: run benchmarks/gpu_check.py itself; this test covers the CPU fallback")
    out = tmp_path_factory.mktemp("gpu_check") / "results.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    return proc, json.loads(out.read_text()) if out.exists() else None


def test_runs_and_says_gpu_parts_are_skipped(cpu_run):
    proc, results = cpu_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "No CUDA device: GPU parts skipped" in proc.stdout
    assert results["device"] == "cpu"
    assert "speed" not in results and "nf4_bandwidth" not in results


def test_nf4_agrees_with_bitsandbytes_in_every_case(cpu_run):
    rows = cpu_run[1]["nf4_agreement"]
    assert isinstance(rows, list) and len(rows) >= 24, rows
    assert all(r["packed_equal"] and r["dequantized_equal"] for r in rows), [r for r in rows if not r["packed_equal"]]


def test_estimate_matches_the_measured_step_for_each_method(cpu_run):
    rows = cpu_run[1]["memory"]
    assert isinstance(rows, list), rows  # an error here is recorded as {"error": ...}
    assert [r["method"] for r in rows] == ["full", "lora", "qlora"]
    for r in rows:
        # 5%: the bound between estimate and measurement for the base model (same dtype, same batch)
        assert abs(r["estimate_over_measured"] - 1) < 0.05, r
