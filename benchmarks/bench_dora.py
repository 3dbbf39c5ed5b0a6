"""Time lora_lab's DoRA layer against PEFT's DoRA layer and against plain LoRA, interleaved in one run.

Forward + backward of one (dim x dim) layer with r=8 on a batch of tokens, the input requiring grad as it does
inside a network. DoRA adds, per step, ``B A`` (out, in), the norm of ``W0 + s B A`` per output feature, and a
rescaling of the output; PEFT's own MetaMathQA run found DoRA about 26 % slower than LoRA end to end (1191 s vs
942 s), on a whole model where attention and the unadapted layers dilute the per-layer cost measured here.
Targets: lora_lab DoRA <= 1.0x PEFT's DoRA; the cost over LoRA is reported, for both libraries.

    python benchmarks/bench_dora.py                   # 8 x 128 tokens, 4096 x 4096, fp32 and bf16
    python benchmarks/bench_dora.py --dim 1024 --repeats 5

As in bench_lora.py: the variants run round-robin (A, B, C, D, A, ...), medians of ``--repeats`` rounds after
warm-up, timed by default in CPU time of this process on one thread.
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


def peft_layer(base: nn.Linear, r: int, alpha: float, use_dora: bool) -> nn.Module:
    """PEFT's lora.Linear around ``base``, built the way users build it (get_peft_model)."""
    import peft

    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], use_dora=use_dora)
    return peft.get_peft_model(nn.Sequential(OrderedDict(proj=base)), config).base_model.model.proj


def fwd_bwd(layer, x):
    def step():
        x.grad = None
        for p in layer.parameters():
            p.grad = None
        layer(x).sum().backward()
    return step


def copy_adapter(ours: LoRALinear, theirs: nn.Module) -> None:
    """Nonzero B and a moved m in ``ours``, copied into ``theirs``, so both do the same arithmetic."""
    with torch.no_grad():
        nn.init.normal_(ours.lora_B["default"].weight, std=0.01)
        for table in ("lora_A", "lora_B", "lora_magnitude_vector"):
            if "default" in getattr(ours, table):
                getattr(theirs, table)["default"].weight.copy_(getattr(ours, table)["default"].weight)


def run(dim: int, tokens: tuple, r: int, dtype: torch.dtype, repeats: int) -> list:
    torch.manual_seed(0)
    frozen = nn.Linear(dim, dim, dtype=dtype).requires_grad_(False)
    layers = {}
    for use_dora in (True, False):
        kind = "dora" if use_dora else "lora"
        layers[f"lora_lab {kind}"] = LoRALinear(copy.deepcopy(frozen), r=r, lora_alpha=2 * r, use_dora=use_dora)
        layers[f"peft {kind}"] = peft_layer(copy.deepcopy(frozen), r, 2 * r, use_dora)
        copy_adapter(layers[f"lora_lab {kind}"], layers[f"peft {kind}"])
    x = torch.randn(*tokens, dim, dtype=dtype, requires_grad=True)
    # Same function, so the timings compare like with like. PEFT keeps adapters in fp32 under a bf16 base
    # (autocast_adapter_dtype=True) and so runs DoRA's norm in fp32; ours follow the base dtype.
    for kind in ("dora", "lora"):
        ours, theirs = layers[f"lora_lab {kind}"](x).float(), layers[f"peft {kind}"](x).float()
        atol = 8 * torch.finfo(dtype).eps * ours.abs().max().item()
        torch.testing.assert_close(ours, theirs, rtol=0, atol=atol)
    t = median_times({name: fwd_bwd(layer, x) for name, layer in layers.items()}, repeats, clock=CLOCK)
    name = str(dtype).removeprefix("torch.")
    return [
        (f"{name} fwd+bwd", "lora_lab DoRA / PEFT DoRA", t["lora_lab dora"], t["peft dora"], "<= 1.00"),
        (f"{name} fwd+bwd", "lora_lab DoRA / lora_lab LoRA", t["lora_lab dora"], t["lora_lab lora"], "cost"),
        (f"{name} fwd+bwd", "PEFT DoRA / PEFT LoRA", t["peft dora"], t["peft lora"], "cost"),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, as in bench_lora.py)")
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
    print(f"{'case':<18}{'ratio':<32}{'ms':>9}{'vs ms':>9}{'x':>7}  target")
    for case, label, a, b, target in rows:
        print(f"{case:<18}{label:<32}{1e3 * a:9.1f}{1e3 * b:9.1f}{a / b:7.3f}  {target}")


if __name__ == "__main__":
    main()
