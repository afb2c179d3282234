"""``abliterate verify``: check an output against its source, streaming, before publishing it.

Untouched tensors must be byte-identical; edited tensors must equal a fresh edit of the
source tensor and satisfy the strategy's invariants; headers, index, other files and
the manifest must be complete.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from .edits import TensorEdit
from .manifest import MANIFEST_NAME
from .pipeline import PRECISIONS, RewriteJob
from .safetensors_io import COPY_CHUNK, TensorEntry, read_tensor
from .strategy import Strategy
from .tensor_math import column_norms


def tolerance(dtype: torch.dtype) -> float:
    """Relative slack for invariants checked on weights stored in ``dtype``."""
    return max(4 * torch.finfo(dtype).eps, 1e-5)


def verify(job: RewriteJob, strategy: Strategy, output: Path, progress: bool = True) -> Iterator[str]:
    """Yield one line per problem found; none means the output is what the plan asked for."""
    ckpt = job.ckpt
    keep, _ = ckpt.other_files()
    for rel in keep:
        if rel.name != MANIFEST_NAME and (not (output / rel).is_file() or (output / rel).read_bytes() != (ckpt.root / rel).read_bytes()):
            yield f"{rel}: missing or different from the source"
    if ckpt.index_name and (not (output / ckpt.index_name).is_file()
                            or (output / ckpt.index_name).read_bytes() != (ckpt.root / ckpt.index_name).read_bytes()):
        yield f"{ckpt.index_name}: missing or different from the source"
    try:
        manifest = json.loads((output / MANIFEST_NAME).read_text())
        if not manifest.get("complete") or manifest.get("fingerprint") != job.fingerprint:
            yield f"{MANIFEST_NAME}: incomplete, or written for a different plan or inputs"
    except (OSError, ValueError):
        yield f"{MANIFEST_NAME}: missing or unreadable"
    compute = PRECISIONS[job.precision]
    with tqdm(total=ckpt.data_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="verify", disable=not progress) as bar:
        for shard in ckpt.shards:
            out = output / shard.name
            if not out.is_file() or out.stat().st_size != shard.header.file_size:
                yield f"{shard.name}: missing or of the wrong size"
                bar.update(shard.header.file_size)
                continue
            with ckpt.files.local(shard) as local, open(local, "rb") as a, open(out, "rb") as b:
                if b.read(len(shard.header.raw)) != shard.header.raw:
                    yield f"{shard.name}: header differs from the source's"
                for entry in shard.header.entries:
                    edit = job.edits.get(entry.name)
                    if edit is None:
                        if not _same_bytes(a, b, entry):
                            yield f"{entry.name}: not edited by the plan, yet its bytes changed"
                    else:
                        yield from _check_edit(edit, strategy, read_tensor(a, entry), read_tensor(b, entry), compute)
                    bar.update(entry.end - entry.start)


def _same_bytes(a, b, entry: TensorEntry) -> bool:
    a.seek(entry.start)
    b.seek(entry.start)
    left = entry.end - entry.start
    while left:
        n = min(left, COPY_CHUNK)
        if a.read(n) != b.read(n):
            return False
        left -= n
    return True


def _check_edit(edit: TensorEdit, strategy: Strategy, source: torch.Tensor, written: torch.Tensor,
                compute: torch.dtype) -> Iterator[str]:
    tol = tolerance(written.dtype)
    expected, _ = edit.apply(source, compute)
    scale = max(float(expected.abs().max()), 1e-30)
    if float((expected.to(compute) - written.to(compute)).abs().max()) > tol * scale:
        yield f"{edit.name}: differs from a fresh edit of the source tensor"
    w = written.to(compute).movedim(edit.axis, 0).reshape(written.shape[edit.axis], -1)
    norms = column_norms(w)
    if strategy.removes_direction and edit.scale == 1.0:
        along = (edit.direction.to(compute) @ w).abs()
        worst = float((along / norms.clamp_min(1e-30)).max()) if w.numel() else 0.0
        if worst > tol:
            yield f"{edit.name}: still writes along the direction (|r^T w| / |w| up to {worst:.2e})"
    if strategy.preserves_column_norms and edit.update is strategy.update_weight:
        s = source.to(compute).movedim(edit.axis, 0).reshape(source.shape[edit.axis], -1)
        before = column_norms(s)
        kept = norms > 0  # zeroed columns (parallel to r) are reported by rewrite, not kept
        worst = float(((norms - before).abs()[kept] / before[kept].clamp_min(1e-30)).max()) if kept.any() else 0.0
        if worst > tol:
            yield f"{edit.name}: column norms changed (relative change up to {worst:.2e})"
