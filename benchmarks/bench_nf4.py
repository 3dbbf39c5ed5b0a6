"""NF4 speed on CPU: lora_lab.nf4 against bitsandbytes and torchao, and a QLoRA training step against PEFT.

Run:  python benchmarks/bench_nf4.py [--size 4096] [--repeats 15]

Every group of rows is timed in one interleaved run (each repeat calls every contender once, in turn), so
a change in the machine's load shifts all of them alike. Prints median wall times and the ratios (lower is
better for lora_lab), with the targets:
  quantize                      <= 0.5x bitsandbytes
  dequantize (a fresh output)   <= 1.0x bitsandbytes, <= 0.2x torchao
  dequantize into a reused out= <= 1.0x bitsandbytes (whose CPU kernel has no out=)
  QLoRA step                    <= 1.0x PEFT LoRA on bitsandbytes' Linear4bit (forward + backward)
Dequantize is memory-bound, so beside it the floor: a plain copy of a tensor of the output's size, into a
fresh tensor (the operating system maps and zeroes each new page on its first write) and into a reused one.
"""

import argparse
import time
import warnings

import torch
from torch import nn

from lora_lab import nf4
from lora_lab.qlora import QLoRALinear
from timing import median_times

warnings.filterwarnings("ignore")


def report(name, ours, theirs, target):
    ratio = ours / theirs
    verdict = "met" if ratio <= target else "NOT met"
    print(f"  {name:<48} {ours * 1e3:8.2f} ms vs {theirs * 1e3:8.2f} ms  ratio {ratio:5.2f} "
          f"(target <= {target}: {verdict})")


def torchao_nf4():
    try:
        from torchao.quantization import to_nf4
        return to_nf4
    except Exception as error:  # noqa: BLE001 - any import failure means "not available"
        print(f"  torchao NF4 unavailable ({type(error).__name__}: {error})")
        return None


def bench_quantization(w, repeats):
    import bitsandbytes.functional as F

    start = time.perf_counter()
    q = nf4.quantize_nf4(w)
    print(f"  first lora_lab quantize (includes torch.compile): {time.perf_counter() - start:.1f} s")
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    same = (torch.equal(q.packed, packed.reshape(-1))
            and torch.equal(nf4.dequantize(q), F.dequantize_4bit(packed, state)))
    readable = nf4.quantize(w, fast=False)
    same &= torch.equal(readable.packed, q.packed) and torch.equal(readable.absmax, q.absmax)
    print(f"  bytes and dequantized values equal to bitsandbytes (and the readable path): {same}")

    t = median_times({"ours": lambda: nf4.quantize_nf4(w),
                     "bnb": lambda: F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)},
                    max(3, repeats // 3))
    report("quantize_nf4 vs bnb quantize_4bit", t["ours"], t["bnb"], 0.5)

    out, source, copy_target = torch.empty_like(w), w.clone(), torch.empty_like(w)
    contenders = {"fresh": lambda: nf4.dequantize(q), "out": lambda: nf4.dequantize(q, out=out),
                  "bnb": lambda: F.dequantize_4bit(packed, state), "copy fresh": source.clone,
                  "copy reused": lambda: copy_target.copy_(source)}
    to_nf4 = torchao_nf4()
    if to_nf4 is not None:
        contenders["torchao"] = to_nf4(w).get_original_weight
    t = median_times(contenders, repeats)
    report("dequantize vs bnb dequantize_4bit", t["fresh"], t["bnb"], 1.0)
    report("dequantize(out=reused buffer) vs bnb dequantize_4bit", t["out"], t["bnb"], 1.0)
    if to_nf4 is not None:
        report("dequantize vs torchao get_original_weight", t["fresh"], t["torchao"], 0.2)
    mb = w.numel() * w.element_size() / 1e6
    print(f"  the floor, a copy of the {mb:.1f} MB output: {t['copy fresh'] * 1e3:.2f} ms into a fresh tensor, "
          f"{t['copy reused'] * 1e3:.2f} ms into a reused one")
    print(f"  over the floor: lora_lab {t['fresh'] / t['copy fresh']:.2f}x fresh, {t['out'] / t['copy reused']:.2f}x "
          f"reused; bitsandbytes {t['bnb'] / t['copy fresh']:.2f}x fresh")
    t_readable = median_times({"readable": lambda: nf4.dequantize(q, fast=False)}, max(1, repeats // 5))["readable"]
    print(f"  (readable dequantize path, for reference: {t_readable * 1e3:.1f} ms)")


def bench_step(size, repeats, batch, seq, r=16):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    dtype = torch.bfloat16
    dense = nn.Linear(size, size, bias=False, dtype=dtype)
    x = torch.randn(batch, seq, size, dtype=dtype)

    class Wrap(nn.Module):
        def __init__(self, proj):
            super().__init__()
            self.proj = proj

        def forward(self, inputs):
            return self.proj(inputs)

    four_bit = bnb.nn.Linear4bit(size, size, bias=False, compute_dtype=dtype, quant_type="nf4")
    four_bit.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    four_bit.weight._quantize("cpu")
    peft_model = get_peft_model(Wrap(four_bit), LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"]))
    layers = {"peft + bnb Linear4bit": peft_model}
    for backend in ("torch", "bitsandbytes"):
        layers[backend] = QLoRALinear(dense, r=r, lora_alpha=2 * r, compute_dtype=dtype, backend=backend)

    def step(module):
        def run():
            module.zero_grad(set_to_none=True)
            module(x.detach().requires_grad_(True)).float().square().mean().backward()
        return run

    times = median_times({name: step(module) for name, module in layers.items()}, repeats)
    for backend in ("torch", "bitsandbytes"):
        report(f"QLoRALinear step ({backend}) vs PEFT+bnb", times[backend], times["peft + bnb Linear4bit"], 1.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; weight {args.size}x{args.size} bfloat16")
    w = torch.randn(args.size, args.size, dtype=torch.bfloat16) * 0.02
    bench_quantization(w, args.repeats)
    print(f"QLoRA forward+backward, x: ({args.batch}, {args.seq}, {args.size}) bfloat16, r=16")
    bench_step(args.size, args.repeats, args.batch, args.seq)


if __name__ == "__main__":
    main()
