"""A hostile user's inputs, one explicit test each: nothing written outside OUTPUT, no link
followed, one rewrite per OUTPUT at a time, only the rewrite published, exact verify, and
one-line errors for malformed files and values."""
from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from rewriter.cli import main
from rewriter.directions import Measurements
from rewriter.io import shard_writer
from rewriter.io.files import exclusive_lock
from tests.helpers import copy_checkpoint, edit_tensor_file, fail, random_measurements, snapshot

O_PROJ = "model.layers.1.self_attn.o_proj.weight"
INDEX = "model.safetensors.index.json"


@pytest.fixture()
def src(checkpoint_factory: Callable[[str], Path], tmp_path: Path) -> Path:
    return copy_checkpoint(checkpoint_factory("llama"), tmp_path / "src")


def run(*args: str):
    return CliRunner().invoke(main, [*args, "-q"] if args[0] in ("rewrite", "verify") else list(args))


def rewrite_args(src: Path, out: Path, directions: Path, *extra: str) -> list[str]:
    return ["rewrite", str(src), str(out), "-d", str(directions), "--layers", "0-3:1", "-q", *extra]


def shard_of(ckpt: Path, tensor: str) -> str:
    return json.loads((ckpt / INDEX).read_text())["weight_map"][tensor]


# -- never write outside OUTPUT, never follow a planted link ---------------------------------

@pytest.mark.parametrize("bad", ["/tmp/elsewhere.safetensors", "../sibling/model.safetensors", "a/../../x.safetensors",
                                 "./model.safetensors", ""])
def test_index_shard_names_must_stay_inside(src: Path, directions_file: Path, tmp_path: Path, bad: str) -> None:
    index = json.loads((src / INDEX).read_text())
    index["weight_map"][O_PROJ] = bad
    (src / INDEX).write_text(json.dumps(index))
    before = snapshot(tmp_path)
    fail(rewrite_args(src, tmp_path / "out", directions_file), f"weight_map entry '{O_PROJ}': file name")
    assert snapshot(tmp_path) == before


def test_index_values_must_be_strings(src: Path, directions_file: Path, tmp_path: Path) -> None:
    index = json.loads((src / INDEX).read_text())
    index["weight_map"][O_PROJ] = 7
    (src / INDEX).write_text(json.dumps(index))
    fail(rewrite_args(src, tmp_path / "out", directions_file), f"weight_map entry '{O_PROJ}' is 7, not a shard file name",
         tmp_path / "out")


