"""The worker pool of a conversion (or a verification) and an in-order map with bounded look-ahead.

    pool = make_pool(workers)                  # None for one worker: everything in this process
    for r in parallel_map(fn, jobs, workers, pool, chunksize): ...   # map(fn, jobs), in order

Memory: at most ``window`` jobs (``4 * workers * chunksize`` by default) are submitted beyond
the results consumed, so the bytes in flight scale with workers x image size, never with the
number of images. Workers ignore SIGINT (the parent handles Ctrl-C and terminates them), end
on SIGTERM whatever the parent's handler, and, on Linux, are killed when the parent dies, so
a killed conversion leaves no orphans.
"""
from __future__ import annotations

import signal
import threading
from multiprocessing import Pool
from typing import Iterable, Iterator

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):  # not the parent's handlers: Pool.terminate()
        signal.signal(sig, signal.SIG_DFL)  # ends workers with SIGTERM
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: orphans end when their pipe closes
        pass


def make_pool(workers: int) -> Pool | None:
    """A process pool of ``workers`` (forked now: import what the workers need first), or None
    for one worker."""
    return Pool(workers, initializer=_init_worker) if workers > 1 else None


def close_pool(pool: Pool | None) -> None:
    if pool is not None:
        pool.terminate()
        pool.join()


def _windowed(jobs: Iterator, sem: threading.Semaphore, stop: threading.Event):
    """Yield jobs while the semaphore allows, so archive bytes are not read far ahead."""
    for job in jobs:
        while not sem.acquire(timeout=0.1):
            if stop.is_set():
                return
        yield job


def parallel_map(fn, jobs: Iterable, workers: int, pool: Pool | None, chunksize: int = 16,
                 window: int | None = None):
    """``map(fn, jobs)`` in order, through ``pool`` when given, with at most ``window`` jobs
    (default ``4 * workers * chunksize``) submitted beyond the results consumed."""
    if pool is None or workers <= 1:
        yield from map(fn, jobs)
        return
    window = window or 4 * workers * chunksize
    sem, stop = threading.BoundedSemaphore(window), threading.Event()
    try:
        for result in pool.imap(fn, _windowed(iter(jobs), sem, stop), chunksize):
            sem.release()
            yield result
    finally:
        stop.set()
