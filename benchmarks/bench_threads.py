"""Training speed when other programs share the cores: torch's default threads against one thread and passive waiting.

torch runs its operations on one OpenMP thread per core; between two operations the threads spin, waiting
for the next. When other busy programs leave fewer free cores than threads, an operation waits for its
slowest thread, and that thread may be off its core for a whole scheduler slice. A training step of the
shipped model is hundreds of small operations, so it slows by far more than the share of the cores lost.

Each setting runs in a fresh process (the OpenMP settings are read once, at start), on an idle machine and
beside one busy process per core, in interleaved rounds:

    default       torch's choice (one thread per core, spinning)
    1 thread      torch.set_num_threads(1)
    passive       OMP_WAIT_POLICY=PASSIVE: idle threads sleep instead of spinning

    python benchmarks/bench_threads.py [--rounds 2] [--steps 30] [--busy N]

Prints the median milliseconds per LoRA step (batch 16) and each figure's ratio to the default on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

SETTINGS = {"default": ({}, None), "1 thread": ({}, 1), "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, None)}


def child(steps: int, threads: int | None) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    import lora_lab as ll
    from lora_lab.train import make_optimizer, prepare_model, training_step

    task = ll.load_task("vowel")
    config = ll.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = prepare_model(ll.load_base_model("cpu"), "lora", config)
    optimizer = make_optimizer(model, lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    batches = [task.get_batch("train", 16, generator) for _ in range(steps + 5)]
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        training_step(model, batch, optimizer)
        if i >= 5:  # the first steps warm up the allocator and caches
            times.append(time.perf_counter() - start)
    print(f"{1000 * statistics.median(times):.2f}")


def run_setting(name: str, steps: int) -> float:
    env_extra, threads = SETTINGS[name]
    cmd = [sys.executable, __file__, "--child", "--steps", str(steps)]
    cmd += ["--threads", str(threads)] if threads else []
    out = subprocess.run(cmd, env={**os.environ, **env_extra}, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def busy_processes(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--busy", type=int, default=None, help="busy processes beside the step (default: one per core)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.steps, args.threads)
        return 0
    cores = len(os.sched_getaffinity(0))
    busy = cores if args.busy is None else args.busy
    results = {(load, name): [] for load in ("idle", "busy") for name in SETTINGS}
    for _ in range(args.rounds):
        for load in ("idle", "busy"):
            others = busy_processes(busy) if load == "busy" else []
            try:
                for name in SETTINGS:
                    results[load, name].append(run_setting(name, args.steps))
            finally:
                for process in others:
                    process.kill()
                    process.wait()
    print(f"cores: {cores}; a LoRA step of the shipped model, batch 16; busy = {busy} other busy processes")
    print(f"{'setting':<10} {'idle ms':>9} {'busy ms':>9} {'busy / idle':>12} {'vs default idle':>16}")
    reference = statistics.median(results["idle", "default"])
    for name in SETTINGS:
        idle, loaded = (statistics.median(results[load, name]) for load in ("idle", "busy"))
        print(f"{name:<10} {idle:9.1f} {loaded:9.1f} {loaded / idle:11.2f}x {idle / reference:7.2f}x / "
              f"{loaded / reference:5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
