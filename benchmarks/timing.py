"""The benchmarks' shared timer: every contender timed in one interleaved (round-robin) run."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def median_times(steps: dict[str, Callable[[], object]], repeats: int, warmup: int = 1,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median seconds per call of each step. Each repeat calls every step once, in turn, so a change in the
    machine's load shifts all of them alike; ``warmup`` calls of each come first (and compile what compiles)."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = clock()
            step()
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}
