"""What recording a step's memory timeline costs: `training_step` with `TimelineRecorder` open, against without.

The shipped base model trains with AdamW, full fine-tuning, LoRA and QLoRA (r=8 on q_proj and v_proj), batch 16
of the "vowel" task. The two variants are interleaved step by step on one model and optimizer, so a change in
the machine's load slows both alike; the ratio is of median step times. The target: under 1.5x on the CPU.
It also prints each method's recorded peak (the kit's view; on CUDA the allocator's beside it), without and
with gradient checkpointing.

    python benchmarks/bench_timeline.py [--steps 30] [--batch-size 16] [--device cpu] [--threads 1] [--rounds 1]
"""

import argparse
import copy
import statistics
import time

import torch

from lora_lab.checkpoint import load_base_model
from lora_lab.data import load_task
from lora_lab.lora import LoraConfig
from lora_lab.plots.timeline import format_bytes, peak_sentence
from lora_lab.timeline import TimelineRecorder, record_step
from lora_lab.train import DEFAULT_LR, make_optimizer, prepare_model, training_step

METHODS = ("full", "lora", "qlora")


def timed_step(model, batch, optimizer) -> float:
    start = time.perf_counter()
    loss, _ = training_step(model, batch, optimizer)
    loss.item()  # waits for the GPU
    return time.perf_counter() - start


def overhead(base, method, task, args) -> tuple[float, float]:
    """Median seconds of a plain step and of a recorded one, interleaved on the same model."""
    config = None if method == "full" else LoraConfig(lora_alpha=16)
    model = prepare_model(copy.deepcopy(base), method, config).to(args.device).train()
    optimizer = make_optimizer(model, "adamw", DEFAULT_LR[method])
    generator = torch.Generator().manual_seed(0)
    plain, recorded = [], []
    for i in range(args.steps + 3):  # three warm-up rounds
        batch = [t.to(args.device) for t in task.get_batch("train", args.batch_size, generator)]
        a = timed_step(model, batch, optimizer)
        with TimelineRecorder(model):
            b = timed_step(model, batch, optimizer)
        if i >= 3:
            plain.append(a)
            recorded.append(b)
    return statistics.median(plain), statistics.median(recorded)


def peaks(base, method, task, args) -> list[str]:
    config = None if method == "full" else LoraConfig(lora_alpha=16)
    batch = [t.to(args.device) for t in task.get_batch("train", args.batch_size, torch.Generator().manual_seed(0))]
    rows = []
    for checkpointing in (False, True):
        model = prepare_model(copy.deepcopy(base), method, config).to(args.device).train()
        timeline = record_step(model, batch, gradient_checkpointing=checkpointing)
        row = f"{method:>5} checkpointing {'on ' if checkpointing else 'off'}: {peak_sentence(timeline)}"
        if timeline.cuda is not None:
            row += (f" | CUDA allocator peak {format_bytes(timeline.cuda.peak)}, max_memory_allocated "
                    f"{format_bytes(timeline.cuda.cuda_peak)}")
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base, task = load_base_model(device="cpu"), load_task()
    print(f"device {args.device}, {args.threads} thread(s), batch {args.batch_size}, {args.steps} steps per method")
    for method in METHODS:
        for line in peaks(base, method, task, args):
            print(line)
    print(f"{'method':>6} {'plain ms':>9} {'recorded ms':>12} {'ratio':>6}")
    for round_ in range(args.rounds):
        for method in METHODS:
            plain, recorded = overhead(base, method, task, args)
            print(f"{method:>6} {plain * 1e3:9.2f} {recorded * 1e3:12.2f} {recorded / plain:6.2f}x"
                  + (f"  (round {round_ + 1})" if args.rounds > 1 else ""))


if __name__ == "__main__":
    main()
