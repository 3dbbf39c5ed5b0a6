"""lora_lab.estimate for every preset and method, beside the LoRA and QLoRA papers' published figures.

    python benchmarks/bench_estimate.py

The estimate is a real training step on the meta device (see lora_lab.estimate); the papers' figures were
measured on GPUs and include what tensors do not (CUDA context, allocator cache), so a ratio a little under
1 on totals is expected. Sources: LoRA §4.2 and Table 4/15, QLoRA §1, §2, §5.3 and Appendix G (Figure 6).
"""

import time

from lora_lab.estimate import PRESETS, estimate

GB, MB = 1e9, 1e6
QV = ("q_proj", "v_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
APPENDIX_G = dict(r=64, target_modules=ALL_LINEAR, batch_size=1, seq_len=512, gradient_checkpointing=True)

# (claim, source, paper value, unit, preset, method, estimate kwargs, what to read)
PAPER = [
    ("GPT-3 trainable params, r=1 q,v", "LoRA Tab. 4", 4.7e6, 1, "gpt3-175b", "lora", dict(r=1, target_modules=QV),
     "trainable_params"),
    ("GPT-3 trainable params, r=8 q,v", "LoRA Tab. 4", 37.7e6, 1, "gpt3-175b", "lora", dict(r=8, target_modules=QV),
     "trainable_params"),
    ("GPT-3 checkpoint, r=4 q,v", "LoRA §4.2", 35, MB, "gpt3-175b", "lora", dict(r=4, target_modules=QV),
     "adapter_bytes"),
    ("GPT-3 checkpoint, full", "LoRA §4.2", 350, GB, "gpt3-175b", "full", {}, "adapter_bytes"),
    ("GPT-3 VRAM, full + Adam", "LoRA §4.2", 1200, GB, "gpt3-175b", "full", dict(seq_len=2048), "total_bytes"),
    ("GPT-3 VRAM, LoRA r=4 q,v", "LoRA §4.2", 350, GB, "gpt3-175b", "lora", dict(r=4, seq_len=2048), "total_bytes"),
    ("65B 16-bit fine-tuning (>780 GB)", "QLoRA §1", 780, GB, "llama-65b", "full", {}, "total_bytes"),
    ("7B 4-bit base model", "QLoRA §2", 5048, MB, "llama-7b", "qlora", APPENDIX_G, "frozen_weights"),
]
for preset, model_mb, adapter_mb, optim_mb, total_gb in [("llama-7b", 5046, 288, 1152, 6.9),
                                                         ("llama-13b", 8476, 450, 1800, 11.3),
                                                         ("llama-33b", 19302, 877.5, 3510, 24.7),
                                                         ("llama-65b", 37074, 1440, 5760, 45.0)]:
    size = preset.split("-")[1].upper()
    PAPER += [(f"{size} QLoRA model (NF4)", "QLoRA Fig. 6", model_mb, MB, preset, "qlora", APPENDIX_G,
               "frozen_weights"),
              (f"{size} QLoRA adapters", "QLoRA Fig. 6", adapter_mb, MB, preset, "qlora", APPENDIX_G,
               "trainable_weights"),
              (f"{size} QLoRA optimizer", "QLoRA Fig. 6", optim_mb, MB, preset, "qlora", APPENDIX_G,
               "optimizer_state"),
              (f"{size} QLoRA total", "QLoRA Fig. 6", total_gb, GB, preset, "qlora", APPENDIX_G, "total_bytes")]
PAPER += [("65B QLoRA fits one 48 GB GPU", "QLoRA abstract", 48, GB, "llama-65b", "qlora", APPENDIX_G, "total_bytes"),
          ("33B QLoRA fits a 24 GB GPU", "QLoRA §5.3", 24, GB, "llama-33b", "qlora", APPENDIX_G, "total_bytes")]

_cache = {}


def cached(preset, method, **kwargs):
    key = (preset, method, tuple(sorted(kwargs.items())))
    if key not in _cache:
        _cache[key] = estimate(preset, method, **kwargs)
    return _cache[key]


def read(est, field):
    return getattr(est.breakdown, field) if hasattr(est.breakdown, field) else getattr(est, field)


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
    print("\nPublished figures beside the estimate (units: params, MB = 1e6 B, GB = 1e9 B)")
    print(f"{'claim':<34}{'source':<16}{'paper':>15}{'estimate':>15}{'ratio':>8}")
    for claim, source, value, unit, preset, method, kwargs, field in PAPER:
        got = read(cached(preset, method, **kwargs), field) / unit
        print(f"{claim:<34}{source:<16}{value:>15,.1f}{got:>15,.1f}{got / value:>8.2f}")


if __name__ == "__main__":
    main()
