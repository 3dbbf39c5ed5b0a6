"""Training speed: lora_lab's finetune against PEFT (+ bitsandbytes Linear4bit for QLoRA) on the same model.

Both sides train the shipped base model (PEFT on its transformers export) with the same LoRA config, batch size,
learning rate and AdamW, for the same number of steps; steps/second is the median step time's inverse.

The two are interleaved step by step (one PEFT step runs in `finetune`'s callback, outside the kit's timed
step), so a machine whose load changes during the run slows both sides alike. ``--rounds`` repeats the whole
measurement and prints every round's ratio.

    python benchmarks/bench_train.py [--steps 60] [--batch-size 32] [--device cpu] [--threads N] [--rounds 1]
"""

import argparse
import statistics
import tempfile
import time

import torch

from lora_lab.data import load_task
from lora_lab.hf import export_hf
from lora_lab.lora import LoraConfig
from lora_lab.checkpoint import load_base_model
from lora_lab.model import LlamaConfig, LlamaForCausalLM
from lora_lab.train import DEFAULT_LR, finetune


def base_model(device):
    """The shipped base model; an untrained one of the same shape where the weights are not built yet (speed
    does not depend on the weights' values)."""
    try:
        return load_base_model(device=device)
    except FileNotFoundError:
        print("(base weights not found: timing an untrained model of the same shape)")
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig()).to(device)


def kit_steps(method, task, args) -> list[float]:
    model = base_model(args.device)
    history = finetune(model, task, method=method, steps=args.steps, batch_size=args.batch_size, eval_every=None,
                       eval_examples=1, measure_memory=False, progress=False, device=args.device)
    return history.step_seconds


def peft_model(base, method, directory, device):
    import peft
    import transformers

    export_hf(base, directory)
    kwargs = {}
    if method == "qlora":
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
        kwargs["device_map"] = {"": device}
    hf = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs).to(device)
    config = LoraConfig(lora_alpha=16)
    peft_config = peft.LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                                  target_modules=list(config.target_modules))
    torch.manual_seed(0)
    return peft.get_peft_model(hf, peft_config)


def peft_stepper(method, task, args):
    """A function that runs one timed PEFT training step; the step times collect in its ``times`` list."""
    with tempfile.TemporaryDirectory() as directory:
        model = peft_model(base_model("cpu"), method, directory, args.device)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=DEFAULT_LR[method],
                            weight_decay=0.0)
    gen, times = torch.Generator().manual_seed(0), []

    def step(*_):
        ids, labels = (t.to(args.device) for t in task.get_batch("train", args.batch_size, gen))
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        if ids.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)

    step.times = times
    return step


def peft_steps(method, task, args) -> list[float]:
    step = peft_stepper(method, task, args)
    for _ in range(args.steps):
        step()
    return step.times


def interleaved_steps(method, task, args) -> tuple[list[float], list[float]]:
    """(kit step times, PEFT step times), one PEFT step after each of `finetune`'s steps."""
    peft_step = peft_stepper(method, task, args)
    history = finetune(base_model(args.device), task, method=method, steps=args.steps, batch_size=args.batch_size,
                       eval_every=None, eval_examples=1, measure_memory=False, progress=False, device=args.device,
                       callback=peft_step)
    return history.step_seconds, peft_step.times


def rate(times: list[float]) -> float:
    return 1.0 / statistics.median(times[2:])  # skip two warm-up steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    task = load_task()
    print(f"device={args.device}  batch={args.batch_size}x{task.seq_len} tokens  steps={args.steps}  "
          f"threads={torch.get_num_threads()}")
    print(f"{'method':<8}{'lora_lab steps/s':>18}{'PEFT steps/s':>16}{'lora_lab / PEFT':>18}")
    for _ in range(args.rounds):
        for method in ("lora", "qlora"):
            try:
                kit, other = (rate(times) for times in interleaved_steps(method, task, args))
            except Exception as error:  # e.g. bitsandbytes 4-bit not available on this device
                kit = rate(kit_steps(method, task, args))
                print(f"{method:<8}{kit:>18.1f}{'n/a':>16}{'':>18}   ({type(error).__name__}: {error})")
                continue
            print(f"{method:<8}{kit:>18.1f}{other:>16.1f}{kit / other:>17.2f}x")
    start = time.perf_counter()
    finetune(base_model(args.device), task, measure_memory=True, device=args.device)
    print(f"finetune(model, task, measure_memory=True) run (200 steps, batch 32, eval every 50): "
          f"{time.perf_counter() - start:.1f} s wall")


if __name__ == "__main__":
    main()
