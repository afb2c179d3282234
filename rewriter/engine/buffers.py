"""Tensor-sized buffers of one rewrite, allocated once and reused across tensors and shards."""
from __future__ import annotations

import math
import threading
from collections.abc import Mapping

import torch

from ..io.checkpoint import Checkpoint
from .edit import TensorEdit


class Scratch:
    """Tensor-sized buffers, allocated once and reused across tensors and shards.

    Allocating and faulting in tensor-sized buffers for every edit cost more than the edit
    math itself. A ShardWriter keeps at most ``PENDING`` tensors queued, so each worker
    thread has ``PENDING + 1`` read buffers of its own: the next tensor is read while the
    last one is written. The working copy in the compute dtype (the largest buffer) is
    shared, and workers take turns with the edit math, a small part of the time: N
    workers hold about N + 1 times the largest edited tensor in fp32. A stacked tensor
    (fused experts) counts as its largest slice, since it is streamed slice by slice.
    """

    PENDING = 1

    def __init__(self, edits: Mapping[str, TensorEdit], ckpt: Checkpoint, compute: torch.dtype) -> None:
        # A stacked edit (fused experts) streams one slice at a time: buffers fit a slice.
        pieces = [(ckpt.entry(name), edit.slices(ckpt.entry(name).shape)) for name, edit in edits.items()]
        self.read_bytes = max(((e.end - e.start) // n for e, n in pieces), default=0)
        self.numel = max((math.prod(e.shape) // n for e, n in pieces), default=0)
        self.compute = compute
        self._reads = threading.local()
        self._workspace: torch.Tensor | None = None
        self._turn = threading.Lock()

    def read_buffer(self) -> bytearray:
        """This thread's least recently used read buffer."""
        ring: list[bytearray] | None = getattr(self._reads, "ring", None)
        if ring is None:
            ring = self._reads.ring = [bytearray(self.read_bytes) for _ in range(self.PENDING + 1)]
        ring.append(ring.pop(0))
        return ring[-1]

    def edit(self, edit: TensorEdit, tensor: torch.Tensor) -> int:
        """Apply ``edit`` to ``tensor`` in place in the shared working copy; returns the columns zeroed."""
        with self._turn:
            if self._workspace is None:
                self._workspace = torch.empty(self.numel, dtype=self.compute)
            return edit.apply(tensor, self.compute, in_place=True, workspace=self._workspace)[1]
