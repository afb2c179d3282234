"""Safetensors headers, checked without touching tensor data, and single-tensor reads."""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from functools import cached_property
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

    @cached_property
    def by_name(self) -> dict[str, TensorEntry]:
        return {e.name: e for e in self.entries}

    def entry(self, name: str) -> TensorEntry:
        return self.by_name[name]


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


def tensor_from_bytes(data: bytes | bytearray | memoryview, entry: TensorEntry) -> torch.Tensor:
    """A tensor over ``data`` (the entry's bytes), for the float dtypes that can be edited."""
    if entry.dtype not in FLOAT_DTYPES:
        raise AbliterateError(f"{entry.name}: dtype {entry.dtype} cannot be edited")
    if not data:
        return torch.empty(entry.shape, dtype=FLOAT_DTYPES[entry.dtype])
    return torch.frombuffer(data, dtype=FLOAT_DTYPES[entry.dtype]).reshape(entry.shape)


def read_tensor(src: BinaryIO, entry: TensorEntry, into: bytearray | None = None) -> torch.Tensor:
    """One tensor, read with a plain sequential read, into the front of ``into`` if given.

    (An mmap, as ``safe_open`` uses, faults pages in one at a time: four times slower
    for a 118 MB tensor here, and the pages stay counted in RSS while the file is open.
    A reused buffer also spares allocating and faulting in fresh pages for every tensor.)
    """
    n = entry.end - entry.start
    buf = memoryview(into)[:n] if into is not None else memoryview(bytearray(n))
    src.seek(entry.start)
    if src.readinto(buf) != n:
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
