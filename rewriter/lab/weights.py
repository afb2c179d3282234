"""Weights on demand for a model built on the meta device: one module's tensors read from the shards,
put in place, and released again, with the bytes and seconds of reading counted.

The streamed forward (streamed.py) fills one decoder layer at a time; every tensor is read
with one sequential read of its byte range (``read_tensor``), never by loading a shard.
A quantized checkpoint is read through its codec: the lab never sees a format.
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

from ..dtypes import FLOAT_DTYPES
from ..errors import AbliterateError
from ..io.checkpoint import Checkpoint, LocalFiles
from ..io.safetensors_io import TensorEntry, read_tensor, tensor_from_bytes
from ..logical import LogicalTensors


ROWS_PIECE = 64 * 10**6  # bytes of an embedding table read at once where its rows come by byte range


@dataclass
class WeightReader:
    """Reads a checkpoint's tensors by the names the model uses, in the dtype the model runs in;
    one open file per shard, the reading timed.

    A quantized weight (``view``: the codec's logical tensors) is read as its parts and decoded
    through its codec, the same decode the rewrite uses; fused experts one slice along axis 0
    at a time, so that at most one slice is ever in float32 beside the output. A checkpoint on
    the Hub (``--low-disk``) is read by byte ranges, tensor by tensor: no shard is ever on disk.
    """

    ckpt: Checkpoint
    view: LogicalTensors
    bytes_read: int = 0
    seconds: float = 0.0
    _files: dict[str, BinaryIO] = field(default_factory=dict)

    @property
    def names(self) -> frozenset[str]:
        return self.view.names

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.view.shape(self.ckpt, name))

    def _file(self, name: str) -> BinaryIO:
        shard = self.ckpt.shard_of[name]
        if shard.name not in self._files:
            self._files[shard.name] = open(shard.path, "rb")  # noqa: SIM115 (closed in close())
        return self._files[shard.name]

    @property
    def remote(self) -> bool:
        return not isinstance(self.ckpt.files, LocalFiles)

    def _read(self, entry: TensorEntry, *, stored: bool = False) -> torch.Tensor:
        """The bytes of ``entry`` (a tensor, or a range of its rows) as a tensor of its own, timed."""
        start = time.monotonic()
        if self.remote:
            data = bytearray(self.ckpt.files.read(self.ckpt.shard_of[entry.name], entry.start, entry.end))
            tensor = tensor_from_bytes(data, entry, stored=stored)
        else:
            tensor = read_tensor(self._file(entry.name), entry, stored=stored)
        self.bytes_read += entry.end - entry.start
        self.seconds += time.monotonic() - start
        return tensor

    def _stored(self, name: str, *, stored: bool = False) -> torch.Tensor:
        """The tensor as stored."""
        return self._read(self.ckpt.entry(name), stored=stored)

    def parts(self, name: str) -> dict[str, torch.Tensor]:
        """A packed weight's stored parts."""
        return {p: self._stored(p, stored=True) for p in self.view.packed[name].parts}

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The logical tensor in ``dtype``: a float tensor cast, a packed one decoded."""
        packed = self.view.packed.get(name)
        if packed is None:
            return self._stored(name).to(dtype)
        assert self.view.codec is not None
        parts = self.parts(name)
        if not self.view.stacked(self.ckpt, name):
            return self.view.codec.decode(packed, parts).to(dtype)
        out = torch.empty(packed.shape, dtype=dtype)
        for i in range(packed.shape[0]):
            out[i] = self.view.codec.decode(packed, {p: t[i] for p, t in parts.items()})
        return out

    def read_rows(self, name: str, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``rows`` (sorted, unique) of a 2-D tensor, read row by row: an embedding's used rows
        (a packed one is decoded whole, then indexed)."""
        shape = self.shape(name)
        if len(shape) != 2:
            raise AbliterateError(f"{name}: expected a 2-D tensor, found shape {list(shape)}")
        if len(rows) and int(rows[-1]) >= shape[0]:
            raise AbliterateError(f"{name}: token id {int(rows[-1])} is past its {shape[0]} rows")
        if name in self.view.packed:
            return self.read(name, dtype)[rows]
        if self.remote:  # one pass over the table in pieces, not a request per row
            return torch.cat([piece[rows[(rows >= first) & (rows < first + len(piece))] - first]
                              for first, piece in self.row_chunks(name, dtype, ROWS_PIECE)])
        entry = self.ckpt.entry(name)
        if entry.dtype not in FLOAT_DTYPES:
            raise AbliterateError(f"{name}: expected a float tensor, found {entry.dtype_name}")
        row_bytes = shape[1] * FLOAT_DTYPES[entry.dtype].itemsize
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
        return torch.frombuffer(buf, dtype=FLOAT_DTYPES[entry.dtype]).reshape(len(rows), shape[1]).to(dtype)

    def row_chunks(self, name: str, dtype: torch.dtype, max_bytes: int) -> Iterator[tuple[int, torch.Tensor]]:
        """A 2-D tensor in consecutive row ranges of at most ``max_bytes`` in ``dtype`` (an output head
        of a 150k-200k vocabulary, never whole in memory): (first row, rows). A packed one is
        decoded whole first."""
        shape = self.shape(name)
        if len(shape) != 2:
            raise AbliterateError(f"{name}: expected a 2-D tensor, found shape {list(shape)}")
        step = max(1, max_bytes // max(1, shape[1] * dtype.itemsize))
        if name in self.view.packed:
            whole = self.read(name, dtype)
            yield from ((r, whole[r : r + step]) for r in range(0, shape[0], step))
            return
        entry = self.ckpt.entry(name)
        if entry.dtype not in FLOAT_DTYPES:
            raise AbliterateError(f"{name}: expected a float tensor, found {entry.dtype_name}")
        row_bytes = shape[1] * FLOAT_DTYPES[entry.dtype].itemsize
        for r in range(0, shape[0], step):
            n = min(step, shape[0] - r)
            yield r, self._read(TensorEntry(name, entry.dtype, (n, shape[1]), entry.start + r * row_bytes,
                                            entry.start + (r + n) * row_bytes)).to(dtype)

    def prefetch(self, names: list[str]) -> None:
        """Ask the kernel to start reading these tensors (a packed one's parts) into the page cache
        (not into this process)."""
        stored = [p for n in names for p in (self.view.packed[n].parts if n in self.view.packed else (n,))]
        for name in stored if not self.remote else ():
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


def fill(module: nn.Module, names: Mapping[str, str], reader: WeightReader) -> list[tuple[nn.Module, str, bool, torch.Tensor]]:
    """The module's meta tensors replaced by the checkpoint's (``names``: module name -> checkpoint
    name), in the dtype the model was built in; returns what was replaced, to put back."""
    done: list[tuple[nn.Module, str, bool, torch.Tensor]] = []
    try:
        for name, owner, attr, is_param in list(slots(module)):
            current = (owner._parameters if is_param else owner._buffers)[attr]
            if current.device.type != "meta":
                continue  # a buffer transformers computed for real (never in the checkpoint)
            source = names.get(name)
            if source is None or source not in reader.names:
                raise AbliterateError(f"{reader.ckpt.root}: no tensor {source or name} in the checkpoint "
                                      "for the streamed forward")
            if reader.shape(source) != tuple(current.shape):
                raise AbliterateError(f"{source}: shape {list(reader.shape(source))} in the checkpoint, "
                                      f"{list(current.shape)} in the model")
            _put(owner, attr, is_param, reader.read(source, current.dtype))
            done.append((owner, attr, is_param, current))
    except BaseException:
        empty(done)
        raise
    return done


def empty(done: list[tuple[nn.Module, str, bool, torch.Tensor]]) -> None:
    """Put the meta tensors back, so that the memory is released."""
    for owner, attr, is_param, meta in done:
        _put(owner, attr, is_param, meta)


@contextmanager
def filled(module: nn.Module, names: Mapping[str, str], reader: WeightReader) -> Iterator[None]:
    """The module filled from the checkpoint for the duration of the block (``fill``), then emptied."""
    done = fill(module, names, reader)
    try:
        yield
    finally:
        empty(done)
