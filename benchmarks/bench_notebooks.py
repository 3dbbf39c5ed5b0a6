"""Notebook execution time and widget redraw latency.

    python benchmarks/bench_notebooks.py                 # everything
    python benchmarks/bench_notebooks.py --widgets-only  # skip executing the notebooks
    python benchmarks/bench_notebooks.py --notebooks-only

1. Runs each notebook top to bottom in a fresh kernel (a copy in memory: the committed file is not touched) and
   prints the wall time, kernel start included, against the 60 s budget; then the sum for 01-06 and for all.
2. Builds each widget in-process, sets its slider values programmatically (exactly what a slider move does:
   the observer updates the artists and re-renders the PNG) and prints the median redraw latency against the
   150 ms budget, and, where the figure can also be redrawn in full, the ratio against that full redraw (what
   a plain `fig.savefig` per move would cost, measured in the same run).

To add a notebook, append to NOTEBOOKS; to add a widget, append a WidgetCase to WIDGETS (`build` returns the
widget box, `moves` lists (control, value) pairs to set one after another).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_BUDGET_S = 60.0
REDRAW_BUDGET_MS = 150.0

NOTEBOOKS = [
    "notebooks/01_lora_from_scratch.ipynb",
    "notebooks/02_rank_effects.ipynb",
    "notebooks/03_nf4_quantization.ipynb",
    "notebooks/04_qlora_memory.ipynb",
    "notebooks/05_memory_at_scale.ipynb",
    "notebooks/06_merge_save_share.ipynb",
    "notebooks/07_what_finetuning_forgets.ipynb",
    "notebooks/08_variants_vs_quantization_error.ipynb",
    "notebooks/09_real_llm.ipynb",
]


@dataclass
class WidgetCase:
    """One widget to benchmark: `build()` returns the box; `moves(box)` returns [(control, value), ...]."""

    name: str
    build: Callable[[], object]
    moves: Callable[[object], list]


def _tiny_weight():
    import torch

    try:
        from lora_lab import load_base_model

        return load_base_model(device="cpu").model.layers[0].self_attn.q_proj.weight.detach()
    except Exception:  # no shipped weights yet: a random matrix of a typical size
        return torch.randn(256, 256, generator=torch.Generator().manual_seed(0))


def _lora_rank_explorer():
    from lora_lab.widgets.lora import rank_explorer

    return rank_explorer(_tiny_weight())


def _lora_scaling_explorer():
    from lora_lab.widgets.lora import scaling_explorer

    return scaling_explorer()


def _memory_explorer():  # 04: a grid measured on the tiny model (random weights: memory ignores values)
    from lora_lab.model import LlamaConfig, LlamaForCausalLM
    from lora_lab.widgets.memory import measure_grid, memory_explorer, tiny_measure

    measure = tiny_measure(LlamaForCausalLM(LlamaConfig()))
    return memory_explorer(measure_grid(measure, ("full", "lora"), (2, 16), (4, 16), (16, 64)))


def _fit_explorer(grid: bool = True):
    """05 as the notebook builds it: three methods; with an `EstimateGrid`, the build runs the corner estimates and
    every r / batch_size / seq_len move is arithmetic. `grid=False` is the previous path (one depth-extrapolated
    estimate per method for every new setting), measured in the same run for the ratio."""
    from lora_lab.estimator import PRESETS, EstimateCache, EstimateGrid, depth_extrapolated, estimate, model_config
    from lora_lab.widgets.scale import fit_explorer

    fast = EstimateCache(depth_extrapolated(estimate, model_config))
    est = EstimateGrid(fast, model_config) if grid else fast
    return fit_explorer(est, list(PRESETS), optimizers=("adamw", "sgd"), preset="llama-65b")


def _fit_new_settings(box):
    return ([(box.controls["seq_len"], v) for v in (1024, 2048, 256)] + [(box.controls["r"], v) for v in (16, 64, 4)]
            + [(box.controls["batch_size"], v) for v in (4, 32, 2)])


def _requant_explorer():  # 06: ΔW of growing size on a real-sized weight, real NF4
    import torch

    from lora_lab.nf4 import nf4_codebook, quantize_nf4
    from lora_lab.widgets.merge import erasure_table, requant_explorer

    g = torch.Generator().manual_seed(0)
    w, d = torch.randn(128, 128, generator=g) * 0.05, torch.randn(128, 128, generator=g)
    return requant_explorer(erasure_table({s: (w, d * 1e-5 * s) for s in (1, 10, 100, 1000)}, quantize_nf4,
                                          nf4_codebook()))


def _quant_offset_explorer():
    from lora_lab import nf4
    from lora_lab.widgets.quant import offset_explorer

    return offset_explorer(nf4.nf4_codebook, nf4.codebook("nf4"))


def _quant_error_explorer():
    import torch

    from lora_lab import nf4
    from lora_lab.plots.quant import error_grid
    from lora_lab.widgets.quant import error_explorer

    w = _tiny_weight().reshape(-1)[:16384]
    gen = torch.Generator().manual_seed(0)
    samples = {"base model": w, "normal": torch.randn(16384, generator=gen) * w.std()}
    quantizers = {q: (lambda x, bs, q=q: nf4.quantize(x, q, bs, double_quant=False).dequantize())
                  for q in ("nf4", "fp4", "int4")}
    return error_explorer(error_grid(samples, quantizers, [32, 64, 256, 1024, 4096]))


def _rank_curve_explorer():
    import math

    from lora_lab.widgets.rank import curve_explorer

    steps = [0, 10, 20, 30]
    curves = {r: (steps, [3.0 * math.exp(-s * (0.01 + 0.002 * math.log2(r))) for s in steps])
              for r in (1, 2, 4, 8, 16, 32, 64)}
    curves["full"] = (steps, [3.0, 2.0, 1.5, 1.2])
    return curve_explorer(curves)


def _forgetting_rows():  # 07: a sweep's rows, synthetic (the widget only picks: training is not what it times)
    cos = {f"model.layers.{i}.self_attn.{m}": [1.0 - 0.08 * j for j in range(10)] for i in range(4)
           for m in ("q_proj", "v_proj")}
    return [{"method": m, "r": r, "lr": lr, "task_accuracy": min(1.0, lr * 300), "corpus_loss_rise": lr * 200,
             "copy_accuracy": 1 - min(1.0, lr * 100), "intruders": 3, "stopped": None, "cosines": cos}
            for m, r in (("full", None), ("lora", 4), ("lora", 16)) for lr in (3e-4, 1e-3, 3e-3, 1e-2)]


def _forgetting_explorer():
    from lora_lab.widgets.forgetting import forgetting_explorer

    return forgetting_explorer(_forgetting_rows())


def _mitigation_explorer():
    from lora_lab.widgets.forgetting import mitigation_explorer

    return mitigation_explorer([{"lambda": lam, "task_accuracy": lam, "copy_accuracy": 1 - lam / 2,
                                 "corpus_loss_rise": lam / 2} for lam in (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)])


def _variants_error_explorer():
    from lora_lab.variants import LogitError
    from lora_lab.widgets.variants import error_explorer

    sweep = {r: {"QLoRA": LogitError(0.13, 0.05), "LoftQ": LogitError(0.12 / r ** 0.3, 0.05 / r ** 0.5),
                 "PiSSA": LogitError(0.13 / r ** 0.4, 0.05 / r ** 0.6)} for r in (1, 2, 4, 8, 16, 32, 64)}
    return error_explorer(sweep, r=8)


WIDGETS: list[WidgetCase] = [
    WidgetCase("04 memory_explorer (r, batch_size, seq_len)", _memory_explorer,
               lambda box: [(box.sliders["r"], 16), (box.sliders["batch_size"], 16), (box.sliders["seq_len"], 64),
                            (box.sliders["r"], 2), (box.sliders["batch_size"], 4), (box.sliders["seq_len"], 16)]),
    WidgetCase("05 fit_explorer (seq_len, r, batch: new settings)", _fit_explorer, _fit_new_settings),
    WidgetCase("05 fit_explorer, no EstimateGrid (new settings)", lambda: _fit_explorer(grid=False),
               _fit_new_settings),
    WidgetCase("05 fit_explorer (cached revisits)", _fit_explorer,
               lambda box: [(box.controls["seq_len"], v) for v in (1024, 512, 1024, 512, 1024, 512)]),
    WidgetCase("06 requant_explorer (training step)", _requant_explorer,
               lambda box: [(box.slider, v) for v in (10, 100, 1000, 1, 100, 10)]),
    WidgetCase("01 rank_explorer (rank slider)", _lora_rank_explorer,
               lambda box: [(box.slider, v) for v in (1, 2, 4, 8, 16, 32, 64, 3, 24, 12, 48)]),
    WidgetCase("01 scaling_explorer (alpha, rank)", _lora_scaling_explorer,
               lambda box: [(box.alpha, v) for v in (1, 4, 16, 64, 8, 2)]
               + [(box.rank, v) for v in (1, 4, 16, 64, 2, 32)]),
    WidgetCase("02 curve_explorer (rank slider)", _rank_curve_explorer,
               lambda box: [(box.slider, v) for v in (1, 2, 4, 8, 16, 32, 64, 4, 1, 32)]),
    WidgetCase("03 offset_explorer (offset slider)", _quant_offset_explorer,
               lambda box: [(box.slider, v) for v in (0.9, 0.92, 0.95, 0.97, 0.99, 0.999, 0.96, 0.93)]),
    WidgetCase("03 error_explorer (blocksize, quantizer, weights)", _quant_error_explorer,
               lambda box: [(box.blocksize, v) for v in (64, 256, 1024, 4096, 32)]
               + [(box.quantizer, v) for v in ("fp4", "int4", "nf4")]
               + [(box.sample, v) for v in ("normal", "base model")]),
    WidgetCase("07 forgetting_explorer (method, lr)", _forgetting_explorer,
               lambda box: [(box.lr, v) for v in (1e-3, 3e-3, 1e-2, 3e-4)]
               + [(box.method, v) for v in ("r = 4", "r = 16", "full")]),
    WidgetCase("07 mitigation_explorer (λ)", _mitigation_explorer,
               lambda box: [(box.slider, v) for v in (0.0, 0.25, 0.5, 0.9, 1.0, 0.75)]),
    WidgetCase("08 error_explorer (rank slider)", _variants_error_explorer,
               lambda box: [(box.slider, v) for v in (1, 2, 4, 8, 16, 32, 64, 4, 1, 32)]),
]


def time_notebook(path: Path) -> tuple[float, str]:
    """Run a copy of the notebook top to bottom in a fresh kernel, as "Restart Kernel and Run All" does.

    Returns (seconds from the kernel's start to the last cell's end, "ok" or the error's first line). The
    notebook runs in this process's client (nbclient, which nbconvert and nbval drive too), so the figure
    leaves out starting a command-line tool, which a student in JupyterLab never waits for.
    """
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    try:
        client.execute()
        status = "ok"
    except Exception as exc:  # report and go on: one failing notebook must not hide the others' times
        status = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:80]
    return time.perf_counter() - start, status


def full_redraw_ms(fig, repeats: int = 5) -> float:
    """Median time of a whole-figure PNG render (the alternative to blitting), in ms."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fig.savefig(io.BytesIO(), format="png", dpi=fig.dpi)
        samples.append(time.perf_counter() - start)
    return 1000 * statistics.median(samples)


def time_widget(case: WidgetCase) -> tuple[float, float | None, int]:
    """Median redraw latency in ms over the case's moves, the full-redraw median (or None), and #moves."""
    box = case.build()
    samples = []
    for control, value in case.moves(box):
        start = time.perf_counter()
        control.value = value
        samples.append(time.perf_counter() - start)
    view = getattr(box, "view", None)
    full = full_redraw_ms(view.fig) if view is not None and getattr(view, "animated", None) else None
    return 1000 * statistics.median(samples), full, len(samples)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widgets-only", action="store_true")
    parser.add_argument("--notebooks-only", action="store_true")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    print(f"cores available: {len(os.sched_getaffinity(0))}")
    if not args.widgets_only:
        print(f"\n{'notebook':<42} {'seconds':>8} {'/ 60 s':>7}  status")
        times = {}
        for rel in NOTEBOOKS:
            path = ROOT / rel
            if not path.exists():
                print(f"{rel:<42} {'-':>8} {'-':>7}  missing")
                continue
            seconds, status = time_notebook(path)
            times[rel] = seconds
            print(f"{rel:<42} {seconds:8.1f} {seconds / NOTEBOOK_BUDGET_S:7.2f}  {status}")
        for label, names in (("notebooks 01-06", NOTEBOOKS[:6]), (f"all {len(NOTEBOOKS)}", NOTEBOOKS)):
            if all(name in times for name in names):
                print(f"{label + ', one after another':<42} {sum(times[n] for n in names):8.1f}")
    if not args.notebooks_only:
        print(f"\n{'widget':<50} {'median ms':>9} {'/ 150 ms':>8} {'full ms':>8} {'speedup':>8} {'moves':>6}")
        for case in WIDGETS:
            try:
                median, full, n = time_widget(case)
            except Exception as exc:  # report and go on: one broken case must not hide the others
                print(f"{case.name:<50} failed: {type(exc).__name__}: {exc}"[:140])
                continue
            full_txt = f"{full:8.1f} {full / median:7.1f}x" if full else f"{'-':>8} {'-':>8}"
            print(f"{case.name:<50} {median:9.1f} {median / REDRAW_BUDGET_MS:8.2f} {full_txt} {n:6d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
