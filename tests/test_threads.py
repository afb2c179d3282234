"""The automatic worker count: one per two cores (one per core for a quantized rewrite), bounded by
shards and by available memory; the edit threads that use the cores left over; and how many
pieces a worker queues for its writer."""
from __future__ import annotations

import math
from types import SimpleNamespace
from typing import cast

import pytest
import torch

from rewriter.engine import rewrite, threads
from rewriter.engine.buffers import Scratch
from rewriter.engine.edit import TensorEdit
from rewriter.io.checkpoint import Checkpoint
from rewriter.plugins.strategies import subtractive
from rewriter.engine.threads import auto_workers


@pytest.mark.parametrize("cores, memory, shards, worker_bytes, expected", [
    (16, 64 << 30, 30, 1 << 30, 8),  # one worker per two cores
    (16, 64 << 30, 3, 1 << 30, 3),  # no more workers than shards
    (16, 6 << 30, 30, 1 << 30, 3),  # half the available memory holds three
    (2, 64 << 30, 30, 1 << 30, 1),
    (1, 64 << 30, 30, 1 << 30, 1),  # never fewer than one
    (16, 1 << 20, 30, 1 << 30, 1),
    (16, None, 30, 1 << 30, 8),  # memory unknown: cores and shards decide
    (16, 64 << 30, 30, 0, 8),  # nothing to edit
])
def test_auto_workers(monkeypatch: pytest.MonkeyPatch, cores: int, memory: int | None, shards: int,
                      worker_bytes: int, expected: int) -> None:
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(threads, "available_memory", lambda: memory)
    assert auto_workers(shards, worker_bytes) == expected


@pytest.mark.parametrize("cores, memory, shards, expected_workers, expected_threads", [
    (16, 64 << 30, 30, 16, 1),  # a quantized rewrite: one worker per core
    (2, 64 << 30, 30, 2, 1),  # this machine
    (2, 64 << 30, 1, 1, 2),  # one shard: both cores edit its weights
    (16, 64 << 30, 4, 4, 4),
    (16, 6 << 30, 30, 3, 5),  # memory bounds the workers; the cores they leave edit chunks
])
def test_a_quantized_rewrite_is_compute_bound(monkeypatch: pytest.MonkeyPatch, cores: int, memory: int,
                                              shards: int, expected_workers: int, expected_threads: int) -> None:
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(threads, "available_memory", lambda: memory)
    workers = auto_workers(shards, 1 << 30, compute_bound=True)
    assert (workers, threads.auto_edit_threads(workers, compute_bound=True)) == (expected_workers, expected_threads)


@pytest.mark.parametrize("memory, expected", [
    (64 << 30, 16),  # every edit thread takes a slice
    (8 << 30, 4),  # half the memory (4 GiB), less two workers' 1 GiB buffers, holds four 0.5 GiB slices
    (2 << 30, 1),  # not even one beside the buffers: one at a time, its chunks on the threads
    (None, 16),
])
def test_auto_lanes(monkeypatch: pytest.MonkeyPatch, memory: int | None, expected: int) -> None:
    monkeypatch.setattr(threads, "available_memory", lambda: memory)
    assert threads.auto_lanes(16, 2, 1 << 30, 1 << 29) == expected


