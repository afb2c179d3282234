"""The output's manifest: what produced it and which shards are finished, for resume."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import AbliterateError
from .safetensors_io import write_atomic

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
        """True when ``target`` is the file this manifest recorded: same size and modification time.

        Shards appear under their final name only once complete (written to ``.partial``,
        fsynced, renamed), so this catches a shard replaced or edited since, without
        reading it; ``abliterate verify`` compares contents.
        """
        rec = self.shards.get(name)
        return bool(rec) and _identity(target) == (rec.get("size"), rec.get("mtime_ns"))

    def record(self, name: str, target: Path) -> None:
        """Record ``target`` (just renamed into place) as finished."""
        size, mtime = _identity(target)
        self.shards[name] = {"size": size, "mtime_ns": mtime}
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


def _identity(path: Path) -> tuple[int | None, int | None]:
    try:
        st = path.stat()
    except OSError:
        return None, None
    return st.st_size, st.st_mtime_ns


def _load(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None
