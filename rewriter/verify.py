"""``abliterate verify``: check an output against its source, streaming, before publishing it.

Untouched tensors must be byte-identical. Edited tensors are recomputed from the source
exactly as the rewrite computes them (same kernels, one thread) and must match bit for
bit; under another torch version, where bit equality cannot be promised, every element
must lie within a stated number of ulps of its own recomputed value, and any NaN/inf
difference fails. The strategy's invariants are checked too. Every mismatching tensor
is reported, not only the first.
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import torch
from tqdm import tqdm

from . import dtypes
from .engine.coded import CodedEdit
from .engine.edit import TensorEdit
from .engine.layout import ShardLayout
from .engine.rewrite import coded_slices, part_slices, slice_entry
from .errors import AbliterateError
from .io.checkpoint import Shard
from .io.files import LOCK_NAME, sha256_file
from .io.hub import HubFiles, hidden, parse_spec, repo_files
from .io.manifest import MANIFEST_NAME, files_in, load_manifest
from .io.safetensors_io import COPY_CHUNK, TensorEntry, read_tensor
from .pipeline import RewriteJob

FOREIGN_TORCH_ULPS = 2  # allowed when the output was written by another torch version


def tolerance(dtype: torch.dtype) -> float:
    """Relative slack for the invariants (properties of the math, checked in the stored dtype)."""
    return max(4 * torch.finfo(dtype).eps, 1e-5)


def allowed_ulps(manifest: dict[str, Any] | None) -> int:
    """0 (bit-exact) when this torch version wrote the output of ``manifest``, else ``FOREIGN_TORCH_ULPS``."""
    record = (manifest or {}).get("record") or {}
    return 0 if record.get("torch_version") == torch.__version__ else FOREIGN_TORCH_ULPS


class Published(Protocol):
    """The output being checked: a local folder, or a Hub repo read file by file."""

    name: str

    def names(self) -> list[str]:
        """Every file it holds."""

    def size(self, rel: str) -> int | None:
        """A file's size; None when it is missing (or, locally, not a regular file)."""

    def read(self, rel: str) -> bytes | None:
        """A small file's bytes; None when it is missing."""

    def local(self, rel: str) -> AbstractContextManager[Path]:
        """A (weight) file as a local file for the duration of the block."""

    def manifest(self) -> dict[str, Any] | None:
        """Its record (``abliteration.json``), checked as every record is; None without one."""

    def extras(self, manifest: dict[str, Any]) -> dict[str, bytes | None]:
        """Files it may hold besides the rewrite's own, with the bytes each must have (None: any)."""


@dataclass(frozen=True)
class LocalOutput:
    """A rewrite's OUTPUT folder, as rewrite left it."""

    path: Path

    @property
    def name(self) -> str:
        return str(self.path)

    def names(self) -> list[str]:
        return files_in(self.path)

    def size(self, rel: str) -> int | None:
        p = self.path / rel
        return p.stat().st_size if p.is_file() and not p.is_symlink() else None

    def read(self, rel: str) -> bytes | None:
        return (self.path / rel).read_bytes() if self.size(rel) is not None else None

    @contextmanager
    def local(self, rel: str) -> Iterator[Path]:
        yield self.path / rel

    def manifest(self) -> dict[str, Any] | None:
        return load_manifest(self.path)

    def extras(self, manifest: dict[str, Any]) -> dict[str, bytes | None]:
        return {}


# What push adds to a repo besides the rewrite's files: the card (free text) and the plan and
# direction file, each checked against the record.
CARD, PLAN_FILE, DIRECTIONS_FILE = "README.md", "plan.yml", "directions.safetensors"


