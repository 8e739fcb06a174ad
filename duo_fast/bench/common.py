"""Shared benchmark helpers: timing (median of repeats; CUDA events on GPU), peak memory,
environment header, and the ratio table / JSON output every bench entry prints."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

# (name substring, dense bf16 tensor FLOP/s, memory bytes/s): vendor figures for the SXM parts.
from duo_fast.core.devices import DEVICE_PEAKS, device_peaks  # noqa: E402,F401 - re-exported for the bench


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_fn(fn: Callable[[], Any], device: torch.device, repeats: int = 10, warmup: int = 2) -> dict[str, float]:
    """Milliseconds per call: p20, median, p80 over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = [_time_once(fn, device) for _ in range(repeats)]
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]
    return {"p20_ms": q(0.2), "median_ms": statistics.median(times), "p80_ms": q(0.8)}


def time_pair(a: Callable[[], Any], b: Callable[[], Any], device: torch.device, repeats: int = 3,
              min_seconds: float = 0.5, warmup: int = 1) -> tuple[float, float]:
    """Median milliseconds of ``a`` and ``b`` timed alternately (a, b, a, b, ...), so that a slow
    phase of a shared machine hits both paths alike: at least ``repeats`` calls each, more until
    both have run ``min_seconds`` in total (capped at 200 calls each)."""
    for _ in range(warmup):
        a()
        b()
    sync(device)
    ta: list[float] = []
    tb: list[float] = []
    while len(ta) < 200 and (len(ta) < repeats or min(sum(ta), sum(tb)) < 1e3 * min_seconds):
        ta.append(_time_once(a, device))
        tb.append(_time_once(b, device))
    return statistics.median(ta), statistics.median(tb)


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak memory allocated while ``fn`` runs, above what was allocated before (MB; on CPU above
    the lowest point before the peak).
    GPU: the CUDA caching allocator's peak. CPU: tracemalloc does not see torch's allocator,
    so the CPU figure comes from torch's CPU profiler memory accounting."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Every allocation and free is a "[memory]" record with a timestamp and a signed size; walk
    # them in time order and track the running total's maximum. (The per-op aggregates of
    # prof.events() attribute frees to enclosing ops and cannot be ordered in time.)
    records = sorted((e for e in prof.profiler.kineto_results.events()
                      if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                     key=lambda e: e.start_ns())
    # The high-water mark above the lowest point reached before it: a call that first frees an
    # older block (a gradient from the previous call) and then allocates its own is charged for
    # what it allocates, not credited with what it freed.
    cur = low = peak = 0
    for e in records:
        cur += e.nbytes()
        low = min(low, cur)
        peak = max(peak, cur - low)
    return peak / 2**20


def environment(device: torch.device) -> dict[str, str]:
    env = {"torch": torch.__version__, "device": str(device), "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def print_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> None:
    """``columns``: (header, key, format)."""
    cells = [[h for h, _, _ in columns]]
    for r in rows:
        cells.append([("" if r.get(k) is None else format(r[k], f)) for _, k, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for j, c in enumerate(cells):
        print(" | ".join(x.rjust(w) if j else x.ljust(w) for x, w in zip(c, widths)))
        if j == 0:
            print("-+-".join("-" * w for w in widths))


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {path}")


def print_kernel_resources(res: dict[str, Any], module: str, skip: bool) -> None:
    """Compile every block configuration of kernel module ``module`` for sm_90 (in a subprocess),
    print registers, spills and shared memory, and store them in ``res["kernel_resources"]``."""
    if skip:
        return
    from duo_fast.tools.compile_check import print_results, resources_in_subprocess

    print("\nkernel resources, every block configuration the dispatcher can pick, compiled for sm_90:")
    res["kernel_resources"] = resources_in_subprocess(module)
    print_results(res["kernel_resources"])
