"""A hostile user's inputs, one explicit test each: nothing written outside OUTPUT, no link
followed, one rewrite per OUTPUT at a time, only the rewrite published, exact verify, and
one-line errors for malformed files and values."""
from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    for extra in ((), ("--overwrite",)):  # without a record nothing in OUTPUT is this tool's: never replaced
        fail(rewrite_args(src, out, directions_file, *extra), f"holds files this tool did not write ({name})")
    assert snapshot(src) == before
    assert (out / name).is_symlink()


def test_a_users_own_file_in_output_is_never_replaced(src: Path, directions_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    for extra in ((), ("--overwrite",)):
        fail(rewrite_args(src, out, directions_file, *extra), "holds files this tool did not write (config.json)")
    assert (out / "config.json").read_text() == '{"mine": true}'
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


def test_second_run_on_the_same_output_fails_at_once_naming_the_holder(src: Path, directions_file: Path,
                                                                        tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with exclusive_lock(out):
        fail(rewrite_args(src, out, directions_file), f"is being written by another run (pid {os.getpid()} on ")
    result = run(*rewrite_args(src, out, directions_file))
    assert result.exit_code == 0, result.output
    assert not (out / ".abliterate.lock").exists()


def test_a_second_conversion_of_an_example_waits_for_the_first_and_takes_its_result(tmp_path: Path) -> None:
    """Two processes asking for the same example (optimize workers, parallel tests) must not both
    write its .partial folder: the second waits on the lock and returns what the first made."""
    import threading
    import time

    from rewriter.lab import example_models

    out, told, got = tmp_path / "examples" / "qwen2.5-coder-0.5b-instruct", [], []
    out.parent.mkdir()
    second = threading.Thread(target=lambda: got.append(example_models.example_model(out.name, out, told.append)))
    with exclusive_lock(out.parent):
        second.start()
        deadline = time.monotonic() + 10
        while not told and time.monotonic() < deadline:
            time.sleep(0.01)
        assert told and f"pid {os.getpid()} on " in told[0], told
        out.mkdir()  # the first conversion finishes while the second waits
        (out / example_models.READY).write_text("done\n")
    second.join(10)
    assert got == [out]
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no .partial, no lock left


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
         "unknown key scael (known: model, measurements, output, scale, ", tmp_path / "out")


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

    def full(fd: int, data, offset: int, turn) -> None:
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


# -- a tampered record (OUTPUT/abliteration.json) ---------------------------------------------

def _tamper(out: Path, change: Callable[[dict], None]) -> None:
    """Change the record of a finished output, and its fingerprint, so that a rerun replaces it."""
    record = json.loads((out / "abliteration.json").read_text())
    change(record)
    if isinstance(record.get("fingerprint"), dict):
        record["fingerprint"]["tampered"] = True
    (out / "abliteration.json").write_text(json.dumps(record))


@pytest.mark.parametrize("field", ["files", "shards"])
@pytest.mark.parametrize("where", ["relative", "absolute", "through a link"])
def test_tampered_record_never_deletes_outside_output(src: Path, directions_file: Path, tmp_path: Path, field: str,
                                                      where: str) -> None:
    out = tmp_path / "out"
    assert run(*rewrite_args(src, out, directions_file)).exit_code == 0
    (tmp_path / "elsewhere").mkdir()
    victim = tmp_path / "elsewhere" / "victim.safetensors"
    victim.write_text("not yours")
    if where == "through a link":
        (out / "sub").symlink_to(tmp_path / "elsewhere")
    name = {"relative": "../elsewhere/victim.safetensors", "absolute": str(victim),
            "through a link": "sub/victim.safetensors"}[where]

    def add(record: dict) -> None:
        if field == "files":
            record["files"].append(name)
        else:
            record["shards"][name] = {"size": 9, "mtime_ns": 0}

    _tamper(out, add)
    before = snapshot(tmp_path / "elsewhere")
    expected = "is a symbolic link" if where == "through a link" else "is not a plain relative name inside the folder"
    fail(rewrite_args(src, out, directions_file, "--overwrite"), expected)
    ends_in_error(["push", str(out), "org/m", "--dry-run"], expected)
    assert snapshot(tmp_path / "elsewhere") == before and victim.read_text() == "not yours"


@pytest.mark.parametrize("change, expected", [
    (lambda r: r["shards"].update({next(iter(r["shards"])): "not-a-dict"}), "is recorded as a string, not an object"),
    (lambda r: r.update(files="config.json"), "'files' is a string, not a list"),
    (lambda r: r.update(fingerprint=[]), "'fingerprint' is a list, not an object"),
    (lambda r: r["files"].append(".abliterate.lock"), "it lists .abliterate.lock among the files"),
])
def test_malformed_record_is_one_line_for_every_command(src: Path, directions_file: Path, tmp_path: Path, change,
                                                         expected: str) -> None:
    out = tmp_path / "out"
    assert run(*rewrite_args(src, out, directions_file)).exit_code == 0
    _tamper(out, change)
    for args in (rewrite_args(src, out, directions_file), rewrite_args(src, out, directions_file, "--overwrite"),
                 ["verify", str(src), str(out)]):
        fail(args, expected)
    for args in (["push", str(out), "org/m", "--dry-run"], ["inspect", str(out)]):
        ends_in_error(args, expected)


def ends_in_error(args: list[str], expected: str) -> None:
    """For commands that print as they go (push --dry-run, inspect, measure): the failure is their one last line."""
    result = run(*args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and expected in last, result.output


# -- hostile checkpoints ------------------------------------------------------------------------

@pytest.mark.parametrize("file", ["config.json", INDEX])
def test_json_nested_too_deep_is_one_line(src: Path, directions_file: Path, tmp_path: Path, file: str) -> None:
    (src / file).write_text("[" * 200_000 + "]" * 200_000)
    fail(rewrite_args(src, tmp_path / "out", directions_file), f"unreadable {file} (maximum recursion depth",
         tmp_path / "out")


def test_prompt_file_nested_too_deep_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "p.json").write_text("[" * 200_000 + "]" * 200_000)
    fail(["measure", str(tmp_path), "-o", str(tmp_path / "d.safetensors"), "--harmful", str(tmp_path / "p.json")],
         "unreadable prompt file (maximum recursion depth", tmp_path / "d.safetensors")


def test_plan_and_card_eval_nested_too_deep_are_one_line(src: Path, directions_file: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.yml"
    plan.write_text("ablate: " + "[" * 200_000 + "]" * 200_000)
    fail(["rewrite", str(src), str(tmp_path / "out"), "-d", str(directions_file), "--plan", str(plan)],
         "unreadable plan (nested too deep)", tmp_path / "out")
    card = tmp_path / "eval.json"
    card.write_text("[" * 200_000 + "]" * 200_000)
    fail(["push", str(src), "org/x", "--card-eval", str(card), "--dry-run"], "not the JSON that 'evaluate --json' writes")


def test_link_out_of_the_source_is_never_copied(src: Path, directions_file: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    (src / "tokenizer.json").symlink_to(secret)
    fail(rewrite_args(src, tmp_path / "out", directions_file), "tokenizer.json is a link to", tmp_path / "out")


def test_links_of_a_hugging_face_cache_snapshot_stay_inside(src: Path, directions_file: Path, tmp_path: Path) -> None:
    """The cache keeps every file of a snapshot as a link to its repo's blobs: not outside."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot_dir = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot_dir.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        p.rename(repo / "blobs" / p.name)
        (snapshot_dir / p.name).symlink_to(Path("../../blobs") / p.name)
    result = run(*rewrite_args(snapshot_dir, tmp_path / "out", directions_file))
    assert result.exit_code == 0, result.output
    assert not any(p.is_symlink() for p in (tmp_path / "out").iterdir())


def test_declared_fp8_on_plain_weights_is_refused(src: Path, directions_file: Path, tmp_path: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [32, 32]}
    (src / "config.json").write_text(json.dumps(config))
    fail(rewrite_args(src, tmp_path / "out", directions_file), "the weights do not match the declared format",
         tmp_path / "out")


def _gpt_oss_declaring(tmp_path: Path, width: object) -> list[str]:
    """The rewrite arguments of a tiny gpt-oss (experts [E, d_ff 32, d_model 64]) whose config.json
    declares ``intermediate_size: width``."""
    from rewriter.archcheck import random_model, save, tiny_config

    model = random_model(tiny_config("gpt_oss", {"intermediate_size": 32}))
    ckpt = save(model, tmp_path / "gpt-oss", "hub")
    directions = tmp_path / "d.safetensors"
    random_measurements(model.config.hidden_size, model.config.num_hidden_layers).save(directions)
    config = json.loads((ckpt / "config.json").read_text())
    config["intermediate_size"] = width
    (ckpt / "config.json").write_text(json.dumps(config))
    return ["rewrite", str(ckpt), str(tmp_path / "out"), "-d", str(directions), "--layers", "1:1"]


def test_fused_expert_width_that_the_config_does_not_declare_is_refused(tmp_path: Path) -> None:
    fail(_gpt_oss_declaring(tmp_path, 48),
         "model.layers.1.mlp.experts.down_proj has shape [4, 32, 64]: d_ff 32 on axis 1, but config.json declares an "
         "expert width of 48", tmp_path / "out")


@pytest.mark.parametrize("width", [[], {"a": 1}, [32], "32", None])
def test_an_expert_width_that_is_no_integer_declares_nothing(tmp_path: Path, width: object) -> None:
    """A list or object where the width should be (found by the fuzzer: it was hashed, a traceback)
    declares no width: the check has nothing to compare against, and the rewrite goes on."""
    result = CliRunner().invoke(main, _gpt_oss_declaring(tmp_path, width))
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "out").glob("*.safetensors"))


# -- measure, evaluate, optimize: chat templates, prompt lengths, study files --------------------

@pytest.mark.parametrize("template, expected", [
    ("{{ raise_exception('boom') }}", "TemplateError: boom"),
    ("{{ messages[0]['content'].nope() }}", "UndefinedError: 'str object' has no attribute 'nope'"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "took more than 1 s"),
    ("{{ 'w1 ' * 400000000 }}", "it needs more than 512 MiB"),
    ("{% for i in range(100000) %}w1 {% endfor %}", "it rendered 300,000 characters around 2 of messages"),
])
def test_hostile_chat_templates_are_one_line(chat_model: tuple[Path, Path], tmp_path: Path, template: str,
                                             expected: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from rewriter.lab import chat

    monkeypatch.setattr(chat, "SECONDS_PER_PROMPT", 1.0)
    model = copy_checkpoint(chat_model[0], tmp_path / "m")
    (model / "chat_template.jinja").write_text(template)
    prompts = tmp_path / "p.txt"
    prompts.write_text("w1\nw2\n")
    ends_in_error(["measure", str(model), "-o", str(tmp_path / "d.safetensors"), "--harmful", str(prompts),
                   "--harmless", str(prompts), "-q"],
                  f"the model's chat template (code from the checkpoint), on prompt 1: {expected}")
    assert not (tmp_path / "d.safetensors").exists()


def _chat_model_with(chat_model: tuple[Path, Path], tmp_path: Path, name: str,
                     change: Callable[[Any], object]) -> tuple[Path, Path]:
    """A copy of the chat model whose JSON file ``name`` holds ``change`` of what it held, and a
    file of two prompts."""
    model = copy_checkpoint(chat_model[0], tmp_path / "m")
    (model / name).write_text(json.dumps(change(json.loads((model / name).read_text()))))
    prompts = tmp_path / "p.txt"
    prompts.write_text("w1\nw2\n")
    return model, prompts


def _evaluate(model: Path, prompts: Path) -> list[str]:
    return ["evaluate", str(model), "--harmful", str(prompts), "--harmless", str(prompts),
            "--max-new-tokens", "2", "-q"]


@pytest.mark.parametrize("settings, expected", [
    ([1, 2], "generation_config.json: transformers cannot read it (TypeError: 'list' object is not a mapping)"),
    ({"max_new_tokens": -3}, "generation_config.json: transformers cannot read it (ValueError: `max_new_tokens` must"),
    ({"cache_implementation": "nope"}, "generation_config.json: transformers cannot read it (ValueError: Invalid"),
    ({"no_repeat_ngram_size": "q"}, "generation failed (TypeError: '>' not supported between instances of 'str'"),
    ({"repetition_penalty": "a"}, "generation failed (ValueError: `penalty` has to be a strictly positive float"),
    ({"eos_token_id": [1, "a"]}, "generation failed (TypeError: 'str' object cannot be interpreted as an integer)"),
    ({"eos_token_id": 10**30}, "generation failed (ValueError: Overflow when unpacking long long)"),
    ({"forced_eos_token_id": 10**6}, "generation failed (IndexError: index 1000000 is out of bounds"),
])
def test_hostile_generation_settings_are_one_line(chat_model: tuple[Path, Path], tmp_path: Path, settings: object,
                                                  expected: str) -> None:
    """generation_config.json is the checkpoint's too: transformers raised on a bad one while loading
    the model, or only once it generated, from deep inside (found by trying its fields' wrong types)."""
    model, prompts = _chat_model_with(chat_model, tmp_path, "generation_config.json", lambda _: settings)
    ends_in_error(_evaluate(model, prompts), expected)


@pytest.mark.parametrize("field, value, expected", [
    ("hidden_size", "x", "config.json: transformers cannot read it (StrictDataclassFieldValidationError"),
    ("num_attention_heads", 0, "config.json: transformers cannot read it (ZeroDivisionError: integer modulo by zero)"),
    ("num_hidden_layers", -1, "config.json: num_hidden_layers -1; a model has at least one layer"),
    ("num_hidden_layers", 10**6, "config.json: num_hidden_layers 1000000, but the weights hold 39 tensors in all"),
    ("hidden_act", "nope", "transformers cannot build the model its config.json describes (KeyError: 'nope')"),
    ("vocab_size", 10**12, "transformers cannot build the model its config.json describes (RuntimeError"),
])
@pytest.mark.parametrize("streamed", [False, True])
def test_hostile_model_configs_are_one_line(chat_model: tuple[Path, Path], tmp_path: Path, field: str, value: object,
                                            expected: str, streamed: bool) -> None:
    """The lab loads a model through transformers, which checks config.json only as it builds the
    model, and raised from deep inside (or, for a million layers, built them for minutes)."""
    model, prompts = _chat_model_with(chat_model, tmp_path, "config.json", lambda config: {**config, field: value})
    ends_in_error(["measure", str(model), "-o", str(tmp_path / "d.safetensors"), "--harmful", str(prompts),
                   "--harmless", str(prompts), "-q", *(["--max-memory", "1MB"] if streamed else [])], expected)
    assert not (tmp_path / "d.safetensors").exists()


@pytest.mark.parametrize("changes, expected", [
    ({"model_max_length": "x"}, "no usable tokenizer (model_max_length 'x' is not a number)"),
    ({"model_max_length": [512]}, "no usable tokenizer (model_max_length [512] is not a number)"),
    ({"pad_token": 7}, "no usable tokenizer (TypeError: Special token pad_token has to be either str or AddedToken"),
    ({"padding_side": "middle"}, "no usable tokenizer (ValueError: Padding side should be selected between"),
    ({"unk_token": ""}, "no usable tokenizer (RecursionError: maximum recursion depth exceeded"),
    ({"pad_token": None, "eos_token": None}, "no usable tokenizer (no padding or end-of-sequence token to pad"),
])
def test_hostile_tokenizer_configs_are_one_line(chat_model: tuple[Path, Path], tmp_path: Path, changes: dict[str, object],
                                                expected: str) -> None:
    """tokenizer_config.json as well (found by the fuzzer): a string for the length limit loaded, then
    failed the first comparison with a prompt's length; an unknown unk token recursed without end
    in transformers' lookup; no pad or end token failed the first padded batch."""
    model, prompts = _chat_model_with(chat_model, tmp_path, "tokenizer_config.json",
                                      lambda config: {**config, **changes})
    ends_in_error(_evaluate(model, prompts), expected)


def test_generation_settings_that_change_the_decoding_are_pinned(chat_model: tuple[Path, Path], tmp_path: Path) -> None:
    """Beams, several answers a prompt, a dict for a result, a time limit, a static cache of any size:
    the answers are the greedy ones whatever generation_config.json asks for (the model's own token
    ids and penalties still apply)."""
    model = copy_checkpoint(chat_model[0], tmp_path / "m")
    prompts = tmp_path / "p.txt"
    prompts.write_text("w1 w2\nw3 w4 w5\n")

    def answers(name: str) -> list[str]:
        saved = tmp_path / f"{name}.jsonl"
        result = run("evaluate", str(model), "--harmful", str(prompts), "--harmless", str(prompts),
                     "--max-new-tokens", "4", "--save", str(saved), "-q")
        assert result.exit_code == 0, result.output
        return [json.loads(line)["answer"] for line in saved.read_text().splitlines()]

    greedy = answers("greedy")
    settings = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({
        **settings, "num_beams": 4, "num_return_sequences": 3, "return_dict_in_generate": True, "max_time": 1e-9,
        "cache_implementation": "static", "max_cache_len": 10**9, "do_sample": True, "temperature": 5.0}))
    assert answers("asked") == greedy and len(greedy) == 2


def test_long_prompts_are_cut_and_counted(chat_model: tuple[Path, Path], tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("w1 w2\n" + "w3 " * 600 + "\n")
    out = tmp_path / "d.safetensors"
    result = run("measure", str(chat_model[0]), "-o", str(out), "--harmful", str(prompts), "--harmless", str(prompts),
                 "--max-prompt-tokens", "8", "-q")
    assert result.exit_code == 0, result.output
    for kind in ("harmful", "harmless"):
        assert f"1 of 2 {kind} prompts are longer than 8 tokens and were cut to their first 8" in result.output
    assert Measurements.load(out).metadata["max_prompt_tokens"] == "8"


@pytest.fixture(scope="module")
def study(chat_model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A study file of two trials of optimize on ``chat_model``."""
    path = tmp_path_factory.mktemp("study") / "study.db"
    result = run(*optimize_args(chat_model, path.parent / "plan.yml", path, "--trials", "2"))
    assert result.exit_code == 0, result.output
    return path


def optimize_args(chat_model: tuple[Path, Path], plan: Path, study_file: Path, *extra: str) -> list[str]:
    model, directions = chat_model
    return ["optimize", str(model), "-d", str(directions), "-o", str(plan), "--study", str(study_file), "--trials", "3",
            "--search-prompts", "4", "--no-final-eval", "-q", *extra]


def _sql(path: Path, statement: str) -> None:
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute(statement)


def _foreign_study(path: Path, directions: list[str], params: dict[str, float]) -> None:
    """A study of the same name made by another search: other objectives or parameters, no record."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    s = optuna.create_study(directions=directions, study_name="abliterate-optimize", storage=f"sqlite:///{path}")
    s.enqueue_trial(params)
    s.optimize(lambda t: tuple(t.suggest_float(k, 0, 1) for k in params)[: len(directions)], n_trials=1)


@pytest.mark.parametrize("make, expected", [
    (lambda p: p.write_bytes(b"not a database, " * 512), "cannot be used as a study (DatabaseError: file is not a"),
    (lambda p: _sql(p, "CREATE TABLE notes (text)"), "an SQLite file, but not an Optuna study"),
    (lambda p: _foreign_study(p, ["minimize"], {"x": 0.5}), "has 1 objective(s), not the two this search minimizes"),
    (lambda p: _foreign_study(p, ["minimize", "minimize"], {"x": 0.5, "y": 0.5}), "records no model"),
])
def test_study_file_of_another_kind_is_refused(chat_model: tuple[Path, Path], tmp_path: Path, make,
                                               expected: str) -> None:
    path = tmp_path / "study.db"
    make(path)
    before = path.read_bytes()
    fail(optimize_args(chat_model, tmp_path / "plan.yml", path), expected, tmp_path / "plan.yml")
    assert path.read_bytes() == before


@pytest.mark.parametrize("change, expected", [
    ("UPDATE trial_params SET param_name = 'x' WHERE param_name = 'center'",
     "trial 0 has parameters other than this search's (missing ['center'], unknown ['x'])"),
    ("UPDATE trial_params SET param_value = 1e300 WHERE param_name = 'half_width'",
     "trial 0 has half_width 1e+300, outside this search's range"),
    ("DELETE FROM trial_values WHERE objective = 1", "trial 0 has objective values ["),
    ("UPDATE trial_values SET value = 'low' WHERE objective = 0", "trial 0 has objective values ['low', "),
    ("UPDATE study_user_attributes SET value_json = '\"x\"' WHERE key = 'directions_sha256'",
     "made for another direction file (x)"),
])
def test_tampered_study_is_refused_before_any_trial(chat_model: tuple[Path, Path], study: Path, tmp_path: Path,
                                                     change: str, expected: str) -> None:
    path = Path(shutil.copy(study, tmp_path / "study.db"))
    _sql(path, change)
    before = path.read_bytes()
    fail(optimize_args(chat_model, tmp_path / "plan.yml", path), expected, tmp_path / "plan.yml")
    assert path.read_bytes() == before


@pytest.mark.parametrize("other, expected", [("model", "made for another model"),
                                             ("strategies", "made for another search space")])
def test_study_of_another_model_or_space_is_refused(chat_model: tuple[Path, Path], study: Path, tmp_path: Path,
                                                     other: str, expected: str) -> None:
    path = Path(shutil.copy(study, tmp_path / "study.db"))
    model = copy_checkpoint(chat_model[0], tmp_path / "model") if other == "model" else chat_model[0]
    extra = ("--strategy", "standard") if other == "strategies" else ()
    before = path.read_bytes()
    fail(optimize_args((model, chat_model[1]), tmp_path / "plan.yml", path, *extra), expected, tmp_path / "plan.yml")
    assert path.read_bytes() == before


@pytest.mark.parametrize("where, expected", [("missing/study.db", "does not exist"),
                                             ("/proc/abliterate-study.db", "unable to open database file")])
def test_study_path_that_cannot_be_written(chat_model: tuple[Path, Path], tmp_path: Path, where: str,
                                           expected: str) -> None:
    fail(optimize_args(chat_model, tmp_path / "plan.yml", tmp_path / where), expected, tmp_path / "plan.yml")
