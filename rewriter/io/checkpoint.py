"""A local safetensors checkpoint: config, shards, their headers, and the other files."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from ..errors import AbliterateError
from ..lazy import torch
from .files import safe_name
from .manifest import MANIFEST_NAME
from .safetensors_io import Header, TensorEntry, read_header, tensor_from_bytes

INDEX_SUFFIX = ".safetensors.index.json"
# Weights in other formats would carry the unedited model into the output: never copied.
FOREIGN_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".safetensors", ".bin.index.json")


@dataclass(frozen=True)
class Shard:
    name: str
    path: Path
    header: Header


class ShardFiles(Protocol):
    """Where shard bytes come from: local files, or a remote repo fetched shard by shard."""

    def local(self, shard: Shard) -> AbstractContextManager[Path]:
        """The shard as a local file for the duration of the block."""

    def read(self, shard: Shard, start: int, end: int) -> bytes:
        """Bytes [start, end) of the shard (small reads: norms, headers)."""


class LocalFiles:
    @contextmanager
    def local(self, shard: Shard) -> Iterator[Path]:
        yield shard.path

    def read(self, shard: Shard, start: int, end: int) -> bytes:
        with open(shard.path, "rb") as f:
            f.seek(start)
            return f.read(end - start)


@dataclass(frozen=True)
class Checkpoint:
    root: Path
    config: dict[str, Any]
    shards: tuple[Shard, ...]
    index_name: str | None
    files: ShardFiles = field(default_factory=LocalFiles)
    origin: dict[str, str] | None = None  # where a remote checkpoint came from (repo, resolved revision)

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        root = Path(path)
        if not root.is_dir():
            raise AbliterateError(f"checkpoint directory not found: {root}")
        names = sorted(p.name for p in root.glob("*.safetensors"))
        gguf = sorted(p.name for p in root.glob("*.gguf"))
        if gguf and not names:
            raise AbliterateError(f"{root}: {gguf[0]} is a GGUF file; only safetensors checkpoints can be rewritten. "
                                  "Convert it first: transformers' from_pretrained(..., gguf_file=...), then save_pretrained")

        def header(name: str) -> Header:
            if not (root / name).is_file():
                raise AbliterateError(f"{root}: shard {name} listed in the index is missing or not a file")
            _check_inside(root, name)
            return read_header(root / name)

        return cls.assemble(root, names, header, any(root.glob("*.bin")))

    @classmethod
    def assemble(cls, root: Path, safetensors_files: list[str], header: Callable[[str], Header],
                 has_bin: bool = False, **kw: Any) -> Checkpoint:
        """A checkpoint from its folder of small files, its safetensors file names and their headers."""
        config = _read_json(root / "config.json", "config.json")
        indexes = sorted(p.name for p in root.glob("*" + INDEX_SUFFIX))
        if len(indexes) > 1:
            raise AbliterateError(f"{root}: several safetensors indexes ({', '.join(indexes)}); keep one")
        if indexes:
            weight_map = _weight_map(root / indexes[0])
            names = list(dict.fromkeys(weight_map.values()))
        else:
            names = safetensors_files
            if len(names) != 1:
                found = "no" if not names else f"{len(names)}"
                other = " (only safetensors checkpoints are supported)" if has_bin else ""
                raise AbliterateError(f"{root}: {found} .safetensors files and no index{other}")
        shards = tuple(Shard(name, root / name, header(name)) for name in names)
        ckpt = cls(root, config, shards, indexes[0] if indexes else None, **kw)
        if indexes:
            ckpt._check_index(weight_map)
        return ckpt

    def index_bytes(self) -> bytes:
        """The index file, byte for byte (its names were checked when the checkpoint was opened)."""
        assert self.index_name is not None
        return (self.root / self.index_name).read_bytes()

    def quantization(self) -> dict[str, Any] | None:
        """The ``quantization_config`` of a quantized checkpoint (in config.json or any sub-config),
        else None; one that is not an object reads as ``{"quant_method": "unknown"}``."""
        for conf in (self.config, *(v for v in self.config.values() if isinstance(v, dict))):
            quant = conf.get("quantization_config")
            if quant:
                return quant if isinstance(quant, dict) else {"quant_method": "unknown"}
        return None

    def tensor(self, name: str) -> torch.Tensor:
        """One (small) tensor, read on its own."""
        shard = self.shard_of[name]
        e = shard.header.entry(name)
        return tensor_from_bytes(bytearray(self.files.read(shard, e.start, e.end)), e)

    def _check_index(self, weight_map: dict[str, str]) -> None:
        for name, shard in self.shard_of.items():
            if weight_map.get(name) != shard.name:
                raise AbliterateError(f"{self.root}: index puts '{name}' in {weight_map.get(name)} but it is in {shard.name}")
        missing = sorted(set(weight_map) - set(self.shard_of))
        if missing:
            raise AbliterateError(f"{self.root}: index lists tensors that no shard holds: {', '.join(missing[:5])}")

    @cached_property
    def shard_of(self) -> dict[str, Shard]:
        found: dict[str, Shard] = {}
        for s in self.shards:
            for e in s.header.entries:
                if e.name in found:
                    raise AbliterateError(f"{self.root}: tensor '{e.name}' is in both {found[e.name].name} and {s.name}")
                found[e.name] = s
        return found

    @cached_property
    def names(self) -> frozenset[str]:
        return frozenset(self.shard_of)

    def entry(self, name: str) -> TensorEntry:
        return self.shard_of[name].header.entry(name)

    @property
    def data_bytes(self) -> int:
        return sum(s.header.file_size for s in self.shards)

    def other_files(self) -> tuple[list[str], list[str]]:
        """(files to copy: configs, tokenizer, templates, code; weight files in other formats, left out),
        as relative posix names. Hidden files and folders are neither, nor is the record of an
        earlier rewrite (a source that is itself an output): it would describe another rewrite."""
        skip = {s.name for s in self.shards} | {MANIFEST_NAME} | ({self.index_name} if self.index_name else set())
        keep, foreign = [], []
        for p in sorted(self.root.rglob("*")):
            rel = p.relative_to(self.root).as_posix()
            if not p.is_file() or rel in skip or any(part.startswith(".") for part in rel.split("/")):
                continue
            _check_inside(self.root, rel)
            (foreign if p.name.endswith(FOREIGN_WEIGHTS) else keep).append(rel)
        return keep, foreign


def _check_inside(root: Path, rel: str) -> None:
    """Refuse a file of the checkpoint that is a link to somewhere outside it: its bytes would be
    written to OUTPUT and published with it. A link into the Hugging Face cache's blobs of the
    repo whose snapshot ``root`` is (how the cache stores every file) stays inside."""
    real = root.resolve()
    target = (root / rel).resolve()
    homes = [real, *([real.parents[1] / "blobs"] if real.parent.name == "snapshots" else [])]
    if not any(target.is_relative_to(home) for home in homes):
        raise AbliterateError(f"{root}: {rel} is a link to {target}, outside the checkpoint; copy the file itself "
                              "into the checkpoint, or remove the link")


def quant_method(quantization: dict[str, Any]) -> str:
    """The ``quant_method`` a ``quantization_config`` names (as a string, whatever it holds)."""
    return str(quantization.get("quant_method", "unknown"))


def _weight_map(path: Path) -> dict[str, str]:
    """An index's ``weight_map``: tensor name -> shard file name, every name checked."""
    weight_map = _read_json(path, path.name).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise AbliterateError(f"{path}: no weight_map (an object of tensor name -> shard file)")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise AbliterateError(f"{path}: weight_map entry '{tensor}' is {shard!r}, not a shard file name")
        safe_name(shard, f"{path}: weight_map entry '{tensor}'")
    return weight_map


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AbliterateError(f"{path.parent}: no {what}") from None
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested too deep to parse
        raise AbliterateError(f"{path}: unreadable {what} ({exc})") from None
    if not isinstance(data, dict):
        raise AbliterateError(f"{path}: {what} is not a JSON object")
    return data
