"""Safetensors headers, checked in full without touching tensor data, and single-tensor reads.

A header is hostile until checked: it must be a JSON object of objects, each with a known
dtype, a shape of non-negative integers and integer ``data_offsets`` whose length equals
shape x dtype size; the tensors must tile the data section exactly. Everything is checked
before any byte is written, so a corrupt tensor is never copied silently.
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, BinaryIO

from .. import dtypes
from ..dtypes import stored_name
from ..errors import AbliterateError
from ..lazy import torch

# safetensors dtype code -> bits per element (sub-byte types pack; the byte count must be whole)
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
_MAX_HEADER = 100 * 1024 * 1024
COPY_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # the safetensors code, e.g. BF16
    shape: tuple[int, ...]
    start: int  # absolute offsets in the file
    end: int

    @property
    def dtype_name(self) -> str:
        return stored_name(self.dtype)


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
        doc = json.loads(raw[8 : 8 + n])
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AbliterateError(f"{where}: corrupt safetensors header ({str(exc).splitlines()[0][:200]})") from None
    if not isinstance(doc, dict):
        raise AbliterateError(f"{where}: corrupt safetensors header (a JSON {type(doc).__name__}, not an object)")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise AbliterateError(f"{where}: corrupt safetensors header (__metadata__ must map strings to strings)")
    base = 8 + n
    entries = sorted((_entry(name, info, base, where) for name, info in doc.items()), key=lambda e: (e.start, e.end))
    pos = base
    for e in entries:
        if e.start != pos:
            raise AbliterateError(f"{where}: tensor data of '{e.name}' is not contiguous; the file is corrupt")
        pos = e.end
    if pos != size:
        raise AbliterateError(f"{where}: file is {size} bytes but its header describes {pos}; truncated or corrupt")
    return Header(raw[: 8 + n], tuple(entries), dict(metadata), size)


def _entry(name: str, info: Any, base: int, where: object) -> TensorEntry:
    """One header entry, every field checked, its byte length equal to shape x dtype size."""
    bad = f"{where}: corrupt safetensors header: tensor '{name[:200]}'"
    if not isinstance(info, dict):
        raise AbliterateError(f"{bad} is described by a {type(info).__name__}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise AbliterateError(f"{bad} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise AbliterateError(f"{bad} has shape {shape!r}; expected a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) and o >= 0 for o in offsets):
        raise AbliterateError(f"{bad} has data_offsets {offsets!r}; expected [begin, end] integers")
    lo, hi = offsets
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if hi < lo or bits != (hi - lo) * 8:
        raise AbliterateError(f"{bad}: shape {shape} of {dtype} needs {bits / 8:g} bytes, its byte range has {hi - lo}")
    return TensorEntry(name, dtype, tuple(shape), base + lo, base + hi)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def byte_size(dtype: str, shape: Sequence[int]) -> int:
    """Bytes of a tensor of safetensors ``dtype`` and ``shape`` (sub-byte types packed)."""
    return math.prod(shape) * DTYPE_BITS[dtype] // 8


def build_header(specs: Sequence[tuple[str, str, tuple[int, ...]]], metadata: Mapping[str, str]) -> Header:
    """The header of a new file holding ``specs`` (name, dtype code, shape) in this order, tightly
    packed; the JSON is padded with spaces to 8 bytes, as safetensors writes it."""
    doc: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    pos = 0
    for name, dtype, shape in specs:
        size = byte_size(dtype, shape)
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + size]}
        pos += size
    text = json.dumps(doc, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    raw = struct.pack("<Q", len(text)) + text
    return parse_header(raw, len(raw) + pos, "new header")


def serialize(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """A small safetensors file, byte for byte the same for the same tensors and metadata (the
    safetensors library writes metadata in a per-process hash order: a file's sha256 would change
    from one run to the next)."""
    codes = {dtype: code for code, dtype in dtypes.STORED_DTYPES.items()}
    header = build_header([(name, codes[t.dtype], tuple(t.shape)) for name, t in tensors.items()],
                          dict(sorted(metadata.items())))
    return header.raw + b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in tensors.values())


def read_header(path: Path) -> Header:
    """Parse and check a safetensors header without touching tensor data."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        return parse_header(head + f.read(header_length(head, size, path)), size, path)


def tensor_from_bytes(data: bytes | bytearray | memoryview, entry: TensorEntry, *, stored: bool = False) -> torch.Tensor:
    """A tensor over ``data`` (the entry's bytes): of the float dtypes that can be edited, or,
    with ``stored``, of any dtype a codec reads."""
    known = dtypes.STORED_DTYPES if stored else dtypes.FLOAT_DTYPES
    if entry.dtype not in known:
        raise AbliterateError(f"{entry.name}: dtype {entry.dtype_name} cannot be {'read' if stored else 'edited'}")
    if not data:
        return torch.empty(entry.shape, dtype=known[entry.dtype])
    return torch.frombuffer(data, dtype=torch.uint8).view(known[entry.dtype]).reshape(entry.shape)


def read_tensor(src: BinaryIO, entry: TensorEntry, into: bytearray | None = None, *, stored: bool = False) -> torch.Tensor:
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
    return tensor_from_bytes(buf, entry, stored=stored)
