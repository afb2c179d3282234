"""The streaming rewrite: source shards -> tensor stream -> edit -> shard writer -> output.

Knows nothing about architectures, strategies or quantized formats: it receives ready
edits by tensor name (``TensorEdit``, or ``CodedEdit`` for a weight stored as parts).
Every other byte range, and every tensor planned at scale 0, is copied by the kernel,
byte for byte. Memory: each worker holds two stored-dtype tensor buffers (one being
written, one being edited) and its own working copy in the compute dtype, about twice
the largest edited tensor in float32, where a stacked tensor (fused experts) counts as
one slice; a quantized weight is decoded, edited and re-encoded with about five float32
copies of itself (or of one expert slice per edit thread: a stacked weight's slices run
side by side).
"""
from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import torch
from tqdm import tqdm

from ..errors import AbliterateError
from ..io.checkpoint import Checkpoint, Shard
from ..io.files import (copy_atomic, exclusive_lock, inside, is_no_space, no_space_message, open_sequential,
                        write_atomic)
from ..io.manifest import Manifest
from ..io.safetensors_io import TensorEntry, read_tensor, tensor_from_bytes
from ..io.shard_writer import ShardWriter
from .buffers import Scratch
from .coded import CodedEdit
from .edit import TensorEdit
from .layout import Reshape, ShardLayout
from .threads import auto_edit_threads, auto_lanes, auto_workers, map_ordered

