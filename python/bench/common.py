"""Shared plumbing for the benchmarks in python/bench/.

Every benchmark times our code and its peer in the same process, reports ratios, and writes one
JSON file through `write_results`; `summarize.py` turns a folder of them into one markdown table.
Machines are shared and noisy, so figures are medians over repeats, never single runs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import resource
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from tsqlora_ext.files import atomic_write

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUICK_DIR = RESULTS_DIR / "quick"  # smoke runs: never over the published results
_quick = False  # this process's --quick, recorded by write_results


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None,
               argv: list[str] | None = None):
    """The flags every benchmark takes: --device, --quick, --out (default results/, or
    results/quick/ with --quick, so a smoke run never overwrites a published result)."""
    global _quick
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true",
                   help="fewer shapes and repeats (smoke run; written under results/quick/)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the results JSON (default results/, results/quick/ with --quick)")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    _quick = args.quick
    if args.out is None:
        args.out = QUICK_DIR if args.quick else RESULTS_DIR
    return args


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_ms(fn: Callable[[], object], device: str, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of fn() in milliseconds, device-synchronised around each call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def round_robin_ms(fns: dict[str, Callable[[], object]], device: str, repeats: int,
                   warmup: int = 1, between: Callable[[], object] | None = None) -> dict[str, float]:
    """Median ms of each fn, timed round-robin (one call of each per round, the order rotating from
    round to round), so machine noise hits all of them alike; `warmup` untimed calls each first
    (allocator, BLAS handles, lazy inits).
    `between` runs untimed before every timed call (e.g. cache_evictor), so no fn inherits the
    data the one before it left in cache."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    keys = list(fns)
    for i in range(repeats):
        # Each round starts one further along, so every fn takes every place in the round in turn
        # (a fixed order gave one fn the first place, after the previous round's last, every time).
        for k in keys[i % len(keys):] + keys[:i % len(keys)]:
            fn = fns[k]
            if between is not None:
                between()
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def cache_evictor(device: str, mb: int = 128) -> Callable[[], None]:
    """A callable that streams through `mb` MiB (beyond this machine's 32 MiB L3 and an H200's
    50 MB L2), leaving the caches as a training step leaves them for the next bookkeeping call."""
    buf = torch.empty(mb << 18, device=device)  # mb MiB of float32
    return lambda: buf.add_(1.0)


def peak_memory_mb(fn: Callable[[], object], device: str) -> float:
    """Peak device memory (CUDA) of one call of fn(), in MiB. On CPU: the process's peak RSS so far
    (ru_maxrss), which only ever grows; callers report it as an upper bound."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    fn()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _device_events(fn: Callable[[], object], device: str, iters: int) -> list[tuple[str, float]]:
    """(name, µs) of every kernel fn() ran over `iters` calls, from the profiler's device
    timestamps (on CPU: every op's self time, the nearest thing)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
        sync(device)
    want = DeviceType.CUDA if cuda else DeviceType.CPU
    return [(e.name, e.device_time_total if cuda else e.self_cpu_time_total)
            for e in prof.events() if e.device_type == want]


def cuda_kernel_ms(fn: Callable[[], object], iters: int = 20) -> float:
    """Mean GPU time per call of fn() spent in its kernels (copies and memsets left out), from the
    profiler's device timestamps: what the device did, without the host's launch overhead that
    a wall clock (or events around back-to-back calls) also counts when the host is the
    bottleneck."""
    us = sum(t for name, t in _device_events(fn, "cuda", iters)
             if "memcpy" not in name.lower() and "memset" not in name.lower())
    if us == 0:
        print("cuda_kernel_ms: the profiler recorded no kernel time; reporting NaN")
        return float("nan")
    return us / iters / 1e3


def kernel_table(fn: Callable[[], object], device: str, label: str, iters: int = 10,
                 top: int = 15) -> list[dict]:
    """Rows {set, kernel, us_per_call, launches_per_call} of fn()'s `top` costliest kernels, so a
    device run records where the time goes, not only how much there is."""
    total: dict[str, list[float]] = {}
    for name, t in _device_events(fn, device, iters):
        acc = total.setdefault(name, [0.0, 0])
        acc[0] += t
        acc[1] += 1
    ranked = sorted(total.items(), key=lambda kv: -kv[1][0])[:top]
    # Kernel names are C++ template spellings: cut them to a table cell.
    return [{"set": label, "kernel": name.replace("|", "/")[:100],
             "us_per_call": round(t / iters, 2), "launches_per_call": round(n / iters, 2)}
            for name, (t, n) in ranked]


def machine(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def goal(name: str, measured: float, target: float, higher_is_better: bool, unit: str = "") -> dict:
    met = measured >= target if higher_is_better else measured <= target
    # Four significant digits: a relative error of 2.4e-7 must not print as 0.
    return {"goal": name, "measured": float(f"{measured:.4g}"), "target": target,
            "direction": ">=" if higher_is_better else "<=", "unit": unit, "met": bool(met)}


def write_results(bench: str, device: str, out: Path, rows: list[dict], goals: list[dict],
                  notes: str = "", quick: bool | None = None) -> Path:
    """Write <out>/<bench>-<device>.json atomically and print where it went. ``quick`` (default:
    this process's --quick) is recorded, so a smoke run's figures can never pass for a result."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "bench": bench,
        "device": device,
        "quick": _quick if quick is None else quick,
        "machine": machine(device),
        "date": _dt.date.today().isoformat(),
        "torch": torch.__version__,
        "rows": rows,
        "goals": goals,
        "notes": notes,
    }
    path = out / f"{bench}-{device}.json"
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2) + "\n"))
    print(f"wrote {path}")
    return path