class HubOutput:
    """A published repo ``ORG/NAME[@REVISION]``: small files and the record downloaded into
    ``work`` (real files, never the cache's links), weight files into the Hugging Face cache,
    or with ``low_disk`` into ``work`` one at a time, each deleted once checked."""

    def __init__(self, repo: str, revision: str | None, work: Path, low_disk: bool) -> None:
        self.commit, self.sizes = repo_files(repo, revision)
        self.name = f"{repo}@{self.commit}"
        self.work = work
        self.small = HubFiles(repo, self.commit, work / "files")
        self.weights = HubFiles(repo, self.commit, work / "files" if low_disk else None)

    def names(self) -> list[str]:
        return list(self.sizes)

    def size(self, rel: str) -> int | None:
        return self.sizes.get(rel)

    def read(self, rel: str) -> bytes | None:
        if rel not in self.sizes:
            return None
        with self.small.fetch(rel) as path:
            return path.read_bytes()

    def local(self, rel: str) -> AbstractContextManager[Path]:
        return self.weights.fetch(rel)

    def manifest(self) -> dict[str, Any] | None:
        data = self.read(MANIFEST_NAME)
        if data is None:
            return None
        folder = self.work / "record"
        folder.mkdir(exist_ok=True)
        (folder / MANIFEST_NAME).write_bytes(data)
        return load_manifest(folder)

    def extras(self, manifest: dict[str, Any]) -> dict[str, bytes | None]:
        from .io.publish import plan_yaml

        housekeeping = {n: None for n in self.sizes if hidden(n)}  # .gitattributes
        return {**housekeeping, CARD: None, PLAN_FILE: plan_yaml(manifest), DIRECTIONS_FILE: None}

    def directions(self, manifest: dict[str, Any]) -> Path:
        """The published direction file, downloaded into ``work``, if it is the one the record names."""
        if DIRECTIONS_FILE not in self.sizes:
            raise AbliterateError(f"{self.name} is unverifiable: it holds no {DIRECTIONS_FILE}, so the edit "
                                  "cannot be recomputed")
        path = self.small.download(DIRECTIONS_FILE)
        if sha256_file(path) != manifest["fingerprint"].get("directions_sha256"):
            raise AbliterateError(f"{self.name} is unverifiable: its {DIRECTIONS_FILE} does not match the "
                                  f"direction file's sha256 in its {MANIFEST_NAME}")
        return path


@contextmanager
def open_published(spec: str, low_disk: bool = False) -> Iterator[tuple[Published, Path | None]]:
    """The output ``spec`` names (a local folder, or a Hub repo ``ORG/NAME[@REVISION]``), and with
    ``low_disk`` a folder for a Hub base's shards (else None); what is downloaded outside the
    Hugging Face cache goes into a temporary folder, removed after the block."""
    hub = parse_spec(spec)
    if hub is None and not Path(spec).is_dir():
        raise AbliterateError(f"output {spec} is not a directory (nor a Hub repo ORG/NAME[@REVISION])")
    with tempfile.TemporaryDirectory(prefix="abliterate-verify-") as tmp:
        work = Path(tmp)
        published = HubOutput(*hub, work, low_disk) if hub else LocalOutput(Path(spec))
        yield published, (work / "base" if low_disk else None)


def verify(job: RewriteJob, output: Path | Published, *, ulps: int = 0, progress: bool = True) -> Iterator[str]:
    """Yield one line per problem found; none means the output is what the plan asked for."""
    published = LocalOutput(output) if isinstance(output, Path) else output
    yield from _check_files(job, published)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the rewrite's own setting: the same reductions, the same bits
    try:
        yield from _check_shards(job, published, ulps, progress)
    finally:
        torch.set_num_threads(threads)


def _check_files(job: RewriteJob, output: Published) -> Iterator[str]:
    ckpt = job.ckpt
    keep, _ = ckpt.other_files()
    made = job.reshape.files
    copies = [(rel, made.get(rel) or (ckpt.root / rel).read_bytes()) for rel in keep]
    if ckpt.index_name:
        copies.append((ckpt.index_name, made.get(ckpt.index_name) or ckpt.index_bytes()))
    for rel, data in copies:
        if output.read(rel) != data:
            yield f"{rel}: missing or different from {'what the rewrite writes' if rel in made else 'the source'}"
    manifest = output.manifest()
    extras: dict[str, bytes | None] = {}
    if manifest is None:
        yield f"{MANIFEST_NAME}: missing or unreadable"
    else:
        if not manifest.get("complete"):
            yield f"{MANIFEST_NAME}: the rewrite is not finished"
        yield from _fingerprint_differences(manifest.get("fingerprint") or {}, job.fingerprint)
        extras = output.extras(manifest)
        for name, expected in extras.items():
            if expected is not None and output.read(name) != expected:
                yield f"{name}: missing or not the plan the record holds"
    ours = {s.name for s in ckpt.shards} | {rel for rel, _ in copies} | {MANIFEST_NAME, LOCK_NAME} | set(extras)
    for name in sorted(set(output.names()) - ours):
        yield f"{name}: not written by this rewrite (push leaves it out; remove it)"


