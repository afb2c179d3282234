"""Streams one output shard to ``NAME.partial`` on background threads; ``commit`` renames it into place.

safetensors has no streaming writer, but a rewrite changes no shape and no dtype: the
source header (tensor order, offsets, ``__metadata__``, padding) is reused byte for byte
and tensor data follows it, so memory never grows with shard size. Untouched byte ranges
are copied by the kernel (``copy_file_range``, as ``cp`` does: no trip through user space)
on one thread, and edited tensors are written from memory on another, each at its own
offset, so that neither waits for the other (with one thread for both, the copy of the
untouched tensors between two edited ones held up every write, and the caller's next
edit with it). Their system calls take turns, each short (see ``_WRITE`` and ``_COPY``).
Both run while the caller reads and edits the next tensor, and, once the shard's last
buffer is written (``wait_for_buffers``), while it goes on to the next shard: copies hold
no memory, and the files they read from are held open until ``close``.
"""
from __future__ import annotations

import errno
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch

from ..errors import AbliterateError
from .files import PartialFile
from .safetensors_io import Header

# Bytes per pwrite. A larger call lets Linux (6.x, ext4 and others with large folios) put
# the written bytes in large page-cache folios, taken from the free blocks that a VM's
# free-page reporting has handed back to its host: the host faults each one in again as it
# is filled. Here (Firecracker, benchmarks/write_size.py) 512 MiB written in 2 MiB calls
# took 3.9-4.5 s of system time, in 256 KiB calls 0.14-0.16 s, and a block-FP8 rewrite's
# system time fell from 9.2-9.7 s to 3.5-4.2 s (where the host holds back more memory than
# a run frees, every call pays, whatever its size). ``cp`` copies through 64 KiB pipe
# buffers (copy_file_range) and meets it less.
_WRITE = 256 << 10
# Bytes per copy_file_range call. The file system writes one file from one call at a time
# (ext4 holds the inode's lock for a whole write): a call that waited for the lock spun on
# a core while the other thread's call copied, up to 13% of a dense rewrite's CPU where
# page faults slowed the kernel's copies (perf: rwsem_spin_on_owner). So the two threads
# take turns under a lock of their own, sleeping while they wait, for calls this short.
_COPY = 8 << 20
_CHUNK = 16 << 20  # buffer of the user-space fallback copy
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}


class _Copy(NamedTuple):
    """Bytes [start, start + length) of the open file ``fd``, for ``offset`` in the shard."""

    fd: int
    start: int
    length: int
    name: str
    offset: int


class _At(NamedTuple):
    """Data for ``offset`` in the shard."""

    offset: int
    data: bytes | memoryview


