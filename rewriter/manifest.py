"""The output's manifest: what produced it and which shards are finished, for resume."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import AbliterateError
from .safetensors_io import file_sha256, write_atomic

MANIFEST_NAME = "abliteration.json"


@dataclass
class Manifest:
    path: Path
    fingerprint: dict[str, Any]
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)
    complete: bool = False

    @classmethod
    def prepare(cls, output: Path, fingerprint: dict[str, Any], overwrite: bool) -> Manifest:
        """Start or resume the manifest of ``output``, refusing to clobber someone else's files."""
        path = output / MANIFEST_NAME
        if output.exists() and not output.is_dir():
            raise AbliterateError(f"output {output} exists and is not a directory")
        if output.is_dir() and any(output.iterdir()) and not overwrite:
            old = _load(path)
            if old is None:
                raise AbliterateError(f"output {output} is not empty and holds no {MANIFEST_NAME}; choose another directory or pass --overwrite")
            if old.get("fingerprint") != fingerprint:
                raise AbliterateError(f"output {output} holds a rewrite of a different plan or inputs; pass --overwrite to replace it")
            return cls(path, fingerprint, dict(old.get("shards") or {}))
        output.mkdir(parents=True, exist_ok=True)
        manifest = cls(path, fingerprint)
        manifest.save()
        return manifest

    def finished(self, name: str, target: Path) -> bool:
        """True when ``target`` is the shard this manifest recorded, by size and sha256."""
        rec = self.shards.get(name)
        return bool(rec) and target.is_file() and target.stat().st_size == rec["size"] and file_sha256(target) == rec["sha256"]

    def record(self, name: str, size: int, sha256: str) -> None:
        self.shards[name] = {"size": size, "sha256": sha256}
        self.save()

    def save(self) -> None:
        doc = {
            "tool": "abliterate-rewriter",
            "tool_version": __version__,
            "complete": self.complete,
            "fingerprint": self.fingerprint,
            "shards": self.shards,
        }
        write_atomic(self.path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())


def _load(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None
