"""A run killed mid-shard resumes: finished shards are kept, the half-written one is redone;
shards are committed, and handed on, only once complete."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from rewriter.cli import main
from rewriter.errors import AbliterateError
from rewriter.pipeline import prepare
from rewriter.plan import parse_layer_specs
from tests.helpers import tree
from tests.quantize import CASES, quantized

CASE_IDS = {c.id for c in CASES}

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from rewriter.cli import main; main()", *args],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("source", ["qwen2", "fp8-partial-blocks-apart"])
def test_killed_run_resumes_to_the_same_bytes(checkpoint_factory: Callable[[str], Path], directions_file: Path,
                                               tmp_path: Path, source: str) -> None:
    """Also for a quantized source whose scales lie in another shard than their weights: the
    resumed run recomputes those weights' edits and writes the same bits."""
    if source in CASE_IDS:
        src = quantized(next(c for c in CASES if c.id == source), tmp_path)[0]
    else:
        src = checkpoint_factory(source)
    args = ["rewrite", str(src), "-d", str(directions_file), "--layers", "0-3:1", "-q"]
    clean = tmp_path / "clean"
    assert CliRunner().invoke(main, [*args, str(clean)]).exit_code == 0

    out = tmp_path / "resumed"
    killed = cli(*args, str(out), "-p", "no:strategies", "-p", "tests.killer_plugin",
                 env={"KILL_AFTER_EDITS": "5", "KILL_AFTER_FINISHED": str(out / "abliteration.json")})
    assert killed.returncode == -9, killed.stderr
    manifest = json.loads((out / "abliteration.json").read_text())
    assert not manifest["complete"]
    done = set(manifest["shards"])
    assert done, "the first shards should have been finished before the kill"
    assert list(out.glob("*.partial")), "the kill should leave a half-written shard"
    assert not (out / "model.safetensors.index.json").exists(), "the index is written last"
    mtimes = {n: (out / n).stat().st_mtime_ns for n in done}

    resumed = cli(*args, str(out))
    assert resumed.returncode == 0, resumed.stderr
    assert f"reused from an earlier run: {len(done)}" in resumed.stdout
    assert {n: (out / n).stat().st_mtime_ns for n in done} == mtimes
    assert tree(out) == tree(clean)


def test_corrupted_finished_shard_is_redone(checkpoint_factory: Callable[[str], Path], directions_file: Path,
                                            tmp_path: Path) -> None:
    src = checkpoint_factory("llama")
    out = tmp_path / "out"
    args = ["rewrite", str(src), str(out), "-d", str(directions_file), "--layers", "0-3:1", "-q"]
    assert CliRunner().invoke(main, args).exit_code == 0
    good = tree(out)
    shard = sorted(out.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0 and "shards written: 1," in result.output
    assert tree(out) == good


def test_output_of_a_different_plan_needs_overwrite(checkpoint_factory: Callable[[str], Path], directions_file: Path,
                                                    tmp_path: Path) -> None:
    src, out = checkpoint_factory("llama"), tmp_path / "out"
    base = ["rewrite", str(src), str(out), "-d", str(directions_file), "-q"]
    assert CliRunner().invoke(main, [*base, "--layers", "1:1"]).exit_code == 0
    first = tree(out)
    refused = CliRunner().invoke(main, [*base, "--layers", "2:1"])
    assert refused.exit_code == 1 and "different plan" in refused.output
    assert tree(out) == first
    assert CliRunner().invoke(main, [*base, "--layers", "2:1", "--overwrite"]).exit_code == 0
    assert tree(out) != first
    shutil.rmtree(out)


def test_parallel_workers_write_the_same_bytes(checkpoint_factory: Callable[[str], Path], directions_file: Path,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards on several workers, and column chunks on several edit threads, change no byte."""
    from rewriter.engine import edit as edit_module
    monkeypatch.setattr(edit_module, "COLUMNS", 8)  # tiny tensors in several chunks
    src = checkpoint_factory("gemma3_text")
    outs = []
    for workers, threads in (("1", "1"), ("3", "1"), ("1", "3"), ("2", "2")):
        out = tmp_path / f"w{workers}t{threads}"
        result = CliRunner().invoke(main, ["rewrite", str(src), str(out), "-d", str(directions_file),
                                           "--layers", "0-3:1", "-q", "--workers", workers,
                                           "--edit-threads", threads])
        assert result.exit_code == 0, result.output
        assert "tensors edited: 8" in result.output
        outs.append(tree(out))
    assert all(o == outs[0] for o in outs[1:])


def _job(src: Path, directions: Path):
    return prepare(src, None, directions, parse_layer_specs(["0-3:1"], 1.0, {}), "norm-preserving")


@pytest.mark.parametrize("workers", [1, 2])
def test_each_shard_is_handed_on_once_complete_and_in_place(checkpoint_factory: Callable[[str], Path],
                                                             directions_file: Path, tmp_path: Path,
                                                             workers: int) -> None:
    """on_shard (e.g. an upload) sees each shard already renamed into place and in the manifest."""
    src = checkpoint_factory("llama")
    out = tmp_path / "out"
    seen: list[str] = []

    def on_shard(name: str, path: Path) -> None:
        assert path == out / name and path.is_file() and not path.with_name(name + ".partial").exists()
        assert name in json.loads((out / "abliteration.json").read_text())["shards"]
        seen.append(name)

    _job(src, directions_file).run(out, progress=False, workers=workers, on_shard=on_shard)
    assert sorted(seen) == sorted(p.name for p in src.glob("*.safetensors"))


def test_a_failing_hand_on_stops_the_run_and_keeps_what_was_written(checkpoint_factory: Callable[[str], Path],
                                                                    directions_file: Path, tmp_path: Path) -> None:
    src = checkpoint_factory("llama")
    out = tmp_path / "out"
    seen: list[str] = []

    def failing(name: str, path: Path) -> None:
        seen.append(name)
        raise AbliterateError("upload refused")

    with pytest.raises(AbliterateError, match="upload refused"):
        _job(src, directions_file).run(out, progress=False, on_shard=failing)
    assert len(seen) == 1, "after a failure no further shard is handed on"
    assert not list(out.glob("*.partial")) and not (out / "model.safetensors.index.json").exists()
    summary = _job(src, directions_file).run(out, progress=False)
    assert summary.shards_reused >= 1 and summary.shards_reused + summary.shards_written == len(list(src.glob("*.safetensors")))
