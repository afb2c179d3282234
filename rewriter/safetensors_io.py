"""Safetensors headers and a streaming shard writer.

safetensors has no streaming writer, but a rewrite changes no shape and no dtype: the
source header (tensor order, offsets, ``__metadata__``, padding) is reused byte for byte,
and tensor data is streamed after it, so resident memory never grows with shard size.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
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


def read_header(path: Path) -> Header:
    """Parse and check a safetensors header without touching tensor data."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise AbliterateError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise AbliterateError(f"{path}: not a safetensors file (header length {n})")
        text = f.read(n)
    try:
        doc: dict[str, Any] = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AbliterateError(f"{path}: corrupt safetensors header ({exc})") from None
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
            raise AbliterateError(f"{path}: tensor data of '{e.name}' is not contiguous; the file is corrupt")
        pos = e.end
    if pos != size:
        raise AbliterateError(f"{path}: file is {size} bytes but its header describes {pos}; truncated or corrupt")
    return Header(head + text, tuple(entries), dict(metadata), size)


class ShardWriter:
    """Writes one shard to ``NAME.partial``, hashing as it goes; ``finish`` fsyncs and renames."""

    def __init__(self, final: Path, header: Header) -> None:
        self.final = final
        self.partial = final.with_name(final.name + ".partial")
        self._f: BinaryIO = open(self.partial, "wb")
        self._sha = hashlib.sha256()
        self.size = 0
        self.write(header.raw)

    def write(self, data: bytes | memoryview) -> None:
        self._sha.update(data)
        self._f.write(data)
        self.size += len(data)

    def write_tensor(self, tensor: torch.Tensor) -> None:
        self.write(memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy()))

    def copy_range(self, src: BinaryIO, start: int, end: int, buffer: bytearray) -> None:
        """Copy bytes [start, end) of ``src`` through a reused buffer."""
        src.seek(start)
        view = memoryview(buffer)
        left = end - start
        while left:
            got = src.readinto(view[: min(left, len(buffer))])
            if not got:
                raise AbliterateError(f"{src.name}: unexpected end of file")
            self.write(view[:got])
            left -= got

    def finish(self) -> tuple[int, str]:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.chmod(self.partial, 0o644)
        os.replace(self.partial, self.final)
        return self.size, self._sha.hexdigest()

    def abort(self) -> None:
        self._f.close()
        self.partial.unlink(missing_ok=True)


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