SAME = Reshape({}, {})
AnyEdit = TensorEdit | CodedEdit


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
    edits: Mapping[str, AnyEdit],
    fingerprint: dict[str, Any],
    *,
    record: dict[str, Any] | None = None,
    compute: torch.dtype = torch.float32,
    overwrite: bool = False,
    progress: bool = True,
    workers: int | None = None,
    edit_threads: int | None = None,
    on_shard: Callable[[str, Path], None] | None = None,
    reshape: Reshape = SAME,
) -> Summary:
    """Write the edited checkpoint to ``output``; resumes a run with the same fingerprint.

    ``edits`` maps stored tensor names to their edit; every stored part of a quantized
    weight maps to the same ``CodedEdit``. ``reshape`` lays out shards and files anew
    (a quantized checkpoint written out dequantized); by default the output has the
    source's layout.
    ``workers`` > 1 rewrites that many shards at once, on threads (torch kernels and file
    I/O release the GIL); memory grows accordingly; None chooses from the cores, shards and
    memory (``threads.auto_workers``). ``edit_threads`` threads per worker edit each tensor's
    column chunks (None: the cores the workers leave over). ``on_shard(name, path)`` is called,
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
        # One torch (OpenMP) thread: more cores are used by more workers and by edit threads,
        # each on its own column chunks, whose bits do not depend on the thread count (verify
        # recomputes on one). OpenMP threads spin against the I/O threads and anything else
        # running (measured on 2 shared cores: a [3840, 15360] edit took 0.13 s on one
        # thread, 5.7-8.5 s on two).
        scratch = Scratch({n: e for n, e in edits.items() if isinstance(e, TensorEdit)}, ckpt, compute)
        coded = [e.working_bytes for e in edits.values() if isinstance(e, CodedEdit)]
        stacked = [e.working_bytes for e in edits.values() if isinstance(e, CodedEdit) and coded_slices(ckpt, e) > 1]
        if workers is None:
            workers = auto_workers(len(ckpt.shards), scratch.worker_bytes + max(coded, default=0), bool(coded))
        if edit_threads is None:
            edit_threads = auto_edit_threads(workers, bool(coded))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            threads_all = workers * edit_threads
            lanes = auto_lanes(threads_all, workers, scratch.worker_bytes, max(stacked, default=0))
            with scratch.edit_threads(threads_all, lanes):
                summary = _rewrite(ckpt, output, edits, manifest, copies, scratch, progress, workers, on_shard,
                                   reshape)
        except OSError as exc:
            if not is_no_space(exc):
                raise
            needed = sum(reshape.size(s) for s in ckpt.shards if not manifest.finished(s.name, output / s.name))
            raise AbliterateError(no_space_message(Path(exc.filename or output), needed)) from None
        finally:
            torch.set_num_threads(threads)
    summary.weights_left_out = foreign
    summary.seconds = time.monotonic() - start
    return summary


def _rewrite(ckpt: Checkpoint, output: Path, edits: Mapping[str, AnyEdit], manifest: Manifest, copies: list[str],
             scratch: Scratch, progress: bool, workers: int,
             on_shard: Callable[[str, Path], None] | None, reshape: Reshape) -> Summary:
    summary = Summary()
    for rel in copies:
        if rel in reshape.files:
            write_atomic(output / rel, reshape.files[rel])
        else:
            copy_atomic(ckpt.root / rel, output / rel)
        manifest.record_file(rel)
        summary.files_copied += 1
    with tqdm(total=sum(reshape.size(s) for s in ckpt.shards), unit="B", unit_scale=True, unit_divisor=1024,
              desc="rewrite", disable=not progress) as bar:
        run = _Run(ckpt, output, edits, manifest, scratch, bar, summary, on_shard, reshape)
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
        write_atomic(output / ckpt.index_name, reshape.files.get(ckpt.index_name) or ckpt.index_bytes())
        manifest.record_file(ckpt.index_name)
    manifest.complete = True
    manifest.save()
    return summary


class _Run:
    """One rewrite's shared state. Workers stream shards; one finisher thread commits them
    (fsync, rename, manifest, ``on_shard``) in the order they were written, so that the next
    shard streams meanwhile and an upload overlaps the rest of the rewrite."""

    def __init__(self, ckpt: Checkpoint, output: Path, edits: Mapping[str, AnyEdit], manifest: Manifest,
                 scratch: Scratch, bar: tqdm, summary: Summary, on_shard: Callable[[str, Path], None] | None,
                 reshape: Reshape) -> None:
        self.ckpt, self.output, self.edits, self.manifest, self.reshape = ckpt, output, edits, manifest, reshape
        self.scratch = scratch
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
            self.advance(self.reshape.size(shard))
        else:
            with self.ckpt.files.local(shard) as path:
                layout = self.reshape.shards.get(shard.name)
                if layout is None:
                    written = _write_shard(self.ckpt, shard, path, target, self.edits, self.scratch, self.advance)
                else:
                    written = _write_laid_out(self.ckpt, shard, path, target, layout, self.edits, self.scratch,
                                              self.advance)
        with self.lock:
            self.finishing.append(self.finisher.submit(self._finish, shard, target, written))
            for done in [f for f in self.finishing if f.done()]:
                done.result()  # fail fast when finishing an earlier shard failed

    def _finish(self, shard: Shard, target: Path, written: _Written | None) -> None:
        try:
            if written is not None:
                try:
                    written.writer.close()  # the shard's last copies, still running after its worker moved on
                except BaseException:
                    written.writer.abort()
                    raise
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
    ckpt: Checkpoint,
    shard: Shard,
    source: Path,
    target: Path,
    edits: Mapping[str, AnyEdit],
    scratch: Scratch,
    advance: Callable[[int], None],
) -> _Written:
    writer = ShardWriter(target, shard.header, depth=scratch.pending, written=advance)
    edited = zeroed = 0
    copied = len(shard.header.raw)  # source bytes before this offset are queued
    coded_done: set[str] = set()  # parts of quantized weights already queued with write_at
    try:
        src = writer.hold(open_sequential(source))  # closed by the writer once its copies are done
        for entry in shard.header.entries:
            edit = edits.get(entry.name)
            if edit is None:
                continue
            if isinstance(edit, TensorEdit) and edit.scale == 0:
                edited += 1  # nothing changes: its bytes stay in the kernel's copy of the run
                continue
            writer.copy(src.fileno(), copied, entry.start, src.name)  # the untouched run before it
            if isinstance(edit, CodedEdit):
                if entry.name not in coded_done:
                    zeroed += _write_coded(ckpt, shard, src, edit, writer, scratch, coded_done)
                    edited += 1
                writer.skip(entry.end - entry.start)
            else:
                zeroed += _write_edited(src, entry, edit, scratch, writer)
                edited += 1
            copied = entry.end
        writer.copy(src.fileno(), copied, shard.header.file_size, src.name)
        writer.wait_for_buffers()  # the copies queued last run on while the next shard is read and edited
        return _Written(writer, edited, zeroed)
    except BaseException:
        writer.abort()
        raise


def _write_laid_out(ckpt: Checkpoint, shard: Shard, source: Path, target: Path, layout: ShardLayout,
                    edits: Mapping[str, AnyEdit], scratch: Scratch, advance: Callable[[int], None]) -> _Written:
    """An output shard with a header of its own: tensors made by decoding (one slice at a time
    when stacked) or taken from the source shard by name, copied or edited, in its order."""
    writer = ShardWriter(target, layout.header, depth=scratch.pending, written=advance)
    edited = zeroed = 0
    try:
        src = writer.hold(open_sequential(source))  # closed by the writer once its copies are done
        for out in layout.header.entries:
            made = layout.made.get(out.name)
            if made is not None:
                n = made.slices(out.shape)
                for i, parts in enumerate(part_slices(ckpt, shard, src, made.parts, n)):
                    writer.write_tensor((made.piece(i) if n > 1 else made).produce(parts, scratch.compute))
                edited += made.edit is not None
                continue
            entry = shard.header.entry(out.name)
            edit = edits.get(entry.name)
            if edit is None or (isinstance(edit, TensorEdit) and edit.scale == 0):
                writer.copy(src.fileno(), entry.start, entry.end, src.name)
            else:
                assert isinstance(edit, TensorEdit)
                zeroed += _write_edited(src, entry, edit, scratch, writer)
            edited += edit is not None
        writer.wait_for_buffers()  # the copies queued last run on while the next shard is read and edited
        return _Written(writer, edited, zeroed)
    except BaseException:
        writer.abort()
        raise


def _write_edited(src: BinaryIO, entry: TensorEntry, edit: TensorEdit, scratch: Scratch, writer: ShardWriter) -> int:
    """Read, edit and queue one tensor (slice by slice when stacked); returns the columns zeroed."""
    zeroed = 0
    for piece, part in _pieces(edit, entry):
        tensor = read_tensor(src, part, into=scratch.read_buffer())
        zeroed += scratch.edit(piece, tensor)
        writer.write_tensor(tensor)
    return zeroed


def _write_coded(ckpt: Checkpoint, shard: Shard, src: BinaryIO, edit: CodedEdit, writer: ShardWriter,
                 scratch: Scratch, done: set[str]) -> int:
    """Decode, edit and re-encode a quantized weight, one slice at a time when stacked, and queue
    its parts that live in this shard for their places in it; returns the columns zeroed.

    A part in another shard is read from there; that shard's own pass recomputes the same
    bits (the edit is deterministic), so nothing is held between shards.
    """
    here = [shard.header.entry(p) for p in edit.parts if p in shard.header.by_name]
    n = coded_slices(ckpt, edit)
    # a stacked weight's slices run side by side, one per edit thread, each single-threaded: most
    # of a slice's decoding and re-encoding is one thread's work, which column chunks do not split
    lanes = scratch.lanes if n > 1 else 1
    inner = scratch.pool if lanes <= 1 else None
    # a whole weight's parts are read into this thread's buffers; a stacked one's slices, small
    # and several in flight, into their own
    into = scratch.part_buffer if n == 1 else None

    def apply(item: tuple[int, dict[str, torch.Tensor]]) -> tuple[int, dict[str, torch.Tensor], int]:
        i, parts = item
        piece = edit.piece(i) if n > 1 else edit
        numel = math.prod(piece.shape)
        new, z = piece.apply(parts, scratch.compute, inner, scratch.workspace(numel), scratch.decoded(numel))
        return i, (_apart(new, parts) if into is not None else new), z

    zeroed = 0
    items = enumerate(part_slices(ckpt, shard, src, edit.parts, n, into))
    for i, new, z in map_ordered(scratch.pool, apply, items, lanes):
        zeroed += z
        for e in here:
            writer.write_at(slice_entry(e, i, n).start, new[e.name])
    done.update(e.name for e in here)
    return zeroed


def coded_slices(ckpt: Checkpoint, edit: CodedEdit) -> int:
    """How many slices along axis 0 every part is streamed in (1 unless the edit is stacked)."""
    shapes = [ckpt.entry(p).shape for p in edit.parts]
    n = edit.slices(shapes[0])
    if n > 1 and any(not s or s[0] != n for s in shapes):
        raise AbliterateError(f"{edit.name}: parts {', '.join(edit.parts)} do not share axis 0 ({n} slices)")
    return n


def part_slices(ckpt: Checkpoint, shard: Shard, src: BinaryIO, parts: tuple[str, ...], n: int,
                into: Callable[[int, int], bytearray] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Slice i of every part, for i in range(n) (the whole parts when n is 1), each read from
    this shard's open file or from the shard that holds it; with ``into``, part k of this
    shard into ``into(k, bytes)``."""
    entries = [ckpt.entry(p) for p in parts]
    for i in range(n):
        yield {e.name: read_part(ckpt, shard, src, slice_entry(e, i, n),
                                 into(k, e.end - e.start) if into is not None else None)
               for k, e in enumerate(entries)}


