"""Weights on demand for a model built on the meta device: one module's tensors read from the shards,
put in place, and released again, with the bytes and seconds of reading counted.

The streamed forward (streamed.py) fills one decoder layer at a time; every tensor is read
with one sequential read of its byte range (``read_tensor``), never by loading a shard.
"""
from __future__ import annotations

import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import BinaryIO

import torch
from torch import nn

from ..errors import AbliterateError
from ..io.checkpoint import Checkpoint
from ..io.safetensors_io import FLOAT_DTYPES, read_tensor


@dataclass
class WeightReader:
    """Reads named tensors of a checkpoint; one open file per shard, the reading timed."""

    ckpt: Checkpoint
    bytes_read: int = 0
    seconds: float = 0.0
    _files: dict[str, BinaryIO] = field(default_factory=dict)

    def _file(self, name: str) -> BinaryIO:
        shard = self.ckpt.shard_of[name]
        if shard.name not in self._files:
            self._files[shard.name] = open(shard.path, "rb")  # noqa: SIM115 (closed in close())
        return self._files[shard.name]

    def read(self, name: str) -> torch.Tensor:
        """The tensor as stored (its own buffer, no copy)."""
        start = time.monotonic()
        entry = self.ckpt.entry(name)
        tensor = read_tensor(self._file(name), entry)
        self.bytes_read += entry.end - entry.start
        self.seconds += time.monotonic() - start
        return tensor

    def read_rows(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` (sorted, unique) of a 2-D tensor, read row by row: an embedding's used rows."""
        entry = self.ckpt.entry(name)
        if len(entry.shape) != 2 or entry.dtype not in FLOAT_DTYPES:
            raise AbliterateError(f"{name}: expected a 2-D float tensor, found {entry.dtype_name} {list(entry.shape)}")
        if len(rows) and int(rows[-1]) >= entry.shape[0]:
            raise AbliterateError(f"{name}: token id {int(rows[-1])} is past its {entry.shape[0]} rows")
        dtype = FLOAT_DTYPES[entry.dtype]
        row_bytes = entry.shape[1] * dtype.itemsize
        buf = bytearray(len(rows) * row_bytes)
        view = memoryview(buf)
        start = time.monotonic()
        src = self._file(name)
        for j, row in enumerate(rows.tolist()):
            src.seek(entry.start + row * row_bytes)
            if src.readinto(view[j * row_bytes : (j + 1) * row_bytes]) != row_bytes:
                raise AbliterateError(f"{src.name}: unexpected end of file in '{name}'")
        self.bytes_read += len(rows) * row_bytes
        self.seconds += time.monotonic() - start
        return torch.frombuffer(buf, dtype=dtype).reshape(len(rows), entry.shape[1])

    def prefetch(self, names: list[str]) -> None:
        """Ask the kernel to start reading these tensors into the page cache (not into this process)."""
        for name in names:
            e = self.ckpt.entry(name)
            try:
                os.posix_fadvise(self._file(name).fileno(), e.start, e.end - e.start, os.POSIX_FADV_WILLNEED)
            except (AttributeError, OSError):  # not on this platform: reads just are not overlapped
                return

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def slots(module: nn.Module) -> Iterator[tuple[str, nn.Module, str, bool]]:
    """(name in the module, owner, attribute, is a parameter) of every parameter and persistent buffer."""
    for owner_name, owner in module.named_modules():
        prefix = owner_name + "." if owner_name else ""
        for attr, p in owner._parameters.items():
            if p is not None:
                yield prefix + attr, owner, attr, True
        for attr, b in owner._buffers.items():
            if b is not None and attr not in owner._non_persistent_buffers_set:
                yield prefix + attr, owner, attr, False


def _put(owner: nn.Module, attr: str, is_param: bool, value: torch.Tensor) -> None:
    if is_param:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


@contextmanager
def filled(module: nn.Module, names: Mapping[str, str], reader: WeightReader) -> Iterator[int]:
    """The module's meta tensors replaced by the checkpoint's (``names``: module name -> checkpoint
    name), cast to the dtype the model was built in; back on the meta device afterwards, so
    that the memory is released. Yields the bytes the module holds while filled."""
    done: list[tuple[nn.Module, str, bool, torch.Tensor]] = []
    held = 0
    try:
        for name, owner, attr, is_param in list(slots(module)):
            current = (owner._parameters if is_param else owner._buffers)[attr]
            if current.device.type != "meta":
                continue  # a buffer transformers computed for real (never in the checkpoint)
            source = names.get(name)
            if source is None or source not in reader.ckpt.names:
                raise AbliterateError(f"{reader.ckpt.root}: no tensor {source or name} in the checkpoint "
                                      "for the streamed forward")
            value = reader.read(source)
            if tuple(value.shape) != tuple(current.shape):
                raise AbliterateError(f"{source}: shape {list(value.shape)} in the checkpoint, "
                                      f"{list(current.shape)} in the model")
            value = value.to(current.dtype)
            _put(owner, attr, is_param, value)
            done.append((owner, attr, is_param, current))
            held += value.numel() * value.element_size()
        yield held
    finally:
        for owner, attr, is_param, meta in done:
            _put(owner, attr, is_param, meta)
