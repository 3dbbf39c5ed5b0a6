"""NF4 speed on CPU: lora_lab.nf4 against bitsandbytes and torchao, and a QLoRA training step against PEFT.

Run:  python benchmarks/bench_nf4.py [--size 4096] [--repeats 5]

Prints median wall times measured in this run and the ratios (lower is better for lora_lab):
  quantize    <= 0.5x bitsandbytes
  dequantize  <= 1.5x bitsandbytes and <= 0.2x torchao
  QLoRA step  <= 1.0x PEFT LoRA on bitsandbytes' Linear4bit (forward + backward)
"""

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

from lora_lab import nf4
from lora_lab.qlora import QLoRALinear

warnings.filterwarnings("ignore")


def median_time(fn, repeats):
    fn()  # warm-up (and, for the compiled path, compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def report(name, ours, theirs, target):
    ratio = ours / theirs
    verdict = "met" if ratio <= target else "NOT met"
    print(f"  {name:<44} {ours * 1e3:8.1f} ms vs {theirs * 1e3:8.1f} ms  ratio {ratio:5.2f} "
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

    def ours_q():
        return nf4.quantize_nf4(w)

    def bnb_q():
        return F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)

    start = time.perf_counter()
    q = ours_q()
    print(f"  first lora_lab quantize (includes torch.compile): {time.perf_counter() - start:.1f} s")
    packed, state = bnb_q()
    same = (torch.equal(q.packed, packed.reshape(-1))
            and torch.equal(nf4.dequantize(q), F.dequantize_4bit(packed, state)))
    readable = nf4.quantize(w, fast=False)
    same &= torch.equal(readable.packed, q.packed) and torch.equal(readable.absmax, q.absmax)
    print(f"  bytes and dequantized values equal to bitsandbytes (and the readable path): {same}")
    report("quantize_nf4 vs bnb quantize_4bit", median_time(ours_q, repeats), median_time(bnb_q, repeats), 0.5)
    t_ours = median_time(lambda: nf4.dequantize(q), repeats)
    t_bnb = median_time(lambda: F.dequantize_4bit(packed, state), repeats)
    report("dequantize vs bnb dequantize_4bit", t_ours, t_bnb, 1.5)
    t_readable = median_time(lambda: nf4.dequantize(q, fast=False), repeats)
    print(f"  (readable dequantize path: {t_readable * 1e3:.1f} ms)")
    to_nf4 = torchao_nf4()
    if to_nf4 is not None:
        t_ao_q = median_time(lambda: to_nf4(w), max(1, repeats // 2))
        ao = to_nf4(w)
        print(f"  (torchao to_nf4 quantize: {t_ao_q * 1e3:.1f} ms)")
        report("dequantize vs torchao get_original_weight", t_ours, median_time(ao.get_original_weight, repeats), 0.2)


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

    times = {name: median_time(step(module), repeats) for name, module in layers.items()}
    for backend in ("torch", "bitsandbytes"):
        report(f"QLoRALinear step ({backend}) vs PEFT+bnb", times[backend], times["peft + bnb Linear4bit"], 1.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=5)
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
