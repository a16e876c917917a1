"""Shared helpers of the benchmark scripts: timing, the bandwidth limit, tables, JSON results.

Timing rules (the machine is shared and noisy):
  * peers are timed in the same process, *interleaved* round by round (``time_interleaved``), so a
    burst of load hits all of them alike; report ratios, and medians over the rounds;
  * warm-up calls (compilation, cache loading, first-touch page faults) are excluded and reported
    separately;
  * the bandwidth limit is measured in the same run: a copy of the same bytes into an existing
    buffer, counting read + write, the faster of NumPy's (one thread) and a multi-threaded copy
    (``parallel_copy``, all numba threads) — a one-thread copy understates what 2 cores can stream.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def time_call(fn: Callable[[], object]) -> float:
    """Wall time of one call, in milliseconds."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeat: int = 7, warmup: int = 1, gap_s: float = 0.0
) -> dict[str, dict]:
    """Median / min / all times (ms) of each named callable, run round-robin ``repeat`` times after
    ``warmup`` untimed rounds. The first warm-up call of each is reported as ``first_ms``.

    Each round runs the peers in a fresh order (seeded shuffle), so no peer always follows the
    same one. (In a fixed order — or a rotated one, which keeps who-follows-whom — whoever ran
    right after a copy of x found x in cache, and whoever ran after PyTorch found the cache full
    of PyTorch's buffers: a bias of up to 0.3 ms per call for cache-sized tensors.)

    ``gap_s``: a pause before each timed call, so that the threads a peer leaves polling for
    work after its call (bnlab's engine, ONNX Runtime, OpenMP) are asleep again and do not take
    a core from the next peer."""
    first = {name: time_call(fn) for name, fn in fns.items()}
    for _ in range(warmup - 1):
        for fn in fns.values():
            fn()
    items = list(fns.items())
    order = random.Random(0)
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in order.sample(items, len(items)):
            if gap_s:
                time.sleep(gap_s)
            runs[name].append(time_call(fn))
    return {
        name: {
            "median_ms": statistics.median(ts),
            "min_ms": min(ts),
            "first_ms": first[name],
            "runs_ms": ts,
        }
        for name, ts in runs.items()
    }


_PARALLEL_COPY = None


def parallel_copy(dst: np.ndarray, src: np.ndarray) -> None:
    """Copy ``src`` into ``dst`` (same shape, C-contiguous) with all numba threads, in 64 KiB
    blocks: the multi-threaded half of the bandwidth limit."""
    global _PARALLEL_COPY
    if _PARALLEL_COPY is None:
        import numba

        @numba.njit(parallel=True, cache=True)
        def _copy(d, s):
            block = 16384
            nblocks = (s.size + block - 1) // block
            for b in numba.prange(nblocks):
                lo = b * block
                hi = min(lo + block, s.size)
                for i in range(lo, hi):
                    d[i] = s[i]

        _PARALLEL_COPY = _copy
    _PARALLEL_COPY(dst.reshape(-1), src.reshape(-1))


def copy_limit(times: dict, nbytes: int) -> dict:
    """The bandwidth limit (GB/s, read + write) from the interleaved timings of the two copies
    ``"copy"`` (NumPy) and ``"copy_parallel"``: the faster one, median and best round."""
    copies = [times[k] for k in ("copy", "copy_parallel") if k in times]
    return {
        "median_gbs": 2 * nbytes / min(c["median_ms"] for c in copies) / 1e6,
        "best_gbs": 2 * nbytes / min(c["min_ms"] for c in copies) / 1e6,
    }


def copy_bandwidth_gbs(nbytes: int, repeat: int = 9) -> dict:
    """The bandwidth limit: a NumPy copy of ``nbytes`` into an existing buffer, GB/s counting the
    read and the write (2·nbytes per copy), median and best over ``repeat`` copies."""
    src = np.ones(max(nbytes // 4, 1), np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # first touch outside the timing
    times = [time_call(lambda: np.copyto(dst, src)) for _ in range(repeat)]
    moved = 2 * src.nbytes
    return {
        "median_gbs": moved / statistics.median(times) / 1e6,
        "best_gbs": moved / min(times) / 1e6,
        "bytes": int(src.nbytes),
    }


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak memory allocated during one call beyond what existed before it (tracemalloc: sees
    NumPy's allocations, not numba's internal ones, which are (C,)-sized partials here)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del result
    return int(peak - base)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A Markdown table: ``columns`` are (key, header, format spec); missing values print as -."""

    def cell(row, key, fmt):
        v = row.get(key)
        if v is None:
            return "-"
        return format(v, fmt) if fmt else str(v)

    lines = [
        "| " + " | ".join(h for _, h, _ in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(r, k, f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join(lines)


def machine_info() -> dict:
    """What the numbers depend on: CPU, versions, threads, and the load when they were taken."""
    info = {
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    if hasattr(os, "getloadavg"):
        info["loadavg_1_5_15"] = list(os.getloadavg())
    for mod in ("numba", "torch"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def result_name(name: str) -> str:
    """An argparse type for ``--name``: a plain file name for ``benchmarks/results/NAME.json``,
    checked before the benchmark runs (not after minutes of timing, when the write would fail)."""
    stem = name[:-5] if name.endswith(".json") else name
    bad = any(ch in stem for ch in "/\\\0") or stem.startswith(".") or len(stem) > 200
    if not stem or bad:
        raise argparse.ArgumentTypeError(
            f"must be a plain file name (written to benchmarks/results/NAME.json), got {name!r}"
        )
    return stem


def write_json(name: str, payload: dict, directory: Path = RESULTS_DIR) -> Path:
    """Write ``payload`` to ``directory/name.json`` atomically (temp file in the same directory,
    fsync, rename, fsync of the directory): a crash never leaves a half-written result."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{name}.json"
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


def malloc_env() -> dict[str, str]:
    """glibc allocator settings of this run (``MALLOC_*``): with a raised mmap threshold glibc
    reuses freed large blocks, and PyTorch's CPU tensors stop faulting in fresh pages, which
    changes PyTorch's times several-fold for 51 MB tensors (see README)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")}