@pytest.mark.parametrize("ahead", [1, 3])
def test_map_ordered_keeps_order_and_bounds_what_runs(ahead: int) -> None:
    """Results come in the items' order; no more than ``ahead`` items are submitted and not yet
    yielded; after a failure the running items finish before the error reaches the caller."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    lock, live, most, finished = threading.Lock(), [0], [0], []

    def work(i: int) -> int:
        with lock:
            live[0] += 1
            most[0] = max(most[0], live[0])
        time.sleep(0.01 * (i % 3))
        with lock:
            live[0] -= 1
        if i == 7:
            raise ValueError("seven")
        finished.append(i)
        return i * i

    with ThreadPoolExecutor(4) as pool:
        got = []
        with pytest.raises(ValueError, match="seven"):
            got.extend(threads.map_ordered(pool, work, range(10), ahead))
        assert live[0] == 0  # nothing left running once the error is raised
    assert got == [i * i for i in range(7)]
    assert most[0] <= ahead


def test_the_machine_is_read() -> None:
    assert threads.usable_cores() >= 1
    memory = threads.available_memory()
    assert memory is None or memory > 0


@pytest.mark.parametrize("cores, workers, expected", [
    (2, 1, 1),  # this machine: one worker, its writer, one edit thread
    (16, 8, 1),  # enough shards: workers use the cores
    (16, 2, 7),  # two shards: the other cores edit column chunks
    (16, 1, 15),
    (1, 1, 1),
])
def test_auto_edit_threads(monkeypatch: pytest.MonkeyPatch, cores: int, workers: int, expected: int) -> None:
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    assert threads.auto_edit_threads(workers) == expected


@pytest.mark.parametrize("shape, stacked, expected", [
    ((3840, 15360), False, 1),  # a 118 MB bf16 down_proj: one queued while the next is read
    ((8, 4096, 4096), True, 2),  # 33.5 MB slices: two queued
    ((32, 2880, 2880), True, Scratch.MAX_PENDING),  # gpt-oss's 16.6 MB expert slices: as many as allowed
])
def test_small_pieces_queue_deeper(shape: tuple[int, ...], stacked: bool, expected: int) -> None:
    entry = SimpleNamespace(shape=shape, start=0, end=2 * math.prod(shape))
    ckpt = cast(Checkpoint, SimpleNamespace(entry=lambda name: entry))
    edit = TensorEdit("w", len(shape) - 1, 1.0, torch.ones(shape[-1], dtype=torch.float64), subtractive, stacked=stacked)
    scratch = Scratch({"w": edit}, ckpt, torch.float32)
    assert scratch.pending == expected
    assert scratch.worker_bytes >= (expected + 1) * scratch.read_bytes


def test_a_quantized_weight_edits_in_the_reused_working_copy() -> None:
    """The working copy is this thread's one buffer, grown once for a quantized weight's logical
    tensor (larger than any plain edited tensor) and then reused."""
    entry = SimpleNamespace(shape=(64, 32), start=0, end=2 * 64 * 32)
    ckpt = cast(Checkpoint, SimpleNamespace(entry=lambda name: entry))
    scratch = Scratch({"w": TensorEdit("w", 0, 1.0, torch.ones(64, dtype=torch.float64), subtractive)}, ckpt,
                      torch.float32)
    plain = scratch.workspace(scratch.numel)
    assert plain.numel() == 64 * 32
    grown = scratch.workspace(10_000)
    assert grown.numel() == 10_000 and grown.data_ptr() != plain.data_ptr()
    assert scratch.workspace(scratch.numel).data_ptr() == grown.data_ptr()


def test_quantized_parts_are_read_into_reused_buffers_that_nothing_queued_shares() -> None:
    """A whole quantized weight's stored parts are read into this thread's buffers, one per part,
    reused weight to weight (grown only); a re-encoded part that shares memory with one (a codec
    may hand a part back unchanged, or a view of it) is queued as a copy, since the next weight
    overwrites the buffer while the write may still wait."""
    entry = SimpleNamespace(shape=(64, 32), start=0, end=2 * 64 * 32)
    ckpt = cast(Checkpoint, SimpleNamespace(entry=lambda name: entry))
    scratch = Scratch({"w": TensorEdit("w", 0, 1.0, torch.ones(64, dtype=torch.float64), subtractive)}, ckpt,
                      torch.float32)
    codes = scratch.part_buffer(0, 100)
    assert scratch.part_buffer(0, 50) is codes and scratch.part_buffer(1, 10) is not codes
    assert len(scratch.part_buffer(0, 200)) == 200
    codes = scratch.part_buffer(0, 100)
    codes[:] = bytes(range(len(codes)))
    parts = {"q": torch.frombuffer(codes, dtype=torch.uint8)}
    fresh = torch.zeros(4, dtype=torch.uint8)
    new = rewrite._apart({"q": fresh, "s": parts["q"][10:20]}, parts)
    assert new["q"] is fresh
    codes[:] = bytes(len(codes))  # the next weight's read
    assert new["s"].tolist() == list(range(10, 20))
