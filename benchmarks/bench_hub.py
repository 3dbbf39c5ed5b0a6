"""How big a machine a class needs: N students on a real JupyterHub, each running notebooks at the same time.

    python benchmarks/bench_hub.py                          # N = 1, 2, 4; notebooks 02 and 04
    python benchmarks/bench_hub.py --students 1,2,4,8 --json hub.json
    python benchmarks/bench_hub.py --notebooks 01_lora_from_scratch --students 2

For each N, a fresh hub (``benchmarks/hub_driver.py``: jupyterhub + configurable-http-proxy on 127.0.0.1, the
dummy authenticator, the local spawner) lets N students in; all of them at once log in through the hub's REST
API, start their servers and run the notebooks one after another, each in its own kernel, through the proxy.
Printed per N: the class's time to finish and its ratio to N = 1, each notebook's median and slowest time, the
memory of one student's server and kernels (RSS peak: what a per-user limit in its own container must allow; PSS
peak: that student's share of one shared machine), the CPU seconds one student used, the hub and proxy's memory,
and every failure. The load average before each run is printed too: other work on the machine inflates times.

Bounded: at most 32 students, a time limit per class (``--timeout``, default 1800 s) and per cell; the hub and
everything it started are stopped after each N, also on failure, Ctrl-C or SIGTERM. Installs
configurable-http-proxy into .venv/hub/ on first use (``scripts/ensure_hub_proxy.sh``; needs node and npm).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_driver import MAX_STUDENTS, ROOT, Hub, ensure_proxy, run_class  # noqa: E402


def _notebook(name: str) -> Path:
    matches = sorted((ROOT / "notebooks").glob(f"{name}*.ipynb"))
    if len(matches) != 1:
        raise SystemExit(f"--notebooks: {name!r} matches {[m.name for m in matches]} in notebooks/; give one prefix")
    return matches[0]


def _student_counts(text: str) -> list[int]:
    counts = [int(n) for n in text.split(",")]
    if any(not 1 <= n <= MAX_STUDENTS for n in counts):
        raise SystemExit(f"--students: each count must be 1 to {MAX_STUDENTS}, not {text}")
    return counts


def _one_class(n: int, notebooks: list[Path], proxy: Path, timeout_s: float) -> dict:
    load = os.getloadavg()
    hub = Hub([f"student-{i + 1}" for i in range(n)], proxy)
    try:
        hub.start()
        summary, _ = asyncio.run(asyncio.wait_for(run_class(hub, notebooks), timeout_s))
    except (asyncio.TimeoutError, TimeoutError):
        summary = {"students": n, "error": f"the class did not finish within {timeout_s:.0f} s", "rows": []}
    finally:
        leftover = hub.stop()
    summary.update(loadavg_before=[round(x, 2) for x in load], leftover_processes=leftover)
    return summary


def _row(summary: dict, base_wall: float | None, notebooks: list[Path]) -> tuple[str, list[str]]:
    """One line of the printed table, and the class's failures."""
    n, rows = summary["students"], summary["rows"]
    if "error" in summary:
        return f"| {n} | {summary['error']} |", [summary["error"]]
    times = []
    for nb in notebooks:
        secs = [r["seconds"] for row in rows for r in row["notebooks"] if r["path"] == nb.name]
        times.append(f"{statistics.median(secs):.0f} / {max(secs):.0f}" if secs else "-")
    med = {k: statistics.median(row[k] for row in rows) for k in ("rss_peak_mib", "pss_peak_mib", "cpu_s", "spawn_s")
           if all(k in row for row in rows)}
    failures = [f"{row['student']}: {row['failure']}" for row in rows if row["failure"]]
    ratio = f"{summary['wall_s'] / base_wall:.2f}" if base_wall else "-"
    return (f"| {n} | {summary['wall_s']:.0f} | {ratio} | {med.get('spawn_s', 0):.0f} | {' | '.join(times)} | "
            f"{med.get('rss_peak_mib', 0):.0f} | {med.get('pss_peak_mib', 0):.0f} | "
            f"{summary['students_pss_peak_total_mib']:.0f} | {summary['hub_and_proxy_rss_peak_mib']:.0f} | "
            f"{med.get('cpu_s', 0):.0f} | {summary['loadavg_before'][0]:.1f} | {len(failures)} |"), failures


def _interrupted(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--students", default="1,2,4", help="class sizes, comma-separated (default 1,2,4)")
    parser.add_argument("--notebooks", default="02_rank_effects,04_qlora_memory",
                        help="notebook name prefixes in notebooks/, run in this order by every student")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one class may take (default 1800)")
    parser.add_argument("--json", type=Path, help="write every figure, per student, to this file")
    args = parser.parse_args(argv)
    # SIGTERM (and SIGINT, which a shell ignores in background jobs) end the run through the `finally` that stops
    # the hub and everything it started
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _interrupted)
    counts, notebooks = _student_counts(args.students), [_notebook(n) for n in args.notebooks.split(",")]
    proxy = ensure_proxy()
    mem = psutil.virtual_memory()
    print(f"machine: {psutil.cpu_count()} CPUs ({psutil.cpu_count(logical=False)} physical), "
          f"{mem.total / 2**30:.1f} GiB memory; load average now {os.getloadavg()[0]:.1f}")
    print(f"notebooks per student, one after another, each in its own kernel: {', '.join(n.name for n in notebooks)}")
    results, lines, all_failures, base = [], [], [], None
    for n in counts:
        print(f"... {n} student{'s' * (n > 1)}", flush=True)
        summary = _one_class(n, notebooks, proxy, args.timeout)
        results.append(summary)
        if args.json:  # after every class, so a later failure keeps the figures so far
            args.json.write_text(json.dumps({"machine": {"cpus": psutil.cpu_count(), "memory_gib": mem.total / 2**30},
                                             "notebooks": [n.name for n in notebooks], "classes": results}, indent=1))
        if "error" not in summary and base is None and n == 1:
            base = summary["wall_s"]
        line, failures = _row(summary, base, notebooks)
        lines.append(line)
        all_failures += [f"N={n} {f}" for f in failures]
        if summary["leftover_processes"]:
            all_failures.append(f"N={n}: killed after the hub's shutdown: {summary['leftover_processes']}")
    nb_heads = " | ".join(f"{nb.stem[:2]} median / max s" for nb in notebooks)
    print(f"\n| students | class s | vs 1 | spawn s | {nb_heads} | RSS MiB / student | PSS MiB / student | "
          f"PSS MiB all | hub+proxy MiB | CPU s / student | load before | failures |")
    print("|" + "---|" * (11 + len(notebooks)))
    print("\n".join(lines))
    print("\nEach notebook's own kernel (median over every student of every class): RSS peak, CPU seconds")
    for nb in notebooks:
        runs = [r for c in results for row in c["rows"] for r in row["notebooks"]
                if r["path"] == nb.name and "kernel_cpu_s" in r]
        if runs:
            print(f"  {nb.name}: {statistics.median(r['kernel_rss_peak_mib'] for r in runs):.0f} MiB, "
                  f"{statistics.median(r['kernel_cpu_s'] for r in runs):.0f} CPU s ({len(runs)} runs)")
    print("\nfailures:" if all_failures else "\nfailures: none", *all_failures, sep="\n  ")
    return 1 if all_failures else 0


if __name__ == "__main__":
    sys.exit(main())
