"""A local safetensors checkpoint: config, shards, their headers, and the other files."""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from .errors import AbliterateError
from .safetensors_io import Header, TensorEntry, read_header

INDEX_SUFFIX = ".safetensors.index.json"
# Weights in other formats would carry the unedited model into the output: never copied.
FOREIGN_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".safetensors", ".bin.index.json")


@dataclass(frozen=True)
class Shard:
    name: str
    path: Path
    header: Header


@dataclass(frozen=True)
class Checkpoint:
    root: Path
    config: dict[str, Any]
    shards: tuple[Shard, ...]
    index_name: str | None

    @classmethod
    def open(cls, path: str | Path) -> Checkpoint:
        root = Path(path)
        if not root.is_dir():
            raise AbliterateError(f"checkpoint directory not found: {root}")
        config = _read_json(root / "config.json", "config.json")
        indexes = sorted(p.name for p in root.glob("*" + INDEX_SUFFIX))
        if len(indexes) > 1:
            raise AbliterateError(f"{root}: several safetensors indexes ({', '.join(indexes)}); keep one")
        if indexes:
            weight_map = _read_json(root / indexes[0], indexes[0]).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise AbliterateError(f"{root / indexes[0]}: no weight_map")
            names = list(dict.fromkeys(weight_map.values()))
        else:
            names = sorted(p.name for p in root.glob("*.safetensors"))
            if len(names) != 1:
                found = "no" if not names else f"{len(names)}"
                other = " (only safetensors checkpoints are supported)" if any(root.glob("*.bin")) else ""
                raise AbliterateError(f"{root}: {found} .safetensors files and no index{other}")
        shards = []
        for name in names:
            p = root / name
            if not p.is_file():
                raise AbliterateError(f"{root}: shard {name} listed in the index is missing")
            shards.append(Shard(name, p, read_header(p)))
        ckpt = cls(root, config, tuple(shards), indexes[0] if indexes else None)
        if indexes:
            ckpt._check_index(weight_map)
        return ckpt

    def _check_index(self, weight_map: dict[str, str]) -> None:
        for name, shard in self.shard_of.items():
            if weight_map.get(name) != shard.name:
                raise AbliterateError(f"{self.root}: index puts '{name}' in {weight_map.get(name)} but it is in {shard.name}")

    @cached_property
    def shard_of(self) -> dict[str, Shard]:
        return {e.name: s for s in self.shards for e in s.header.entries}

    @cached_property
    def names(self) -> frozenset[str]:
        return frozenset(self.shard_of)

    def entry(self, name: str) -> TensorEntry:
        return self.shard_of[name].header.entry(name)

    @property
    def data_bytes(self) -> int:
        return sum(s.header.file_size for s in self.shards)

    def other_files(self) -> tuple[list[Path], list[Path]]:
        """(files to copy: configs, tokenizer, templates, code; weight files in other formats, left out)."""
        skip = {s.name for s in self.shards} | ({self.index_name} if self.index_name else set())
        keep, foreign = [], []
        for p in sorted(self.root.rglob("*")):
            rel = p.relative_to(self.root)
            if not p.is_file() or p.name in skip or any(part.startswith(".") for part in rel.parts):
                continue
            (foreign if p.name.endswith(FOREIGN_WEIGHTS) else keep).append(rel)
        return keep, foreign


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise AbliterateError(f"{path.parent}: no {what}") from None
    except (OSError, ValueError) as exc:
        raise AbliterateError(f"{path}: unreadable {what} ({exc})") from None
    if not isinstance(data, dict):
        raise AbliterateError(f"{path}: {what} is not a JSON object")
    return data
