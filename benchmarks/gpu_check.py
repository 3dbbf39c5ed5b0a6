"""One prepared GPU check: the kit's claims measured on CUDA in one short run.

    python benchmarks/gpu_check.py [--json results.json]

Four parts, each printed as a table and written in full to the JSON file:

1. NF4 on CUDA: `lora_lab.nf4` against bitsandbytes' CUDA ``quantize_4bit`` / ``dequantize_4bit`` (packed codes
   and dequantized values, several shapes, dtypes and block sizes), and dequantize bandwidth of both against a
   plain device-to-device copy of the same output bytes.
2. Memory: the kit's base model and a ~1B-parameter configuration of the same architecture (random weights),
   full fine-tuning, LoRA and QLoRA: the CUDA peak of a training step beside `lora_lab.train.measure`'s
   breakdown and `estimate(...)` for the same settings (target: both within 10% of the peak).
3. Speed: steps per second of the kit's trainer against PEFT (+ bitsandbytes for QLoRA), from
   ``benchmarks/bench_train.py``.
4. The test suite's GPU-marked tests (``pytest -m gpu``), if any.

Without CUDA the GPU parts are skipped with a message; part 1 still runs on the CPU (small shapes) and part 2
compares the estimate with the measured breakdown on the CPU, so the script itself is tested in CI.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora_lab.estimator import estimate  # noqa: E402
from lora_lab.lora import LoraConfig  # noqa: E402
from lora_lab.checkpoint import load_base_model  # noqa: E402
from lora_lab.model import LlamaConfig, LlamaForCausalLM  # noqa: E402
from lora_lab.nf4 import quantize  # noqa: E402
from lora_lab.train import make_optimizer, measure, prepare_model  # noqa: E402

# ~1.1B parameters: TinyLlama-1.1B's published shape (grouped-query attention with 4 key/value heads).
ONE_B = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                    num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
METHODS = ("full", "lora", "qlora")


def timed(fn, repeats: int = 20) -> float:
    """Median seconds of ``fn()`` after one warm-up call, synchronizing CUDA around each call."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------- 1. NF4

def nf4_agreement(device: str) -> list[dict]:
    """Packed bytes and dequantized values of lora_lab.nf4 against bitsandbytes on ``device``."""
    import bitsandbytes.functional as bnbf

    # Note: on the CPU, bitsandbytes 0.50's C++ dequantize misreads the scales when a row's length is even but
    # not a multiple of the block size (see tests/test_nf4.py); the CPU shapes avoid that case, CUDA's don't.
    shapes = ([(4096, 4096), (1000, 333), (96, 256), (4097,), (7,)] if device == "cuda"
              else [(2, 4096), (1000, 3), (4097,), (7,)])
    blocksizes = (64, 128, 256, 4096) if device == "cuda" else (64, 4096)
    rows = []
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for blocksize in blocksizes:
                for double_quant in (False, True):
                    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
                    ours = quantize(w, "nf4", blocksize, double_quant)
                    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, quant_type="nf4",
                                                       compress_statistics=double_quant)
                    rows.append(dict(shape=list(shape), dtype=str(dtype), blocksize=blocksize,
                                     double_quant=double_quant,
                                     packed_equal=torch.equal(ours.packed.reshape(-1), packed.reshape(-1)),
                                     dequantized_equal=torch.equal(ours.dequantize().reshape(-1),
                                                                   bnbf.dequantize_4bit(packed, state).reshape(-1))))
    return rows


def nf4_bandwidth() -> list[dict]:
    """GB/s of dequantizing a bf16 weight: lora_lab, bitsandbytes, and a copy of the same output bytes."""
    import bitsandbytes.functional as bnbf

    rows = []
    for n in (4096, 8192):
        w = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        ours = quantize(w, "nf4", 64, True)
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        out = torch.empty_like(w)
        moved = ours.nbytes + w.numel() * w.element_size()  # read codes and scales, write 16-bit weights
        for name, fn in (("lora_lab", ours.dequantize), ("bitsandbytes", lambda: bnbf.dequantize_4bit(packed, state)),
                         ("copy", lambda: out.copy_(w))):
            seconds = timed(fn)
            nbytes = 2 * w.numel() * w.element_size() if name == "copy" else moved
            rows.append(dict(shape=[n, n], impl=name, ms=seconds * 1e3, gb_per_s=nbytes / seconds / 1e9))
    return rows


# -------------------------------------------------------------------------------------- 2. memory

def memory_rows(name: str, config: LlamaConfig | None, device: str, dtype: torch.dtype, batch_size: int,
                seq_len: int) -> list[dict]:
    """Measured breakdown and CUDA peak of one training step against estimate(), for each method."""
    rows = []
    for method in METHODS:
        torch.manual_seed(0)
        if config is None:
            model, cfg = load_base_model(device="cpu"), None
            cfg = model.config
        else:
            cfg = config
            with torch.device(device):
                model = LlamaForCausalLM(cfg)
        model = model.to(device, dtype)
        lora = None if method == "full" else LoraConfig(lora_alpha=16)
        prepare_model(model, method, lora, {"compute_dtype": dtype} if method == "qlora" else None)
        model.to(device)
        optimizer = make_optimizer(model, "adamw", 1e-4)
        ids = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), device=device)
        measure(model, (ids, ids), optimizer)  # first step allocates the optimizer state
        breakdown = measure(model, (ids, ids), optimizer)
        est = estimate(cfg, method, batch_size=batch_size, seq_len=seq_len, gradient_checkpointing=False,
                       dtype=dtype, optimizer_state_dtype=None)
        peak = breakdown.peak_cuda
        rows.append(dict(model=name, method=method, dtype=str(dtype), batch=[batch_size, seq_len],
                         measured=breakdown.to_dict(), measured_total=breakdown.total,
                         estimate_total=est.total_bytes, peak_cuda=peak,
                         measured_over_peak=breakdown.total / peak if peak else None,
                         estimate_over_peak=est.total_bytes / peak if peak else None,
                         estimate_over_measured=est.total_bytes / breakdown.total))
        del model, optimizer
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------- 3-4. speed, tests