def read_part(ckpt: Checkpoint, shard: Shard, src: BinaryIO, entry: TensorEntry,
              into: bytearray | None = None) -> torch.Tensor:
    """One stored part (or slice of it) in its stored dtype, from this shard's open file (into
    the front of ``into`` when given) or another shard."""
    owner = ckpt.shard_of[entry.name.partition("[")[0]]
    if owner.name == shard.name:
        return read_tensor(src, entry, into=into, stored=True)
    return tensor_from_bytes(bytearray(ckpt.files.read(owner, entry.start, entry.end)), entry, stored=True)


def _apart(new: dict[str, torch.Tensor], parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The re-encoded parts, each copied where it shares memory with a stored part (a codec
    may return a part it left unchanged, or a view of one): the stored parts were read into
    buffers that the thread's next weight overwrites while these may still be queued."""
    held = {p.untyped_storage().data_ptr() for p in parts.values()}
    return {k: v.clone() if v.untyped_storage().data_ptr() in held else v for k, v in new.items()}


def slice_entry(entry: TensorEntry, index: int, count: int) -> TensorEntry:
    """Slice ``index`` of ``count`` along axis 0, as an entry of its own (contiguous: safetensors
    is row-major); the entry itself when ``count`` is 1."""
    if count == 1:
        return entry
    step = (entry.end - entry.start) // count
    start = entry.start + index * step
    return replace(entry, name=f"{entry.name}[{index}]", shape=entry.shape[1:], start=start, end=start + step)


def _pieces(edit: TensorEdit, entry: TensorEntry) -> Iterator[tuple[TensorEdit, TensorEntry]]:
    """The edit and byte range of each slice the tensor is streamed in: the whole tensor, or,
    for a stacked edit, each index of axis 0."""
    n = edit.slices(entry.shape)
    for i in range(n):
        yield (edit.piece(i) if n > 1 else edit), slice_entry(entry, i, n)
