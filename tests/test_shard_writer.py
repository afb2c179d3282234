"""The shard writer: kernel range copies and written tensors land in file order, atomically."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rewriter.io import shard_writer
from rewriter.errors import AbliterateError
from rewriter.io.safetensors_io import read_header
from rewriter.io.shard_writer import ShardWriter

SHM = Path("/dev/shm")


def _source(folder: Path) -> Path:
    tensors = {f"t{i}": torch.randn(64 + i, 33, dtype=torch.bfloat16) for i in range(6)}
    save_file(tensors, folder / "src.safetensors", metadata={"format": "pt"})
    return folder / "src.safetensors"


def _rewrite_odd_tensors(src: Path, out: Path) -> int:
    """Copy even tensors by range, write odd ones negated; returns the writer's byte count."""
    header = read_header(src)
    seen: list[int] = []
    writer = ShardWriter(out, header, written=seen.append)
    with open(src, "rb") as f:
        for i, e in enumerate(header.entries):
            if i % 2 == 0:
                writer.copy(f.fileno(), e.start, e.end, f.name)
            else:
                f.seek(e.start)
                writer.write_tensor(-torch.frombuffer(bytearray(f.read(e.end - e.start)), dtype=torch.bfloat16))
        writer.close()
    assert not out.exists(), "the shard appears only when committed"
    assert sum(seen) == header.file_size, "progress reports every byte as it is written"
    return writer.commit()


def test_the_last_copies_run_on_after_the_buffers_are_free(tmp_path: Path) -> None:
    """``wait_for_buffers`` frees the caller's buffers for the next shard; the source it holds
    stays open for the copies queued after them until ``close`` (or ``abort``) closes it."""
    src = _source(tmp_path)
    header = read_header(src)
    out = tmp_path / "out.safetensors"
    writer = ShardWriter(out, header)
    f = writer.hold(open(src, "rb"))
    first = header.entries[0]
    buffer = bytearray(src.read_bytes()[first.start : first.end])
    writer.write_tensor(-torch.frombuffer(buffer, dtype=torch.bfloat16))
    writer.copy(f.fileno(), first.end, header.file_size, f.name)
    writer.wait_for_buffers()
    assert not f.closed  # the copy may still be reading it
    writer.close()
    assert f.closed
    writer.commit()
    before, after = load_file(src), load_file(out)
    assert torch.equal(after[first.name], -before[first.name])
    assert all(torch.equal(after[e.name], before[e.name]) for e in header.entries[1:])
    aborted = ShardWriter(tmp_path / "aborted.safetensors", header)
    g = aborted.hold(open(src, "rb"))
    aborted.abort()
    assert g.closed and not list(tmp_path.glob("aborted*"))


def _check(src: Path, out: Path, size: int) -> None:
    assert size == src.stat().st_size == out.stat().st_size
    before, after = load_file(src), load_file(out)
    for i, name in enumerate(sorted(before, key=lambda n: int(n[1:]))):
        expected = before[name] if i % 2 == 0 else -before[name]
        assert torch.equal(after[name], expected), name
    assert oct(out.stat().st_mode & 0o777) == oct(0o644)
    assert not list(out.parent.glob("*.partial"))


def test_ranges_and_tensors_in_file_order(tmp_path: Path) -> None:
    src = _source(tmp_path)
    out = tmp_path / "out.safetensors"
    _check(src, out, _rewrite_odd_tensors(src, out))


def test_small_system_calls_and_the_memory_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Short kernel copies and writes are continued; without copy_file_range, ranges go through memory."""
    monkeypatch.setattr(shard_writer, "_COPY", 1000)
    monkeypatch.setattr(shard_writer, "_WRITE", 999)
    monkeypatch.setattr(shard_writer, "_CHUNK", 777)
    src = _source(tmp_path)
    _check(src, tmp_path / "a.safetensors", _rewrite_odd_tensors(src, tmp_path / "a.safetensors"))
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    _check(src, tmp_path / "b.safetensors", _rewrite_odd_tensors(src, tmp_path / "b.safetensors"))


def test_tensors_are_written_in_small_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large pwrite fills 2 MiB page-cache folios, which a VM's host may have to fault in
    again (ten times the system time, see ``_WRITE``): a 5 MiB tensor goes out in calls of 256 KiB."""
    sizes: list[int] = []
    real = os.pwrite

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        sizes.append(memoryview(data).nbytes)
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    big = torch.arange(5 << 18, dtype=torch.float32)  # 5 MiB
    src = tmp_path / "big.safetensors"
    save_file({"big": big}, src)
    header = read_header(src)
    writer = ShardWriter(tmp_path / "out.safetensors", header)
    writer.write_tensor(big + 1)
    writer.close()
    writer.commit()
    assert sizes[0] == header.entries[0].start and sizes[1:] == [256 << 10] * 20
    assert torch.equal(load_file(tmp_path / "out.safetensors")["big"], big + 1)


def test_the_copy_and_the_writes_take_turns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file system writes one file from one call at a time, and a call waiting for it spins
    on a core (see ``_COPY``): the writer's two threads never have two calls on the file at once,
    and each call stays short."""
    busy, overlaps, sizes = [0], [0], []
    count = threading.Lock()
    real_pwrite, real_copy = os.pwrite, os.copy_file_range

    def watched(call, size_of):
        def run(*args):
            with count:
                busy[0] += 1
                overlaps[0] += busy[0] > 1
            sizes.append(size_of(args))
            time.sleep(0.002)  # long enough for the other thread to come in, were it let
            try:
                return call(*args)
            finally:
                with count:
                    busy[0] -= 1
        return run

    monkeypatch.setattr(shard_writer, "_COPY", 4096)
    monkeypatch.setattr(shard_writer, "_WRITE", 4096)
    monkeypatch.setattr(os, "pwrite", watched(real_pwrite, lambda a: memoryview(a[1]).nbytes))
    monkeypatch.setattr(os, "copy_file_range", watched(real_copy, lambda a: a[2]))
    tensors = {f"t{i}": torch.randn(256, 128, dtype=torch.bfloat16) for i in range(8)}  # 64 KiB each
    src = tmp_path / "src.safetensors"
    save_file(tensors, src)
    out = tmp_path / "out.safetensors"
    _check(src, out, _rewrite_odd_tensors(src, out))
    assert overlaps[0] == 0 and max(sizes) <= 4096 and len(sizes) > 100


@pytest.mark.skipif(not SHM.is_dir() or SHM.stat().st_dev == Path.cwd().stat().st_dev,
                    reason="needs /dev/shm on another file system")
def test_source_on_another_file_system(tmp_path: Path) -> None:
    """Across file systems the kernel may refuse (EXDEV); the copy must still be exact."""
    folder = SHM / f"abliterate-test-{os.getpid()}"
    folder.mkdir()
    try:
        src = _source(folder)
        out = tmp_path / "out.safetensors"
        _check(src, out, _rewrite_odd_tensors(src, out))
    finally:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


def test_a_short_source_fails_and_abort_leaves_nothing(tmp_path: Path) -> None:
    src = _source(tmp_path)
    header = read_header(src)
    out = tmp_path / "out.safetensors"
    writer = ShardWriter(out, header)
    with open(src, "rb") as f:
        writer.copy(f.fileno(), header.entries[-1].start, header.file_size + 10, f.name)
        with pytest.raises(AbliterateError, match="unexpected end of file"):
            writer.close()
    writer.abort()
    assert list(tmp_path.iterdir()) == [src]
