"""Every file the tool writes goes through here: names checked, links never followed,
written to ``NAME.partial`` and renamed into place, one mode for all.

A name taken from a checkpoint, an index or the Hub is hostile until checked: it must be a
plain relative path that stays inside its folder. Output files are created exclusively
with ``O_NOFOLLOW`` (a stale regular ``.partial`` is removed first, a planted link is
refused), so no write ever lands on a link's target; the final ``rename`` replaces the
directory entry itself, never what a link there points to.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from ..errors import AbliterateError

FILE_MODE = 0o644  # one rule for every file the tool writes: outputs, direction files, caches
PARTIAL = ".partial"
LOCK_NAME = ".abliterate.lock"
DOWNLOAD_DIR = ".abliterate-download"  # --low-disk: one source shard at a time, inside OUTPUT
_CHUNK = 16 << 20


def cache_root() -> Path:
    """``$ABLITERATE_CACHE``, else ``~/.cache/abliterate``: example models and cached logits."""
    return Path(os.environ.get("ABLITERATE_CACHE") or Path.home() / ".cache" / "abliterate")


def sha256_file(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def safe_name(name: object, where: object) -> str:
    """``name`` if it is a plain relative path (``a.safetensors``, ``sub/b.json``), else a one-line error.

    Refused: non-strings, empty names, absolute paths, ``..`` or ``.`` parts, backslashes,
    NUL and other control characters.
    """
    if not isinstance(name, str) or not name:
        raise AbliterateError(f"{where}: file name {name!r} is not a non-empty string")
    parts = PurePosixPath(name).parts
    if (name.startswith("/") or "\\" in name or any(ord(c) < 32 for c in name)
            or any(p in ("", ".", "..") for p in name.split("/")) or not parts):
        raise AbliterateError(f"{where}: file name {name!r} is not a plain relative name inside the folder")
    return name


def inside(root: Path, name: str, where: object) -> Path:
    """``root / name`` for writing: a checked ``name`` whose folders inside ``root`` are not links."""
    rel = safe_name(name, where)
    folder = root
    for part in rel.split("/")[:-1]:
        folder = folder / part
        if folder.is_symlink():
            raise AbliterateError(f"{where}: {folder} is a symbolic link; refusing to write through it")
    return root / rel


def _open_new(path: Path) -> int:
    """Create ``path`` for writing, exclusively, never through a link; a stale regular file is replaced."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(st.st_mode):
            raise AbliterateError(f"{path} exists and is not a regular file (a link?); remove it first")
        os.unlink(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except FileExistsError:
        raise AbliterateError(f"{path} appeared while it was being created; is another run writing here?") from None
    os.fchmod(fd, FILE_MODE)  # whatever the umask
    return fd


class PartialFile:
    """``NAME.partial`` opened for writing; ``commit`` fsyncs and renames it to ``NAME``."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.partial = final.with_name(final.name + PARTIAL)
        self.fd = _open_new(self.partial)

    def commit(self) -> None:
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
        if self.final.is_dir() and not self.final.is_symlink():
            raise AbliterateError(f"{self.final} is a directory; cannot replace it with a file")
        os.replace(self.partial, self.final)

    def abort(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.partial.unlink(missing_ok=True)


@contextmanager
def partial_file(final: Path) -> Iterator[BinaryIO]:
    """Write ``final`` atomically: a reader sees the old file or the whole new one, never half."""
    pf = PartialFile(final)
    try:
        with os.fdopen(os.dup(pf.fd), "wb") as f:
            yield f
    except BaseException:
        pf.abort()
        raise
    pf.commit()


def open_sequential(path: Path) -> BinaryIO:
    """``path`` opened for reading front to back, with the kernel told so (as ``cp`` does):
    its read-ahead doubles, which a copy from a cold page cache needs to keep up with ``cp``."""
    f = open(path, "rb")
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
    return f


def write_atomic(path: Path, data: bytes) -> None:
    with partial_file(path) as f:
        f.write(data)


def copy_atomic(src: Path, dst: Path) -> None:
    with partial_file(dst) as f, open(src, "rb") as s:
        shutil.copyfileobj(s, f, _CHUNK)


def no_space_message(path: Path, needed: int) -> str:
    """One line for a full disk: which file, how much more is needed, how much is free."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = 0
    return (f"no space left on the device while writing {path}: about {needed:,} more bytes are needed "
            f"and {free:,} are free; free some space and run the same command again to resume")


def is_no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def exclusive_lock(folder: Path, waiting: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` for the block, through a lock file inside it that
    names the holder and is removed on release. A second run fails at once, naming the holder;
    given ``waiting``, it is told the holder (``waiting(holder)``) and waits for the lock instead."""
    path = folder / LOCK_NAME
    fd = _lock_file(path, waiting)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # still holding the lock: nobody else can have it
        os.close(fd)


def _lock_file(path: Path, waiting: Callable[[str], None] | None) -> int:
    for _ in range(3):
        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise AbliterateError(f"{path} is not a regular file (a link?); remove it first")
        except FileNotFoundError:
            pass
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            if waiting is None:
                os.close(fd)
                raise AbliterateError(f"{path.parent} is being written by another run ({holder}); "
                                      "wait for it to finish or choose another output") from None
            waiting(holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder before us removed this file as we locked it: take the new one
    raise AbliterateError(f"{path}: could not take the lock; is another run starting here?")
