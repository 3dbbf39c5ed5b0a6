"""Time lora_lab's LoRALinear against the frozen nn.Linear it wraps and against PEFT's LoRA layer.

Forward + backward of one (dim x dim) layer with r=8 on a batch of tokens, the input requiring grad as it
does inside a network; then the merged forward against a plain nn.Linear. Prints medians and ratios.
Targets: LoRA <= 1.10x the frozen layer, <= 1.0x PEFT, merged forward 1.00x.

    python benchmarks/bench_lora.py                   # 8 x 128 tokens, 4096 x 4096, fp32 and bf16
    python benchmarks/bench_lora.py --dim 1024 --repeats 5

The variants run interleaved (A, B, C, A, B, C, ...) so that a busy machine slows them alike; medians of
``--repeats`` rounds after warm-up, timed by default in CPU time of this process on one thread, so that other
work on a small shared CPU barely moves the ratios (pass ``--clock wall --threads N`` on a quiet machine).
"""

import argparse
import copy
import time
from collections import OrderedDict

import torch
from torch import nn

from lora_lab import LoRALinear
from timing import median_times

CLOCK = time.process_time  # CPU seconds of this process; --clock wall switches to time.perf_counter


def peft_layer(base: nn.Linear, r: int, alpha: float) -> nn.Module:
    """PEFT's lora.Linear around ``base``, built the way users build it (get_peft_model)."""
    import peft

    wrapper = peft.get_peft_model(nn.Sequential(OrderedDict(proj=base)),
                                  peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"]))
    return wrapper.base_model.model.proj


def fwd_bwd(layer, x):
    def step():
        x.grad = None
        layer(x).sum().backward()
    return step


def fwd(layer, x):
    def step():
        with torch.no_grad():
            layer(x)
    return step


def run(dim: int, tokens: tuple, r: int, dtype: torch.dtype, repeats: int) -> list:
    torch.manual_seed(0)
    frozen = nn.Linear(dim, dim, dtype=dtype).requires_grad_(False)
    ours = LoRALinear(copy.deepcopy(frozen), r=r, lora_alpha=2 * r)
    theirs = peft_layer(copy.deepcopy(frozen), r, 2 * r)
    for layer in (ours, theirs):  # nonzero B, identical in both, so both do the same arithmetic
        nn.init.normal_(layer.lora_B["default"].weight, std=0.01)
    theirs.lora_B["default"].weight.data.copy_(ours.lora_B["default"].weight)
    theirs.lora_A["default"].weight.data.copy_(ours.lora_A["default"].weight)
    x = torch.randn(*tokens, dim, dtype=dtype, requires_grad=True)
    # Same function, so the timings compare like with like. PEFT keeps adapters in fp32 under a bf16 base
    # (its default autocast_adapter_dtype=True); ours follow the base dtype, so they agree to bf16 rounding.
    atol = 4 * torch.finfo(dtype).eps * ours(x).abs().max().item()
    torch.testing.assert_close(ours(x).float(), theirs(x).float(), rtol=0, atol=atol)

    train = median_times({"frozen": fwd_bwd(frozen, x), "lora_lab": fwd_bwd(ours, x),
                          "peft": fwd_bwd(theirs, x)}, repeats, clock=CLOCK)
    ours.merge()
    infer = median_times({"plain": fwd(frozen, x), "merged": fwd(ours, x)}, repeats, clock=CLOCK)
    name = str(dtype).removeprefix("torch.")
    return [
        (f"{name} fwd+bwd", "lora_lab / frozen Linear", train["lora_lab"], train["frozen"], "<= 1.10"),
        (f"{name} fwd+bwd", "lora_lab / PEFT", train["lora_lab"], train["peft"], "<= 1.00"),
        (f"{name} forward", "merged / plain Linear", infer["merged"], infer["plain"], "1.00"),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: on a small shared CPU, OpenMP barriers stall whenever another "
                             "process takes a core, which hits LoRA's many small kernels hardest)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                        help="cpu (default): this process's CPU time, which other processes' load barely moves")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, layer {args.dim}x{args.dim}, r={args.r}, "
          f"input {args.batch}x{args.seq} tokens, median {args.clock} time of {args.repeats}")
    rows = []
    for dtype in args.dtypes.split(","):
        rows += run(args.dim, (args.batch, args.seq), args.r, getattr(torch, dtype), args.repeats)
    print(f"{'case':<18}{'ratio':<28}{'ms':>9}{'vs ms':>9}{'x':>7}  target")
    for case, label, a, b, target in rows:
        print(f"{case:<18}{label:<28}{1e3 * a:9.1f}{1e3 * b:9.1f}{a / b:7.3f}  {target}")


if __name__ == "__main__":
    main()
