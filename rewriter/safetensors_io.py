"""Safetensors headers and a streaming shard writer.

safetensors has no streaming writer, but a rewrite changes no shape and no dtype: the
source header (tensor order, offsets, ``__metadata__``, padding) is reused byte for byte,
and tensor data is streamed after it, so resident memory never grows with shard size.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Any, BinaryIO

import torch

from .errors import AbliterateError

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
_MAX_HEADER = 100 * 1024 * 1024
COPY_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute offsets in the file
    end: int


@dataclass(frozen=True)
class Header:
    raw: bytes  # the 8-byte length and the JSON, exactly as stored
    entries: tuple[TensorEntry, ...]  # in file order
    metadata: dict[str, str]
    file_size: int

    def entry(self, name: str) -> TensorEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)


def header_length(head: bytes, size: int, where: object) -> int:
    """Length of the JSON header from a file's first 8 bytes, checked against the file size."""
    if len(head) < 8:
        raise AbliterateError(f"{where}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > _MAX_HEADER or 8 + n > size:
        raise AbliterateError(f"{where}: not a safetensors file (header length {n})")
    return n


def parse_header(raw: bytes, size: int, where: object) -> Header:
    """Check and parse ``raw`` (the 8-byte length and the JSON) of a file of ``size`` bytes."""
    n = header_length(raw, size, where)
    try:
        doc: dict[str, Any] = json.loads(raw[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AbliterateError(f"{where}: corrupt safetensors header ({exc})") from None
    metadata = doc.pop("__metadata__", None) or {}
    base = 8 + n
    entries = []
    for name, info in doc.items():
        lo, hi = info["data_offsets"]
        entries.append(TensorEntry(name, info["dtype"], tuple(info["shape"]), base + lo, base + hi))
    entries.sort(key=lambda e: e.start)
    pos = base
    for e in entries:
        if e.start != pos or e.end < e.start:
            raise AbliterateError(f"{where}: tensor data of '{e.name}' is not contiguous; the file is corrupt")
        pos = e.end
    if pos != size:
        raise AbliterateError(f"{where}: file is {size} bytes but its header describes {pos}; truncated or corrupt")
    return Header(raw[: 8 + n], tuple(entries), dict(metadata), size)


def read_header(path: Path) -> Header:
    """Parse and check a safetensors header without touching tensor data."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        return parse_header(head + f.read(header_length(head, size, path)), size, path)


def tensor_from_bytes(data: bytes | bytearray, entry: TensorEntry) -> torch.Tensor:
    """A tensor over ``data`` (the entry's bytes), for the float dtypes that can be edited."""
    if entry.dtype not in FLOAT_DTYPES:
        raise AbliterateError(f"{entry.name}: dtype {entry.dtype} cannot be edited")
    if not data:
        return torch.empty(entry.shape, dtype=FLOAT_DTYPES[entry.dtype])
    return torch.frombuffer(data, dtype=FLOAT_DTYPES[entry.dtype]).reshape(entry.shape)


class ShardWriter:
    """Writes one shard to ``NAME.partial``; ``finish`` fsyncs and renames it into place.

    Writing and sha256 hashing run on two background threads, each fed by a short queue,
    so that the caller reads and edits the next tensor while earlier bytes are hashed
    and go to disk (all three release the GIL). Each queue holds at most ``depth``
    pending buffers, which bounds memory.
    """

    def __init__(self, final: Path, header: Header, depth: int = 1) -> None:
        self.final = final
        self.partial = final.with_name(final.name + ".partial")
        self._f: BinaryIO = open(self.partial, "wb")
        self._sha = hashlib.sha256()
        self._error: BaseException | None = None
        self._lanes = [self._lane(self._f.write, depth), self._lane(self._sha.update, depth)]
        self.size = 0
        self.write(header.raw)

    def _lane(self, consume: Callable[[Any], Any], depth: int) -> tuple[queue.Queue[Any], threading.Thread]:
        q: queue.Queue[Any] = queue.Queue(maxsize=depth)

        def drain() -> None:
            while (data := q.get()) is not None:
                if self._error is None:
                    try:
                        consume(data)
                    except BaseException as exc:  # reported to the caller on its next call
                        self._error = exc

        thread = threading.Thread(target=drain, name=f"{consume.__name__} {self.final.name}", daemon=True)
        thread.start()
        return q, thread

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, data: bytes | memoryview) -> None:
        """Queue ``data``; the caller must not modify it afterwards."""
        self._check()
        for q, _ in self._lanes:
            q.put(data)
        self.size += len(data)

    def write_tensor(self, tensor: torch.Tensor) -> None:
        self.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))

    def copy_range(self, src: BinaryIO, start: int, end: int) -> None:
        """Copy bytes [start, end) of ``src`` in chunks of COPY_CHUNK."""
        src.seek(start)
        left = end - start
        while left:
            chunk = src.read(min(left, COPY_CHUNK))
            if not chunk:
                raise AbliterateError(f"{src.name}: unexpected end of file")
            self.write(chunk)
            left -= len(chunk)

    def _stop(self) -> None:
        for q, thread in self._lanes:
            q.put(None)
            thread.join()

    def finish(self) -> tuple[int, str]:
        self._stop()
        self._check()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.chmod(self.partial, 0o644)
        os.replace(self.partial, self.final)
        return self.size, self._sha.hexdigest()

    def abort(self) -> None:
        self._error = self._error or AbliterateError("aborted")
        self._stop()
        self._f.close()
        self.partial.unlink(missing_ok=True)


def read_tensor(src: BinaryIO, entry: TensorEntry) -> torch.Tensor:
    """One tensor, read with a plain sequential read.

    (An mmap, as ``safe_open`` uses, faults pages in one at a time: four times slower
    for a 118 MB tensor here, and the pages stay counted in RSS while the file is open.)
    """
    buf = bytearray(entry.end - entry.start)
    src.seek(entry.start)
    if src.readinto(buf) != len(buf):
        raise AbliterateError(f"{src.name}: unexpected end of file in '{entry.name}'")
    return tensor_from_bytes(buf, entry)


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(COPY_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def write_atomic(path: Path, data: bytes) -> None:
    """Write a small file through a temporary name, fsynced, mode 0644."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