def speed_rows(steps: int) -> list[dict]:
    import bench_train
    from lora_lab.data import load_task

    args = argparse.Namespace(steps=steps, batch_size=32, device="cuda")
    task, rows = load_task(), []
    for method in ("lora", "qlora"):
        kit = bench_train.rate(bench_train.kit_steps(method, task, args))
        peft = bench_train.rate(bench_train.peft_steps(method, task, args))
        rows.append(dict(method=method, kit_steps_per_s=kit, peft_steps_per_s=peft, ratio=kit / peft))
    return rows


def gpu_tests() -> dict:
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
                          cwd=root, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1:] or [""]
    return dict(returncode=proc.returncode, summary=tail[0], none_selected=proc.returncode == 5)


# ----------------------------------------------------------------------------------------------- main

def run_part(results: dict, key: str, fn, *args):
    """Run one part; an error is recorded and printed, and the other parts still run."""
    start = time.perf_counter()
    try:
        results[key] = fn(*args)
    except Exception as error:  # a GPU run is one shot: report every part that works
        results[key] = {"error": f"{type(error).__name__}: {error}"}
        print(f"[{key}] failed: {results[key]['error']}")
    print(f"[{key}] {time.perf_counter() - start:.1f} s")


def print_tables(results: dict) -> None:
    rows = results.get("nf4_agreement")
    if isinstance(rows, list):
        ok = sum(r["packed_equal"] and r["dequantized_equal"] for r in rows)
        print(f"\nNF4 vs bitsandbytes ({results['device']}): {ok}/{len(rows)} cases bit-identical")
        for r in rows:
            if not (r["packed_equal"] and r["dequantized_equal"]):
                print(f"  differs: {r}")
    for r in results.get("nf4_bandwidth", []) if isinstance(results.get("nf4_bandwidth"), list) else []:
        print(f"  dequantize {r['shape']} {r['impl']:<13} {r['ms']:8.3f} ms {r['gb_per_s']:8.1f} GB/s")
    rows = results.get("memory")
    if isinstance(rows, list):
        print(f"\n{'model':<8}{'method':<7}{'measured':>11}{'estimate':>11}{'CUDA peak':>11}"
              f"{'meas/peak':>11}{'est/peak':>10}{'est/meas':>10}")
        for r in rows:
            gib = lambda b: f"{b / 2**30:.3f}G" if b else "-"  # noqa: E731
            ratio = lambda x: f"{x:.3f}" if x else "-"  # noqa: E731
            print(f"{r['model']:<8}{r['method']:<7}{gib(r['measured_total']):>11}{gib(r['estimate_total']):>11}"
                  f"{gib(r['peak_cuda']):>11}{ratio(r['measured_over_peak']):>11}{ratio(r['estimate_over_peak']):>10}"
                  f"{ratio(r['estimate_over_measured']):>10}")
    rows = results.get("speed")
    if isinstance(rows, list):
        print(f"\n{'method':<8}{'kit steps/s':>13}{'PEFT steps/s':>14}{'kit/PEFT':>10}")
        for r in rows:
            print(f"{r['method']:<8}{r['kit_steps_per_s']:>13.1f}{r['peft_steps_per_s']:>14.1f}{r['ratio']:>9.2f}x")
    if "gpu_tests" in results:
        print(f"\nGPU-marked tests: {results['gpu_tests']}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the full results here")
    parser.add_argument("--steps", type=int, default=30, help="training steps per side in the speed part")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    results = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__}
    if not cuda:
        torch._dynamo.config.disable = True  # bitsandbytes' CPU kernels would recompile for every small shape
        print("No CUDA device: GPU parts skipped (NF4 bandwidth, CUDA peak memory, the ~1B model, speed, "
              "GPU tests). Running the CPU versions of parts 1 and 2.")
    run_part(results, "nf4_agreement", nf4_agreement, device)
    if cuda:
        run_part(results, "nf4_bandwidth", nf4_bandwidth)
        run_part(results, "memory", lambda: memory_rows("base", None, "cuda", torch.float32, 32, 32)
                 + memory_rows("1.1B", ONE_B, "cuda", torch.bfloat16, 4, 512))
        run_part(results, "speed", speed_rows, args.steps)
        run_part(results, "gpu_tests", gpu_tests)
    else:
        run_part(results, "memory", memory_rows, "base", None, "cpu", torch.float32, 8, 32)
    print_tables(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
        print(f"\nfull results: {args.json}")
    return results


if __name__ == "__main__":
    main()
