"""The streaming rewrite: source shards -> tensor stream -> edit -> shard writer -> output.

Knows nothing about architectures or strategies: it receives ready ``TensorEdit``s by
tensor name. Every other byte range is copied by the kernel, byte for byte. Memory holds
two stored-dtype tensor buffers per worker (one being written, one being edited) and one
shared working copy in the compute dtype: about workers + 1 times the largest edited
tensor in float32, where a stacked tensor (fused experts) counts as one slice.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..errors import AbliterateError
from ..io.checkpoint import Checkpoint, Shard
from ..io.files import copy_atomic, exclusive_lock, inside, is_no_space, no_space_message, write_atomic
from ..io.manifest import Manifest
from ..io.safetensors_io import TensorEntry, read_tensor
from ..io.shard_writer import ShardWriter
from .buffers import Scratch
from .edit import TensorEdit


@dataclass
class Summary:
    tensors_edited: int = 0
    columns_zeroed: int = 0
    bytes_written: int = 0
    shards_written: int = 0
    shards_reused: int = 0
    files_copied: int = 0
    weights_left_out: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        out = [
            f"tensors edited: {self.tensors_edited}",
            f"columns zeroed (parallel to the direction): {self.columns_zeroed}",
            f"shards written: {self.shards_written}, reused from an earlier run: {self.shards_reused}",
            f"bytes written: {self.bytes_written:,}",
            f"other files copied: {self.files_copied}",
            f"time: {self.seconds:.1f} s",
        ]
        if self.weights_left_out:
            out.append("left out (weights in another format, not edited): " + ", ".join(self.weights_left_out))
        return out


def check_output_path(source: Path, output: Path) -> None:
    src, out = source.resolve(), output.resolve()
    if out == src or src in out.parents:
        raise AbliterateError(f"output {output} is the source or inside it; the source is never written")


def rewrite(
    ckpt: Checkpoint,
    output: Path,
    edits: Mapping[str, TensorEdit],
    fingerprint: dict[str, Any],
    *,
    record: dict[str, Any] | None = None,
    compute: torch.dtype = torch.float32,
    overwrite: bool = False,
    progress: bool = True,
    workers: int = 1,
    on_shard: Callable[[str, Path], None] | None = None,
) -> Summary:
    """Write the edited checkpoint to ``output``; resumes a run with the same fingerprint.

    ``workers`` > 1 rewrites that many shards at once, on threads (torch kernels and file
    I/O release the GIL); memory grows accordingly. ``on_shard(name, path)`` is called,
    on a background thread and in order, as each output shard is finished (or found
    finished by a resumed run), e.g. to upload it while the next one is written.
    ``record`` (provenance: strategy, source, tool versions) goes into the manifest.
    """
    start = time.monotonic()
    check_output_path(ckpt.root, output)
    copies, foreign = ckpt.other_files()
    expected = [*(s.name for s in ckpt.shards), *copies, *([ckpt.index_name] if ckpt.index_name else [])]
    for name in expected:
        inside(output, name, "output")  # every name checked before a byte is written
    output.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(output):
        manifest = Manifest.prepare(output, fingerprint, record or {}, expected, overwrite)
        # One torch thread per worker: the edit math is memory-bound, and the cores are
        # needed for I/O; with more, OpenMP threads spin against them (measured: a
        # [3840, 15360] edit took 0.3-0.45 s on one thread, 0.45-2.3 s on two).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            summary = _rewrite(ckpt, output, edits, manifest, copies, compute, progress, workers, on_shard)
        except OSError as exc:
            if not is_no_space(exc):
                raise
            needed = sum(s.header.file_size for s in ckpt.shards if not manifest.finished(s.name, output / s.name))
            raise AbliterateError(no_space_message(Path(exc.filename or output), needed)) from None
        finally:
            torch.set_num_threads(threads)
    summary.weights_left_out = foreign
    summary.seconds = time.monotonic() - start
    return summary


def _rewrite(ckpt: Checkpoint, output: Path, edits: Mapping[str, TensorEdit], manifest: Manifest, copies: list[str],
             compute: torch.dtype, progress: bool, workers: int,
             on_shard: Callable[[str, Path], None] | None) -> Summary:
    summary = Summary()
    for rel in copies:
        copy_atomic(ckpt.root / rel, output / rel)
        manifest.record_file(rel)
        summary.files_copied += 1
    with tqdm(total=ckpt.data_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="rewrite",
              disable=not progress) as bar:
        run = _Run(ckpt, output, edits, manifest, compute, bar, summary, on_shard)
        try:
            if workers <= 1:
                for shard in ckpt.shards:
                    run.shard(shard)
            else:
                with ThreadPoolExecutor(workers, thread_name_prefix="shard") as pool:
                    futures = [pool.submit(run.shard, shard) for shard in ckpt.shards]
                    try:
                        for future in as_completed(futures):
                            future.result()
                    except BaseException:
                        for future in futures:
                            future.cancel()
                        raise
        except BaseException:
            run.close(failed=True)
            raise
        run.close(failed=False)
    if ckpt.index_name:
        write_atomic(output / ckpt.index_name, ckpt.index_bytes())
        manifest.record_file(ckpt.index_name)
    manifest.complete = True
    manifest.save()
    return summary


class _Run:
    """One rewrite's shared state. Workers stream shards; one finisher thread commits them
    (fsync, rename, manifest, ``on_shard``) in the order they were written, so that the next
    shard streams meanwhile and an upload overlaps the rest of the rewrite."""

    def __init__(self, ckpt: Checkpoint, output: Path, edits: Mapping[str, TensorEdit], manifest: Manifest,
                 compute: torch.dtype, bar: tqdm, summary: Summary, on_shard: Callable[[str, Path], None] | None) -> None:
        self.ckpt, self.output, self.edits, self.manifest = ckpt, output, edits, manifest
        self.scratch = Scratch(edits, ckpt, compute)
        self.bar, self.summary, self.on_shard = bar, summary, on_shard
        self.lock = threading.Lock()
        self.finisher = ThreadPoolExecutor(1, thread_name_prefix="finish")
        self.finishing: list[Future[None]] = []
        self.failed = False

    def advance(self, n: int) -> None:
        with self.lock:
            self.bar.update(n)

    def shard(self, shard: Shard) -> None:
        target = self.output / shard.name
        written = None
        if self.manifest.finished(shard.name, target):
            self.advance(shard.header.file_size)
        else:
            with self.ckpt.files.local(shard) as path:
                written = _write_shard(shard, path, target, self.edits, self.scratch, self.advance)
        with self.lock:
            self.finishing.append(self.finisher.submit(self._finish, shard, target, written))
            for done in [f for f in self.finishing if f.done()]:
                done.result()  # fail fast when finishing an earlier shard failed

    def _finish(self, shard: Shard, target: Path, written: _Written | None) -> None:
        try:
            if written is not None:
                written.writer.commit()
                self.manifest.record_shard(shard.name, target)
            self._count(written)
            if self.on_shard is not None and not self.failed:
                self.on_shard(shard.name, target)
        except BaseException:
            self.failed = True  # the shards queued behind this one are committed, not handed on
            raise

    def _count(self, written: _Written | None) -> None:
        s = self.summary
        if written is None:
            s.shards_reused += 1
        else:
            s.shards_written += 1
            s.bytes_written += written.writer.size
            s.tensors_edited += written.edited
            s.columns_zeroed += written.zeroed

    def close(self, failed: bool) -> None:
        """Wait for the finisher. After a failure, shards already written are still committed
        (a rerun reuses them) but no longer handed to ``on_shard``."""
        self.failed = self.failed or failed
        self.finisher.shutdown(wait=True)
        if not failed:
            for future in self.finishing:
                future.result()


@dataclass
class _Written:
    """A shard whose bytes are all written to its ``.partial`` file, waiting to be committed."""

    writer: ShardWriter
    edited: int
    zeroed: int


def _write_shard(
    shard: Shard,
    source: Path,
    target: Path,
    edits: Mapping[str, TensorEdit],
    scratch: Scratch,
    advance: Callable[[int], None],
) -> _Written:
    writer = ShardWriter(target, shard.header, depth=scratch.PENDING, written=advance)
    edited = zeroed = 0
    copied = len(shard.header.raw)  # source bytes before this offset are queued
    try:
        with open(source, "rb") as src:
            for entry in shard.header.entries:
                edit = edits.get(entry.name)
                if edit is None:
                    continue
                writer.copy(src.fileno(), copied, entry.start, src.name)  # the untouched run before it
                for piece, part in _pieces(edit, entry):
                    tensor = read_tensor(src, part, into=scratch.read_buffer())
                    zeroed += scratch.edit(piece, tensor)
                    writer.write_tensor(tensor)
                copied = entry.end
                edited += 1
            writer.copy(src.fileno(), copied, shard.header.file_size, src.name)
            writer.close()
        return _Written(writer, edited, zeroed)
    except BaseException:
        writer.abort()
        raise


def _pieces(edit: TensorEdit, entry: TensorEntry) -> Iterator[tuple[TensorEdit, TensorEntry]]:
    """The edit and byte range of each slice the tensor is streamed in: the whole tensor, or,
    for a stacked edit, each index of axis 0 (contiguous, since safetensors is row-major)."""
    n = edit.slices(entry.shape)
    if n == 1:
        yield edit, entry
        return
    step = (entry.end - entry.start) // n
    for i in range(n):
        start = entry.start + i * step
        yield edit.piece(i), replace(entry, name=f"{entry.name}[{i}]", shape=entry.shape[1:], start=start, end=start + step)
