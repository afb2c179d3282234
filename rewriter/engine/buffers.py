"""Tensor-sized buffers of one rewrite, allocated once and reused across tensors and shards."""
from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

from ..io.checkpoint import Checkpoint
from .edit import TensorEdit

Buffer = TypeVar("Buffer", bytearray, torch.Tensor)


class Scratch:
    """Tensor-sized buffers, allocated once and reused across tensors and shards.

    Allocating and faulting in tensor-sized buffers for every edit cost more than the edit
    math itself. A ShardWriter keeps at most ``pending`` tensors queued, so each worker
    thread has ``pending + 1`` read buffers of its own: the next tensor is read while the
    last one is written. ``pending`` is one for tensors of ``RING_BYTES`` or more, and
    more for small pieces (fused experts' slices): a worker that handed its slices over one
    at a time waited for the writer on each. Each worker also has its own working copy in the compute dtype,
    so that workers edit at the same time: on a fast disk the edit math is the limit, and
    more workers, and edit threads inside each (``edit_threads``), are how more cores are
    used. Edit threads share their worker's working copy, each column chunk in a region of
    its own, so they add no memory. N workers of a bf16 checkpoint hold about 2N times the
    largest edited tensor in fp32. A stacked
    tensor (fused experts) counts as its largest slice, since it is streamed slice by slice.
    """

    RING_BYTES = 64 << 20  # what the queued pieces of small tensors may hold, per worker
    MAX_PENDING = 4

    def __init__(self, edits: Mapping[str, TensorEdit], ckpt: Checkpoint, compute: torch.dtype) -> None:
        self._pool: Executor | None = None  # threads that edit column chunks, shared by the workers
        self.lanes = 1  # slices of a stacked quantized weight each worker has in flight on the pool
        # A stacked edit (fused experts) streams one slice at a time: buffers fit a slice.
        pieces = [(ckpt.entry(name), edit.slices(ckpt.entry(name).shape)) for name, edit in edits.items()]
        self.read_bytes = max(((e.end - e.start) // n for e, n in pieces), default=0)
        self.numel = max((math.prod(e.shape) // n for e, n in pieces), default=0)
        self.compute = compute
        self.pending = max(1, min(self.MAX_PENDING, self.RING_BYTES // max(1, self.read_bytes)))
        # what one worker holds once it has edited a tensor of the largest size
        self.worker_bytes = (self.pending + 1) * self.read_bytes + self.numel * compute.itemsize
        self._mine = threading.local()  # per worker thread: read ring, working copy

    def read_buffer(self) -> bytearray:
        """This thread's least recently used read buffer."""
        ring: list[bytearray] | None = getattr(self._mine, "ring", None)
        if ring is None:
            ring = self._mine.ring = [bytearray(self.read_bytes) for _ in range(self.pending + 1)]
        ring.append(ring.pop(0))
        return ring[-1]

    @property
    def pool(self) -> Executor | None:
        """The edit threads (None: edits run inline)."""
        return self._pool

    def edit(self, edit: TensorEdit, tensor: torch.Tensor) -> int:
        """Apply ``edit`` to ``tensor`` in place, through this thread's working copy; returns the columns zeroed."""
        return edit.apply(tensor, self.compute, in_place=True, workspace=self.workspace(self.numel), pool=self.pool)[1]

    def workspace(self, numel: int) -> torch.Tensor:
        """This thread's working copy in the compute dtype, at least ``numel`` long (grown, once,
        for a quantized weight's logical tensor, which the buffers above are not sized by)."""
        return self._grown("work", numel, self.compute)

    def decoded(self, numel: int) -> torch.Tensor:
        """This thread's float32 buffer for a quantized weight's decoded tensor, at least ``numel``
        long: a fresh one each weight was mapped and page-faulted anew (tensors over 32 MiB
        always are), 57,600 faults for a block-FP8 ``down_proj``."""
        return self._grown("decoded", numel, torch.float32)

    def part_buffer(self, index: int, nbytes: int) -> bytearray:
        """This thread's buffer for part ``index`` of a quantized weight as stored, at least
        ``nbytes`` long: the codes of a block-FP8 ``down_proj`` (59 MB) read into a fresh one
        were 14,400 page faults each weight. Reused by the thread's next weight."""
        return self._kept(f"part {index}", nbytes, bytearray)

    def _grown(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """This thread's tensor ``name`` of ``dtype``, at least as long as the largest edited tensor."""
        return self._kept(name, numel, lambda n: torch.empty(max(n, self.numel), dtype=dtype))

    def _kept(self, name: str, size: int, make: Callable[[int], Buffer]) -> Buffer:
        """This thread's one-dimensional buffer ``name``, at least ``size`` long: ``make(size)``
        the first time, and again only to grow."""
        buffer: Buffer | None = getattr(self._mine, name, None)
        if buffer is None or len(buffer) < size:
            buffer = make(size)
            setattr(self._mine, name, buffer)
        return buffer

    @contextmanager
    def edit_threads(self, threads: int, lanes: int = 1) -> Iterator[None]:
        """Edits inside the block run their column chunks on ``threads`` threads in all (1: inline),
        and each worker up to ``lanes`` slices of a stacked quantized weight at once, one per thread."""
        if threads <= 1:
            yield
            return
        with ThreadPoolExecutor(threads, thread_name_prefix="edit") as pool:
            self._pool, self.lanes = pool, lanes
            try:
                yield
            finally:
                self._pool, self.lanes = None, 1
