"""The streaming rewrite: source shards -> tensor stream -> edit -> shard writer -> output.

Knows nothing about architectures or strategies: it receives ready ``TensorEdit``s by
tensor name. Every other tensor is copied byte for byte. One edited tensor (plus its
working copy) is in memory at a time.
"""
from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .checkpoint import Checkpoint, Shard
from .edits import TensorEdit
from .errors import AbliterateError
from .manifest import MANIFEST_NAME, Manifest
from .safetensors_io import ShardWriter, read_tensor, write_atomic


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
    compute: torch.dtype = torch.float32,
    overwrite: bool = False,
    progress: bool = True,
    workers: int = 1,
    on_shard: Callable[[str, Path], None] | None = None,
) -> Summary:
    """Write the edited checkpoint to ``output``; resumes a run with the same fingerprint.

    ``workers`` > 1 rewrites that many shards at once, on threads (the heavy work,
    torch kernels, file I/O and hashing, releases the GIL); memory grows accordingly.
    ``on_shard(name, path)`` is called as each output shard is finished (or found
    finished by a resumed run), e.g. to upload it while the next one is written.
    """
    start = time.monotonic()
    check_output_path(ckpt.root, output)
    manifest = Manifest.prepare(output, fingerprint, overwrite)
    # One torch thread per worker: the edit math is memory-bound, and the cores are
    # needed for hashing and I/O; with more, OpenMP threads spin against them (measured:
    # a [3840, 15360] edit took 0.3-0.45 s on one thread, 0.45-2.3 s on two).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _rewrite(ckpt, output, edits, manifest, start, compute, progress, workers, on_shard)
    finally:
        torch.set_num_threads(threads)


def _rewrite(ckpt: Checkpoint, output: Path, edits: Mapping[str, TensorEdit], manifest: Manifest, start: float,
             compute: torch.dtype, progress: bool, workers: int,
             on_shard: Callable[[str, Path], None] | None) -> Summary:
    summary = Summary()
    keep, foreign = ckpt.other_files()
    summary.weights_left_out = [str(p) for p in foreign]
    for rel in keep:
        if rel.name != MANIFEST_NAME:
            _copy_file(ckpt.root / rel, output / rel)
            summary.files_copied += 1
    lock = threading.Lock()
    with tqdm(total=ckpt.data_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="rewrite", disable=not progress) as bar:

        def advance(n: int) -> None:
            with lock:
                bar.update(n)

        def one(shard: Shard) -> None:
            target = output / shard.name
            if manifest.finished(shard.name, target):
                advance(shard.header.file_size)
                with lock:
                    summary.shards_reused += 1
            else:
                with ckpt.files.local(shard) as path:
                    edited, zeroed, size, sha = _write_shard(shard, path, target, edits, compute, advance)
                with lock:
                    manifest.record(shard.name, size, sha)
                    summary.shards_written += 1
                    summary.bytes_written += size
                    summary.tensors_edited += edited
                    summary.columns_zeroed += zeroed
            if on_shard is not None:
                with lock:
                    on_shard(shard.name, target)

        if workers <= 1:
            for shard in ckpt.shards:
                one(shard)
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="shard") as pool:
                futures = [pool.submit(one, shard) for shard in ckpt.shards]
                try:
                    for future in as_completed(futures):
                        future.result()
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
    if ckpt.index_name:
        write_atomic(output / ckpt.index_name, (ckpt.root / ckpt.index_name).read_bytes())
    manifest.complete = True
    manifest.save()
    summary.seconds = time.monotonic() - start
    return summary


def _write_shard(
    shard: Shard,
    source: Path,
    target: Path,
    edits: Mapping[str, TensorEdit],
    compute: torch.dtype,
    advance: Callable[[int], None],
) -> tuple[int, int, int, str]:
    """(tensors edited, columns zeroed, bytes, sha256) of one rewritten shard."""
    target.parent.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(target, shard.header)
    advance(len(shard.header.raw))
    edited = zeroed = 0
    try:
        with open(source, "rb") as src:
            for entry in shard.header.entries:
                edit = edits.get(entry.name)
                if edit is None:
                    writer.copy_range(src, entry.start, entry.end)
                else:
                    new, cols = edit.apply(read_tensor(src, entry), compute, reuse_input=True)
                    writer.write_tensor(new)
                    del new
                    edited += 1
                    zeroed += cols
                advance(entry.end - entry.start)
        return (edited, zeroed, *writer.finish())
    except BaseException:
        writer.abort()
        raise


def _copy_file(src: Path, dst: Path) -> None:
    """Copy through a temporary name so that a reader never sees half a file."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".partial")
    shutil.copyfile(src, tmp)
    tmp.chmod(0o644)
    tmp.replace(dst)