_WHAT = {"plan": "a different plan", "directions_sha256": "a different direction file",
         "source_headers": "a different source checkpoint", "origin": "a different source revision"}


def _fingerprint_differences(written: dict[str, Any], expected: dict[str, Any]) -> Iterator[str]:
    for key in sorted(set(written) | set(expected)):
        if written.get(key) == expected.get(key):
            continue
        if key in _WHAT:
            yield f"{MANIFEST_NAME}: the output was written with {_WHAT[key]} than the one being verified"
        else:
            yield f"{MANIFEST_NAME}: the output was written with {key} {written.get(key)!r}, not {expected.get(key)!r}"


def _check_shards(job: RewriteJob, output: Published, ulps: int, progress: bool) -> Iterator[str]:
    ckpt = job.ckpt
    total = sum(job.reshape.size(s) for s in ckpt.shards)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verify", disable=not progress) as bar:
        for shard in ckpt.shards:
            layout = job.reshape.shards.get(shard.name)
            header = layout.header if layout else shard.header
            if output.size(shard.name) != header.file_size:
                yield f"{shard.name}: missing or of the wrong size"
                bar.update(header.file_size)
                continue
            with (ckpt.files.local(shard) as local, output.local(shard.name) as out,
                  open(local, "rb") as a, open(out, "rb") as b):
                if b.read(len(header.raw)) != header.raw:
                    yield f"{shard.name}: header differs from the {'expected' if layout else 'source'}'s"
                if layout is not None:
                    yield from _check_laid_out(job, shard, layout, a, b, ulps, bar)
                    continue
                coded_done: set[str] = set()
                for entry in shard.header.entries:
                    edit = job.stored_edits.get(entry.name)
                    if edit is None:
                        if not _same_bytes(a, b, entry):
                            yield f"{entry.name}: not edited by the plan, yet its bytes changed"
                    elif isinstance(edit, CodedEdit):
                        if entry.name not in coded_done:
                            yield from _check_coded(job, edit, shard, a, b, ulps, coded_done)
                    else:
                        yield from _check_edit(job, edit, read_tensor(a, entry), read_tensor(b, entry), ulps)
                    bar.update(entry.end - entry.start)


def _check_laid_out(job: RewriteJob, shard: Shard, layout: ShardLayout, a: BinaryIO, b: BinaryIO, ulps: int,
                    bar: tqdm) -> Iterator[str]:
    """An output shard with a header of its own: decoded tensors against a fresh decode (and
    edit), the others against the source tensor of the same name."""
    for out in layout.header.entries:
        made = layout.made.get(out.name)
        if made is not None:
            n = made.slices(out.shape)
            for i, parts in enumerate(part_slices(job.ckpt, shard, a, made.parts, n)):
                expected = (made.piece(i) if n > 1 else made).produce(parts, job.compute)
                problem = compare(expected, read_tensor(b, slice_entry(out, i, n)), ulps)
                if problem:
                    yield f"{out.name}{f' (slice {i})' if n > 1 else ''}: {problem}"
                    break
        else:
            entry = shard.header.entry(out.name)
            edit = job.stored_edits.get(out.name)
            if edit is None:
                if not _same_bytes(a, b, entry, out.start):
                    yield f"{out.name}: not edited by the plan, yet its bytes changed"
            else:
                assert isinstance(edit, TensorEdit)
                yield from _check_edit(job, edit, read_tensor(a, entry), read_tensor(b, out), ulps)
        bar.update(out.end - out.start)


