"""lora_lab.estimator for every preset and method, beside the LoRA and QLoRA papers' published figures.

    python benchmarks/bench_estimate.py

The estimate is a real training step on the meta device (see lora_lab.estimator); the papers' figures were
measured on GPUs and include what tensors do not (CUDA context, allocator cache), so a ratio a little under
1 on totals is expected. Sources: LoRA §4.2 and Table 4/15, QLoRA §1, §2, §5.3 and Appendix G (Figure 6).
"""

import time

from lora_lab.estimator import PRESETS, EstimateCache, estimate
from lora_lab.plots.scale import MORE_PAPER_FIGURES, PAPER_FIGURES, paper_comparison

GB = 1e9
cached = EstimateCache(estimate)  # each (preset, method, settings) is estimated once


def main():
    print("Estimates (batch 1, seq 512, gradient checkpointing, r=8 on q,v, 16-bit weights, fp32 AdamW moments)")
    print(f"{'preset':<13}{'method':<7}{'params':>10}{'trainable':>16}{'weights':>10}{'adapters':>10}"
          f"{'grads':>9}{'optim':>9}{'activ':>9}{'total GB':>10}{'secs':>6}")
    for preset in PRESETS:
        for method in ("full", "lora", "qlora"):
            start = time.perf_counter()
            e = cached(preset, method)
            b = e.breakdown
            print(f"{preset:<13}{method:<7}{e.total_params / 1e9:>9.2f}B{e.trainable_params:>16,}"
                  f"{b.frozen_weights / GB:>10.2f}{b.trainable_weights / GB:>10.2f}{b.gradients / GB:>9.2f}"
                  f"{b.optimizer_state / GB:>9.2f}{b.activations / GB:>9.2f}{e.total_bytes / GB:>10.2f}"
                  f"{time.perf_counter() - start:>6.1f}")
    print("\nPublished figures beside the estimate (lora_lab.plots.scale: PAPER_FIGURES, the table notebook 05 shows,"
          " then MORE_PAPER_FIGURES)")
    print(f"{'claim':<48}{'source':<15}{'unit':<7}{'paper':>12}{'estimate':>12}{'ratio':>7}")
    for row in paper_comparison(cached, PAPER_FIGURES + MORE_PAPER_FIGURES):
        f = row.figure
        scale = 1e6 if f.unit == "params" else 1  # parameter counts in millions
        print(f"{f.claim:<48}{f.source:<15}{'M' if f.unit == 'params' else f.unit:<7}{f.paper_value / scale:>12,.1f}"
              f"{row.estimated / scale:>12,.1f}{row.ratio:>7.2f}")


if __name__ == "__main__":
    main()
