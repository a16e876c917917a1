"""The engine's thread pool: the calling thread plus ``n − 1`` workers claim each job's items.

Kernels release the GIL (``nogil=True``), so the threads run in parallel. Work is split in items
that are claimed dynamically from a shared counter: a thread that the OS deschedules on a busy
machine delays only the item it holds, never a whole barrier (with OpenBLAS's or numba-OpenMP's
spinning barriers, one descheduled thread made whole-network latency 10x worse on this shared
2-core machine).
"""

from __future__ import annotations

import itertools
import os
import threading
import time

# What one work item must be worth before a step is shared among threads: waking a worker and
# dispatching an item cost 10-30 µs, so an item should take ~40 µs or more.
MIN_ITEM_FLOPS = 4e6  # ~40 µs of GEMM at ~100 GFLOP/s
MIN_ITEM_BYTES = 1 << 19  # ~40 µs of streaming through L2/L3
# A worker asleep on a condition variable wakes 50-100 µs after the notify on this VM, as long as
# a small layer takes: after each job a worker polls for the next one this long (yielding the GIL
# each time) before it sleeps. The steps of one inference follow each other well within it (at
# batch 1 with 2 threads: ResNet-18 26 -> 15 ms, ResNeXt-50 60 -> 49 ms); idle, the pool sleeps.
SPIN_SECONDS = 2e-3


def n_items(work: float, unit: float, n_threads: int, per_thread: int = 4) -> int:
    """How many items to cut ``work`` into: ``per_thread`` per thread, but none smaller than
    ``unit`` (one item, run on the calling thread, when the whole step is smaller)."""
    if n_threads <= 1:
        return 1
    return max(1, min(per_thread * n_threads, int(work // unit)))


class _Job:
    """One parallel call: items claimed from a shared counter by whoever is running."""

    def __init__(self, fn, items):
        self.fn, self.items, self.n = fn, items, len(items)
        self.claim = itertools.count()  # next() on a count is atomic under the GIL
        self.lock = threading.Lock()
        self.done = 0
        self.finished = threading.Event()
        self.error: BaseException | None = None  # the first item that raised, re-raised by run

    def work(self) -> None:
        while True:
            i = next(self.claim)
            if i >= self.n:
                return
            try:
                self.fn(*self.items[i])
            except BaseException as err:  # noqa: BLE001 - handed to the caller, never lost
                self.error = self.error or err
            with self.lock:
                self.done += 1
                if self.done == self.n:
                    self.finished.set()


class WorkPool:
    """The calling thread plus ``n_threads − 1`` daemon workers sharing each job's items.

    The caller always works too and only waits for items another thread has already claimed, so
    a worker that is slow to wake (or descheduled on a loaded machine) costs at most one item.
    The kernels release the GIL (``nogil=True``), so the threads run in parallel.
    """

    def __init__(self, n_threads: int):
        self.n_threads = max(1, int(n_threads))
        self._run_lock = threading.Lock()  # one job at a time, whoever calls
        self._cv = threading.Condition()
        self._job: _Job | None = None
        self._serial = 0
        for _ in range(self.n_threads - 1):
            threading.Thread(target=self._worker, daemon=True, name="bnlab-gemm").start()

    def run(self, fn, items) -> None:
        if self.n_threads == 1 or len(items) == 1:
            for it in items:
                fn(*it)
            return
        job = _Job(fn, items)
        with self._run_lock:
            with self._cv:
                self._job = job
                self._serial += 1
                self._cv.notify_all()
            job.work()
            job.finished.wait()
        if job.error is not None:
            raise job.error

    def _worker(self) -> None:
        seen = 0
        while True:
            deadline = time.perf_counter() + SPIN_SECONDS
            while self._serial == seen and time.perf_counter() < deadline:
                time.sleep(0)  # yields the GIL: the caller's Python between steps runs
            with self._cv:
                while self._serial == seen:
                    self._cv.wait()
                seen, job = self._serial, self._job
            job.work()


_POOLS: dict[int, WorkPool] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(n_threads: int) -> WorkPool:
    """One pool per thread count for the whole process: compiling many engines starts no new
    threads (the workers are daemons that sleep between jobs)."""
    with _POOLS_LOCK:
        if n_threads not in _POOLS:
            _POOLS[n_threads] = WorkPool(n_threads)
        return _POOLS[n_threads]


def default_threads() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1
