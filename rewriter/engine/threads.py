"""How many shards a rewrite works on at once, and how many threads edit each tensor, when
the caller does not say: from the machine.

Each worker keeps about two cores busy: its own thread reads and edits, and its shard
writer's thread moves bytes in the kernel. So one worker per two usable cores, no more
workers than shards, and no more than fit in half the memory available now. Cores left
over when there are fewer shards than that edit each tensor's column chunks in parallel
(the chunks are fixed by the tensor's shape, so the bits do not depend on the thread count).

A quantized rewrite is compute-bound (decoding, editing and re-encoding a weight takes
about 30 times as long as writing it), so its writers idle and it gets one worker per core.
"""
from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, wait
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and ``taskset`` narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def available_memory() -> int | None:
    """``MemAvailable`` from /proc/meminfo, in bytes; None where there is no such file."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def auto_workers(shards: int, worker_bytes: int, compute_bound: bool = False) -> int:
    """Workers for ``shards`` shards when each worker holds ``worker_bytes`` of buffers."""
    workers = min(usable_cores() // (1 if compute_bound else 2), shards)
    memory = available_memory()
    if memory is not None and worker_bytes > 0:
        workers = min(workers, memory // 2 // worker_bytes)
    return max(1, workers)


def auto_edit_threads(workers: int, compute_bound: bool = False) -> int:
    """Threads per worker for the edit math: the cores that ``workers`` workers and their writers
    leave over (compute-bound: whose writers idle)."""
    return max(1, (usable_cores() - (0 if compute_bound else workers)) // workers)


def auto_lanes(threads: int, workers: int, worker_bytes: int, slice_bytes: int) -> int:
    """Slices of a stacked quantized weight each worker may have in flight: as many as there are
    edit threads in all (a worker left alone then fills every core), fewer where one running slice
    each (``slice_bytes``) would not fit, beside the workers' own buffers, in half the memory."""
    memory = available_memory()
    if memory is None or slice_bytes <= 0:
        return threads
    return max(1, min(threads, (memory // 2 - workers * worker_bytes) // slice_bytes))


def run_each(pool: Executor | None, work: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """``work`` of every item, in order: on ``pool``'s threads when given, else inline. Every
    item finishes before a failed one raises, so none writes into a buffer the caller reuses."""
    if pool is None or len(items) <= 1:
        return [work(item) for item in items]
    futures = [pool.submit(work, item) for item in items]
    wait(futures)
    return [f.result() for f in futures]


def map_ordered(pool: Executor | None, work: Callable[[T], R], items: Iterable[T], ahead: int) -> Iterator[R]:
    """``work`` of each item, yielded in order, with up to ``ahead`` items running on ``pool``'s
    threads at once (inline when there is no pool): each holds its own memory until yielded,
    so ``ahead`` bounds it. After a failure every running item finishes before the error
    is raised, as in ``run_each``."""
    if pool is None or ahead <= 1:
        yield from map(work, items)
        return
    running: deque[Future[R]] = deque()
    try:
        for item in items:
            running.append(pool.submit(work, item))
            if len(running) >= ahead:
                yield running.popleft().result()
        while running:
            yield running.popleft().result()
    finally:
        for future in running:
            future.cancel()
        wait(running)