class ShardWriter:
    """Bounded by ``depth`` tensors queued for writing (a queued range copy holds no memory).

    ``written(n)`` is called on the writer threads as each piece reaches the file (progress).
    Errors on the writer threads surface on the caller's next call, or in ``close``.
    """

    def __init__(self, final: Path, header: Header, depth: int = 1,
                 written: Callable[[int], None] = lambda n: None) -> None:
        self.final = final
        self._written = written
        self._file = PartialFile(final)
        self._fd = self._file.fd
        self.size = 0
        self._position = 0  # where the next sequential piece goes
        self._buffers = threading.Semaphore(depth)
        self._error: BaseException | None = None
        self._kernel_copy = hasattr(os, "copy_file_range")
        self._turn = threading.Lock()  # one system call writes to the file at a time (see _COPY)
        self._held: list[BinaryIO] = []
        self._depth = depth
        self._writes: queue.SimpleQueue[_At | None] = queue.SimpleQueue()
        self._copies: queue.SimpleQueue[_Copy | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._drain, args=(q,), name=f"{name} {final.name}", daemon=True)
                         for q, name in ((self._writes, "write"), (self._copies, "copy"))]
        for thread in self._threads:
            thread.start()
        self.write(header.raw)

    def _drain(self, items: queue.SimpleQueue[_At | None] | queue.SimpleQueue[_Copy | None]) -> None:
        while (item := items.get()) is not None:
            try:
                if self._error is None:
                    self._written(self._do(item))
            except BaseException as exc:  # reported to the caller on its next call
                if isinstance(exc, OSError) and exc.filename is None:
                    exc.filename = str(self._file.partial)
                self._error = exc
            finally:
                if isinstance(item, _At):  # a buffer; a copy holds none
                    self._buffers.release()

    def _do(self, item: _At | _Copy) -> int:
        """Carry out one queued item; returns the bytes it added to the file."""
        if isinstance(item, _Copy):
            self._copy(item)
            return item.length
        _write_all(self._fd, item.data, item.offset, self._turn)
        return memoryview(item.data).nbytes

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, data: bytes | memoryview) -> None:
        """Queue ``data`` (waits while ``depth`` buffers are pending); the caller must not modify it afterwards."""
        n = memoryview(data).nbytes
        self._put_buffer(_At(self._position, data))
        self._position += n
        self.size += n

    def _put_buffer(self, item: _At) -> None:
        self._buffers.acquire()
        self._check()
        self._writes.put(item)

    def write_tensor(self, tensor: torch.Tensor) -> None:
        self.write(tensor_bytes(tensor))

    def write_at(self, offset: int, tensor: torch.Tensor) -> None:
        """Queue ``tensor``'s bytes for absolute ``offset``, ahead of the sequential stream, which
        must then ``skip`` that range when it gets there (parts of a quantized weight written
        together, wherever they lie in the shard)."""
        self._put_buffer(_At(offset, tensor_bytes(tensor)))
        self.size += tensor.nbytes

    def skip(self, length: int) -> None:
        """Move the sequential stream past ``length`` bytes queued earlier with ``write_at``."""
        self._check()
        self._position += length

    def hold(self, source: BinaryIO) -> BinaryIO:
        """Keep ``source`` (which queued copies read from) open until ``close`` or ``abort``; returns it."""
        self._held.append(source)
        return source

    def wait_for_buffers(self) -> None:
        """Wait until every queued buffer is written, so that the caller may reuse them; queued
        copies may still be running."""
        for _ in range(self._depth):
            self._buffers.acquire()
        for _ in range(self._depth):
            self._buffers.release()
        self._check()

    def copy(self, fd: int, start: int, end: int, name: str) -> None:
        """Queue bytes [start, end) of the open file ``fd`` (named ``name`` in errors); it must stay open until ``close``."""
        self._check()
        if end > start:
            self._copies.put(_Copy(fd, start, end - start, name, self._position))
            self._position += end - start
            self.size += end - start

    def _copy(self, item: _Copy) -> None:
        start, left, offset = item.start, item.length, item.offset
        while left:
            n = self._kernel(item.fd, start, min(left, _COPY), offset) if self._kernel_copy else 0
            if n == 0:  # refused, or nothing copied (some file systems answer so): through memory
                self._kernel_copy = False
                n = _copy_through_memory(item.fd, start, min(left, _CHUNK), self._fd, offset, self._turn)
            if n == 0:
                raise AbliterateError(f"{item.name}: unexpected end of file")
            start, left, offset = start + n, left - n, offset + n

    def _kernel(self, src: int, start: int, count: int, offset: int) -> int:
        """Bytes copied in the kernel; 0 where this pair of files does not allow it."""
        try:
            with self._turn:
                return os.copy_file_range(src, self._fd, count, start, offset)
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
            return 0

    def close(self) -> None:
        """Wait until everything queued is written; closes the held source files."""
        try:
            self._stop()
        finally:
            self._release_sources()
        self._check()

    def _stop(self) -> None:
        for items in (self._writes, self._copies):
            items.put(None)
        for thread in self._threads:
            thread.join()

    def _release_sources(self) -> None:
        while self._held:
            self._held.pop().close()

    def commit(self) -> int:
        """fsync and rename ``NAME.partial`` to ``NAME``; returns the size. Call after ``close``."""
        self._file.commit()
        return self.size

    def abort(self) -> None:
        """Stop and remove the partial file (the caller is raising)."""
        self._error = self._error or AbliterateError("aborted")
        self._stop()
        self._release_sources()
        self._file.abort()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes as stored (numpy has no view of some dtypes, e.g. float8: go through uint8)."""
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def _write_all(fd: int, data: bytes | memoryview, offset: int, turn: threading.Lock) -> None:
    """Write everything at ``offset``, ``_WRITE`` bytes a call, each call holding ``turn``."""
    view = memoryview(data).cast("B")
    while view:
        with turn:
            n = os.pwrite(fd, view[:_WRITE], offset)
        view, offset = view[n:], offset + n


def _copy_through_memory(src: int, start: int, count: int, dst: int, offset: int, turn: threading.Lock) -> int:
    data = os.pread(src, count, start)
    _write_all(dst, data, offset, turn)
    return len(data)
