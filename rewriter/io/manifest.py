"""The output's manifest: what produced it, which files it wrote, which shards are finished.

It is what makes a rerun resume, ``verify`` know the plan, and ``push`` upload exactly the
rewrite and nothing else that happens to sit in the folder.
"""
from __future__ import annotations

import json
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from .. import __version__
from ..errors import AbliterateError
from .files import DOWNLOAD_DIR, LOCK_NAME, PARTIAL, inside, safe_name, write_atomic

MANIFEST_NAME = "abliteration.json"


@dataclass
class Manifest:
    path: Path
    fingerprint: dict[str, Any]
    record: dict[str, Any] = field(default_factory=dict)  # provenance that does not change the bytes
    shards: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # every file of the rewrite besides the shards
    complete: bool = False

    @classmethod
    def prepare(cls, output: Path, fingerprint: dict[str, Any], record: dict[str, Any], expected: Collection[str],
                overwrite: bool) -> Manifest:
        """Start or resume the manifest of ``output``, which will hold the files named in ``expected``.

        A rerun with the same fingerprint resumes. With ``overwrite``, files an earlier
        rewrite recorded and leftover ``.partial`` files are removed. Any other file is
        someone else's: refused, listed, never deleted.
        """
        path = output / MANIFEST_NAME
        if output.is_symlink() or (output.exists() and not output.is_dir()):
            raise AbliterateError(f"output {output} exists and is not a directory")
        present = files_in(output)
        old = load_manifest(output) if MANIFEST_NAME in present else None
        mine = {*expected, MANIFEST_NAME, LOCK_NAME}
        recorded = set(old["shards"]) | set(old["files"]) if old else set()
        stale = {n for n in present if n.endswith(PARTIAL) and n[: -len(PARTIAL)] in mine | recorded}
        downloads = {n for n in present if n.startswith(DOWNLOAD_DIR + "/")}  # this run's --low-disk source
        # the record is written before anything else: without one, no file there is this tool's
        owned = mine if old is not None else {LOCK_NAME}
        foreign = sorted(set(present) - owned - recorded - stale - downloads)
        if foreign:
            shown = ", ".join(foreign[:8]) + (f" and {len(foreign) - 8} more" if len(foreign) > 8 else "")
            raise AbliterateError(f"output {output} holds files this tool did not write ({shown}); "
                                  "remove them or choose another directory")
        if old is not None and old.get("fingerprint") == fingerprint:
            return cls(path, fingerprint, record, dict(old["shards"]), list(old["files"]))
        if old is not None and not overwrite:
            raise AbliterateError(f"output {output} holds a rewrite of a different plan or inputs; "
                                  "pass --overwrite to replace it")
        for name in sorted((recorded | stale) - {MANIFEST_NAME}):
            target = output / name
            if target.is_file() or target.is_symlink():
                target.unlink()
        output.mkdir(parents=True, exist_ok=True)
        manifest = cls(path, fingerprint, record)
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

    def record_shard(self, name: str, target: Path) -> None:
        """Record ``target`` (just renamed into place) as finished."""
        size, mtime = _identity(target)
        self.shards[name] = {"size": size, "mtime_ns": mtime}
        self.save()

    def record_file(self, name: str) -> None:
        if name not in self.files:
            self.files.append(name)

    def save(self) -> None:
        doc = {
            "tool": "abliterate-rewriter",
            "tool_version": __version__,
            "complete": self.complete,
            "fingerprint": self.fingerprint,
            "record": self.record,
            "files": sorted(self.files),
            "shards": self.shards,
        }
        write_atomic(self.path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())


def load_manifest(output: Path) -> dict[str, Any] | None:
    """The manifest of ``output`` as a dict, or None when there is none or it is not a JSON object.

    This is the one place the record is read, and every name in it is acted on (removed by
    ``--overwrite``, uploaded by ``push``): a record that parses but has the wrong shape, or
    names a file outside ``output`` or behind a link, is refused here with a one-line error.
    The record itself is read without following a link.
    """
    path = output / MANIFEST_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            doc = json.loads(f.read())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    _check_record(doc, output)
    return doc


_FIELDS: dict[str, type] = {"tool": str, "tool_version": str, "complete": bool, "fingerprint": dict, "record": dict,
                           "files": list, "shards": dict}


def _check_record(doc: dict[str, Any], output: Path) -> None:
    """Every field of the record has the type ``save`` writes; every name is one ``prepare`` may act on."""
    where = output / MANIFEST_NAME
    for key, kind in _FIELDS.items():
        if not isinstance(doc.get(key), kind):
            _malformed(where, f"'{key}' is {_json_kind(doc.get(key))}, not {_json_kind(kind())}")
    for name in [*doc["files"], *doc["shards"]]:
        _check_name(output, name, where)
    for name, rec in doc["shards"].items():
        if not isinstance(rec, dict) or not all(_is_int(rec.get(k)) for k in ("size", "mtime_ns")):
            _malformed(where, f"shard {name!r} is recorded as {_json_kind(rec)}, not an object of integer size "
                              "and mtime_ns")


def _check_name(output: Path, name: object, where: Path) -> None:
    """A recorded name is a plain relative name below ``output``, reached through no link, and
    neither the record itself nor the lock."""
    try:
        inside(output, safe_name(name, where), where)
    except AbliterateError as exc:
        _malformed(where, str(exc).removeprefix(f"{where}: "))
    if name in (MANIFEST_NAME, LOCK_NAME):
        _malformed(where, f"it lists {name} among the files the rewrite wrote")


def _malformed(where: Path, problem: str) -> NoReturn:
    raise AbliterateError(f"{where}: {problem}; the record was edited or damaged: remove it (and the files it lists) "
                          "or choose another output")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_kind(value: object) -> str:
    """What a JSON value is, in words (never the value itself, which may be huge or nested deep)."""
    kinds = ((bool, "true or false"), (int, "a number"), (float, "a number"), (str, "a string"), (list, "a list"),
             (dict, "an object"))
    return next((word for kind, word in kinds if isinstance(value, kind)), "null")


def published_files(output: Path) -> list[str]:
    """What a finished rewrite consists of, per its manifest: shards and other files."""
    doc = load_manifest(output)
    if doc is None:
        raise AbliterateError(f"{output}: no readable {MANIFEST_NAME}; expected the output of rewrite")
    if not doc["complete"]:
        raise AbliterateError(f"{output}: the rewrite is not finished; run it again to complete it")
    for name, rec in doc["shards"].items():
        path = output / name
        if path.is_symlink() or not path.is_file() or path.stat().st_size != rec["size"]:
            raise AbliterateError(f"{output}: shard {name} is missing or changed since the rewrite")
    for name in doc["files"]:
        path = output / name
        if path.is_symlink() or not path.is_file():
            raise AbliterateError(f"{output}: {name} is missing or not a regular file")
    return sorted([*doc["shards"], *doc["files"]])


def files_in(folder: Path) -> list[str]:
    """Relative names of every file (and link) below ``folder``; links are listed, not followed."""
    if not folder.is_dir():
        return []
    out = []
    for root, dirs, names in os.walk(folder):
        rel = Path(root).relative_to(folder)
        out += [(rel / n).as_posix() for n in names]
        out += [(rel / d).as_posix() for d in dirs if (Path(root) / d).is_symlink()]
    return out


def _identity(path: Path) -> tuple[int | None, int | None]:
    try:
        st = path.stat()
    except OSError:
        return None, None
    return st.st_size, st.st_mtime_ns