def test_planted_partial_link_is_never_followed(src: Path, directions_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    name = shard_of(src, O_PROJ)
    (out / f"{name}.partial").symlink_to(src / name)
    before = snapshot(src)
    result = run(*rewrite_args(src, out, directions_file))
    assert result.exit_code == 0, result.output
    assert snapshot(src) == before
    assert not (out / f"{name}.partial").exists() and not (out / name).is_symlink()
    assert run("verify", str(src), str(out)).exit_code == 0


def test_planted_final_link_is_replaced_not_written_through(src: Path, directions_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    name = shard_of(src, O_PROJ)
    (out / name).symlink_to(src / name)
    before = snapshot(src)
    fail(rewrite_args(src, out, directions_file), "holds files but no abliteration.json; pass --overwrite")
    result = run(*rewrite_args(src, out, directions_file, "--overwrite"))
    assert result.exit_code == 0, result.output
    assert snapshot(src) == before
    assert not (out / name).is_symlink()


def test_second_run_on_the_same_output_fails_at_once_naming_the_holder(src: Path, directions_file: Path,
                                                                        tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with exclusive_lock(out):
        fail(rewrite_args(src, out, directions_file), f"is being written by another run (pid {os.getpid()} on ")
    result = run(*rewrite_args(src, out, directions_file))
    assert result.exit_code == 0, result.output
    assert not (out / ".abliterate.lock").exists()


# -- publish only what the rewrite produced -------------------------------------------------

def test_overwrite_refuses_foreign_files_and_removes_stale_shards(src: Path, directions_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run(*rewrite_args(src, out, directions_file)).exit_code == 0
    (out / "model-99999-of-99999.safetensors").write_bytes(b"stale")  # as if an earlier rewrite had written it
    manifest = json.loads((out / "abliteration.json").read_text())
    manifest["shards"]["model-99999-of-99999.safetensors"] = {"size": 5, "mtime_ns": 0}
    (out / "abliteration.json").write_text(json.dumps(manifest))
    (out / "pytorch_model.bin").write_bytes(b"unedited weights")
    (out / "notes.txt").write_text("mine")
    args = ["rewrite", str(src), str(out), "-d", str(directions_file), "--layers", "1-2:1", "--overwrite"]
    fail(args, "holds files this tool did not write (notes.txt, pytorch_model.bin)")
    (out / "notes.txt").unlink()
    (out / "pytorch_model.bin").unlink()
    assert run(*args).exit_code == 0
    assert not (out / "model-99999-of-99999.safetensors").exists()


def test_push_uploads_only_what_the_manifest_records(src: Path, directions_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run(*rewrite_args(src, out, directions_file)).exit_code == 0
    (out / "pytorch_model.bin").write_bytes(b"unedited weights")
    result = run("push", str(out), "org/model", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "pytorch_model.bin" not in result.output and "would upload config.json" in result.output
    assert f"would upload {shard_of(src, O_PROJ)}" in result.output
    verified = run("verify", str(src), str(out))
    assert verified.exit_code == 1 and "pytorch_model.bin: not written by this rewrite" in verified.output


# -- verify is exact ------------------------------------------------------------------------

def _flip(out: Path, name: str, change: Callable[[torch.Tensor], None]) -> None:
    """Change one stored element in place, keeping the header (so sizes and names match)."""
    shard = out / shard_of(out, name)
    data = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    start = 8 + n + json.loads(data[8 : 8 + n])[name]["data_offsets"][0]
    element = torch.frombuffer(data[start : start + 2], dtype=torch.bfloat16).clone()
    change(element)
    data[start : start + 2] = element.view(torch.uint8).numpy().tobytes()
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("change", [
    lambda e: e.view(torch.int16).add_(1),  # the lowest mantissa bit
    lambda e: e.fill_(float("nan")),
], ids=["low-bit", "nan"])
def test_verify_catches_one_changed_element(src: Path, directions_file: Path, tmp_path: Path, change) -> None:
    out = tmp_path / "out"
    assert run(*rewrite_args(src, out, directions_file)).exit_code == 0
    assert run("verify", str(src), str(out)).exit_code == 0
    _flip(out, O_PROJ, change)
    result = run("verify", str(src), str(out))
    assert result.exit_code == 1
    assert f"{O_PROJ}: 1 " in result.output or f"{O_PROJ}: 1 elements differ in NaN" in result.output, result.output


def test_verify_reads_the_strategy_plan_and_directions_from_the_output(src: Path, directions_file: Path,
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run(*rewrite_args(src, out, directions_file, "--strategy", "standard")).exit_code == 0
    result = run("verify", str(src), str(out))
    assert result.exit_code == 0, result.output
    assert "verified (standard, 8 edited tensors bit for bit)" in result.output
    wrong = run("verify", str(src), str(out), "--strategy", "norm-preserving")
    assert wrong.exit_code == 1
    assert "written with strategy 'standard', not 'norm-preserving'" in wrong.output


# -- bad values and malformed files: one line, non-zero, nothing written ----------------------

def test_nan_in_a_planned_weight_is_refused(src: Path, directions_file: Path, tmp_path: Path) -> None:
    def poison(t: dict[str, torch.Tensor]) -> None:
        t[O_PROJ][3, 5] = float("nan")
        t[O_PROJ][7, 1] = float("inf")

    edit_tensor_file(src, O_PROJ, poison)
    fail(rewrite_args(src, tmp_path / "out", directions_file), f"{O_PROJ}: 2 NaN or inf values in the stored weight")


def _set_header(shard: Path, change: Callable[[dict], object]) -> None:
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    new = json.dumps(change(header)).encode()
    new += b" " * (-len(new) % 8)
    shard.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n :])


@pytest.mark.parametrize("change, expected", [
    (lambda h: [1, 2], "a JSON list, not an object"),
    (lambda h: {**h, O_PROJ: "x"}, "is described by a str, not an object"),
    (lambda h: {**h, O_PROJ: {k: v for k, v in h[O_PROJ].items() if k != "data_offsets"}}, "has data_offsets None"),
    (lambda h: {**h, O_PROJ: {**h[O_PROJ], "data_offsets": ["0", 8]}}, "has data_offsets ['0', 8]"),
    (lambda h: {**h, O_PROJ: {**h[O_PROJ], "shape": [8, 8]}}, "of BF16 needs 128 bytes, its byte range has"),
    (lambda h: {**h, O_PROJ: {**h[O_PROJ], "dtype": "Q4"}}, "has unknown dtype 'Q4'"),
])
def test_malformed_headers(src: Path, directions_file: Path, tmp_path: Path, change, expected: str) -> None:
    _set_header(src / shard_of(src, O_PROJ), change)
    fail(rewrite_args(src, tmp_path / "out", directions_file), expected, tmp_path / "out")


def test_wrong_byte_size_of_a_copied_tensor_is_refused_before_writing(src: Path, directions_file: Path,
                                                                      tmp_path: Path) -> None:
    name = "model.layers.1.self_attn.q_proj.weight"
    _set_header(src / shard_of(src, name), lambda h: {**h, name: {**h[name], "shape": [h[name]["shape"][0] // 2, 3]}})
    fail(rewrite_args(src, tmp_path / "out", directions_file), f"tensor '{name}': shape", tmp_path / "out")


@pytest.mark.parametrize("value", ["4", 4.0, True, -1])
def test_num_hidden_layers_must_be_a_positive_integer(src: Path, directions_file: Path, tmp_path: Path, value) -> None:
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = value
    (src / "config.json").write_text(json.dumps(config))
    fail(rewrite_args(src, tmp_path / "out", directions_file), "'num_hidden_layers' is", tmp_path / "out")


def test_huge_layer_range_is_refused_at_once(src: Path, directions_file: Path, tmp_path: Path) -> None:
    fail(["rewrite", str(src), str(tmp_path / "out"), "-d", str(directions_file), "--layers", "0-30000000:2"],
         "layer numbers must be below 100,000", tmp_path / "out")


def test_unknown_plan_keys_are_named(src: Path, directions_file: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.yml"
    plan.write_text("scael: 0.1\nablate:\n  - {layer: 1, measurement: 1}\n")
    fail(["rewrite", str(src), str(tmp_path / "out"), "-d", str(directions_file), "--plan", str(plan)],
         "unknown key scael (known: model, measurements, output, scale, ablate)", tmp_path / "out")


def _native(path: Path, layers: torch.Tensor, meta: dict[str, str] | None = None, zero: bool = False) -> Path:
    m = random_measurements(64, 4)
    harmful = torch.stack([m.harmful[n] for n in range(4)])
    save_file({"layers": layers, "harmful_mean": harmful * (0 if zero else 1), "harmless_mean": harmful * 0.5},
              str(path), metadata={"format": "abliterate-directions/1", **(meta or {})})
    return path


@pytest.mark.parametrize("make, expected", [
    (lambda p: _native(p, torch.arange(4), {"harmful_count": "ten"}), "metadata harmful_count is 'ten'"),
    (lambda p: _native(p, torch.tensor([0.0, 1.0, 2.0, 3.0])), "'layers' must be a 1-D int64 tensor"),
    (lambda p: _native(p, torch.tensor([0, 1, 1, 3])), "'layers' must list distinct non-negative layer numbers"),
    (lambda p: _native(p, torch.arange(4), zero=True), "the harmful mean of layer 1 is zero"),
    (lambda p: torch.save({"harmful_1x": torch.ones(64), "harmless_1": torch.ones(64)}, p), "unexpected key 'harmful_1x'"),
])
def test_malformed_direction_files(src: Path, tmp_path: Path, make, expected: str) -> None:
    path = tmp_path / "directions.bin"
    make(path)
    fail(rewrite_args(src, tmp_path / "out", path), expected, tmp_path / "out")


def test_disk_full_names_the_file_and_a_rerun_just_works(src: Path, directions_file: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    real_write = shard_writer._write_all

    def full(fd: int, data, offset: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shard_writer, "_write_all", full)
    result = run(*rewrite_args(src, out, directions_file))
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert "no space left on the device while writing" in result.output and ".safetensors.partial" in result.output
    assert "more bytes are needed" in result.output and "are free" in result.output
    monkeypatch.setattr(shard_writer, "_write_all", real_write)
    assert not list(out.glob("*.partial"))
    again = run(*rewrite_args(src, out, directions_file))
    assert again.exit_code == 0, again.output
    assert run("verify", str(src), str(out)).exit_code == 0


def test_measurements_roundtrip_stays_valid(tmp_path: Path) -> None:
    """The checks above refuse bad files, not good ones."""
    m = random_measurements(64, 4)
    m.save(tmp_path / "d.safetensors")
    back = Measurements.load(tmp_path / "d.safetensors")
    assert back.layers == [0, 1, 2, 3] and back.harmful_count == 10 and len(back.sha256) == 64
    assert load_file(tmp_path / "d.safetensors")["layers"].dtype == torch.int64