def _same_bytes(a: BinaryIO, b: BinaryIO, entry: TensorEntry, at: int | None = None) -> bool:
    """Whether ``entry``'s bytes in ``a`` equal those in ``b`` at ``at`` (default: the same offset)."""
    a.seek(entry.start)
    b.seek(entry.start if at is None else at)
    left = entry.end - entry.start
    while left:
        n = min(left, COPY_CHUNK)
        if a.read(n) != b.read(n):
            return False
        left -= n
    return True


def _check_edit(job: RewriteJob, edit: TensorEdit, source: torch.Tensor, written: torch.Tensor,
                ulps: int) -> Iterator[str]:
    expected, _ = edit.apply(source, job.compute)
    problem = compare(expected, written, ulps)
    if problem:
        yield f"{edit.name}: {problem}"
    d = written.shape[edit.axis]
    before = source.to(job.compute).movedim(edit.axis, 0).reshape(d, -1)
    after = written.to(job.compute).movedim(edit.axis, 0).reshape(d, -1)
    for invariant in job.strategy.invariants:
        broken = invariant(edit, before, after, tolerance(written.dtype))
        if broken:
            yield f"{edit.name}: {broken}"


def _check_coded(job: RewriteJob, edit: CodedEdit, shard: Shard, source: BinaryIO, written: BinaryIO, ulps: int,
                 done: set[str]) -> Iterator[str]:
    """A quantized weight's parts in this shard, against a fresh decode, edit and re-encode of the
    source's parts, slice by slice as the rewrite went. (The strategy's invariants describe
    the float edit, which requantization blurs; the re-encoding itself is checked exactly.)"""
    here = [shard.header.entry(p) for p in edit.parts if p in shard.header.by_name]
    n = coded_slices(job.ckpt, edit)
    problems: dict[str, str] = {}
    for i, parts in enumerate(part_slices(job.ckpt, shard, source, edit.parts, n)):
        expected, _ = (edit.piece(i) if n > 1 else edit).apply(parts, job.compute)
        for e in here:
            problem = compare(expected[e.name], read_tensor(written, slice_entry(e, i, n), stored=True), ulps)
            if problem and e.name not in problems:
                problems[e.name] = f"{e.name}{f' (slice {i})' if n > 1 else ''}: {problem}"
    done.update(e.name for e in here)
    yield from problems.values()


def compare(expected: torch.Tensor, written: torch.Tensor, ulps: int) -> str | None:
    """None when ``written`` equals ``expected`` bit for bit, or every element is within ``ulps``
    units in the last place of its expected value; else what differs."""
    size = expected.element_size()
    a, b = _bits(expected), _bits(written)
    differ = a != b
    if not differ.any():
        return None
    nonfinite = differ & ~(_finite(expected) & _finite(written))
    if nonfinite.any():
        return f"{int(nonfinite.sum())} elements differ in NaN or inf from a fresh edit of the source tensor"
    distance = (_ordered(a, size) - _ordered(b, size)).abs()
    worst = int(distance.max())
    if worst <= ulps:
        return None
    return (f"{int((distance > ulps).sum())} of {expected.numel()} elements differ from a fresh edit of the source "
            f"tensor (up to {worst} ulps; allowed {ulps})")


def _finite(t: torch.Tensor) -> torch.Tensor:
    """Element-wise finiteness for any stored dtype (float8 has no isfinite kernel; integers are finite)."""
    if not t.dtype.is_floating_point:
        return torch.ones_like(t, dtype=torch.bool)
    return torch.isfinite(t if t.element_size() > 1 else t.to(torch.float32))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(dtypes.BITS[t.element_size()]).to(torch.int64)


def _ordered(bits: torch.Tensor, size: int) -> torch.Tensor:
    """Float bit patterns (sign-extended to int64) as integers in the order of the values they
    stand for: adjacent floats differ by 1, and -0.0 equals +0.0."""
    magnitude = (1 << (8 * size - 1)) - 1
    return torch.where(bits < 0, -(bits & magnitude), bits)
