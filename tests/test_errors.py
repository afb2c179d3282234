"""Every user mistake: one line, non-zero exit, no traceback, nothing written."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rewriter.directions import Measurements
from tests.helpers import copy_checkpoint, edit_tensor_file, fail, random_measurements

O_PROJ = "model.layers.1.self_attn.o_proj.weight"
DOWN = "model.layers.2.mlp.down_proj.weight"


@pytest.fixture()
def llama(checkpoint_factory: Callable[[str], Path]) -> Path:
    return checkpoint_factory("llama")


def test_plan_layer_out_of_range(llama: Path, directions_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    fail(["rewrite", str(llama), str(out), "-d", str(directions_file), "--layers", "3-4:1"],
         "plan layer 4 is out of range: the model has layers 0-3", out)


def test_measurement_missing_from_direction_file(llama: Path, directions_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    fail(["rewrite", str(llama), str(out), "-d", str(directions_file), "--layers", "1:9"],
         "measurement layer 9 is not in the direction file (it has layers 0-3)", out)


def test_direction_width_mismatch(llama: Path, tmp_path: Path) -> None:
    d, out = tmp_path / "d.safetensors", tmp_path / "o"
    random_measurements(32, 4).save(d)
    fail(["rewrite", str(llama), str(out), "-d", str(d), "--layers", "1:1"],
         "direction width 32 does not match the model width 64", out)


def test_nan_direction(llama: Path, tmp_path: Path) -> None:
    d, out = tmp_path / "d.safetensors", tmp_path / "o"
    m = random_measurements(64, 4)
    m.save(d)
    tensors = load_file(d)
    tensors["harmful_mean"][2, 5] = float("nan")
    from safetensors import safe_open

    with safe_open(str(d), "pt") as f:
        meta = f.metadata()
    save_file(tensors, d, metadata=meta)
    fail(["rewrite", str(llama), str(out), "-d", str(d), "--layers", "1:2"], "harmful mean of layer 2 has NaN", out)


def test_zero_direction(llama: Path, tmp_path: Path) -> None:
    d, out = tmp_path / "d.safetensors", tmp_path / "o"
    m = random_measurements(64, 4)
    Measurements({**m.harmful, 1: m.harmless[1].clone()}, m.harmless).save(d)
    fail(["rewrite", str(llama), str(out), "-d", str(d), "--layers", "2:1", "--strategy", "standard"],
         "direction from measurement 1 is zero", out)


def test_non_float_tensor_in_planned_position(llama: Path, directions_file: Path, tmp_path: Path) -> None:
    ckpt, out = copy_checkpoint(llama, tmp_path / "int8"), tmp_path / "o"
    edit_tensor_file(ckpt, O_PROJ, lambda t: t.update({O_PROJ: t[O_PROJ].to(torch.int8)}))
    fail(["rewrite", str(ckpt), str(out), "-d", str(directions_file), "--layers", "1:1"],
         f"{O_PROJ} has dtype int8; only float16, bfloat16, float32 and float64 tensors", out)


@pytest.mark.parametrize(("method", "found"), [
    ("gptq", "GPTQ weights (quant_method 'gptq')"), ("awq", "AWQ weights (quant_method 'awq')"),
    ("bitsandbytes", "bitsandbytes weights (quant_method 'bitsandbytes')"), ("int3-magic", "quant_method 'int3-magic'"),
])
def test_quantized_checkpoint_without_codec(llama: Path, directions_file: Path, tmp_path: Path, method: str,
                                            found: str) -> None:
    ckpt, out = copy_checkpoint(llama, tmp_path / "q"), tmp_path / "o"
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (ckpt / "config.json").write_text(json.dumps(config))
    fail(["rewrite", str(ckpt), str(out), "-d", str(directions_file), "--layers", "1:1"],
         f"quantized checkpoint: {found} cannot be re-encoded by any codec plugin; dequantize it to a float "
         "checkpoint first", out)


def test_gguf_checkpoint(directions_file: Path, tmp_path: Path) -> None:
    src, out = tmp_path / "gguf", tmp_path / "o"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model-Q4_K_M.gguf").write_bytes(b"GGUF" + bytes(64))
    fail(["rewrite", str(src), str(out), "-d", str(directions_file), "--layers", "1:1"],
         "model-Q4_K_M.gguf is a GGUF file; only safetensors checkpoints can be rewritten. Convert it first", out)


def test_planned_layer_with_missing_writer(llama: Path, directions_file: Path, tmp_path: Path) -> None:
    ckpt, out = copy_checkpoint(llama, tmp_path / "missing"), tmp_path / "o"
    edit_tensor_file(ckpt, DOWN, lambda t: t.pop(DOWN))
    fail(["rewrite", str(ckpt), str(out), "-d", str(directions_file), "--layers", "1-3:1"],
         f"layer 2: residual writer {DOWN} not found in the checkpoint (architecture llama)", out)


def test_unknown_strategy(llama: Path, directions_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    fail(["rewrite", str(llama), str(out), "-d", str(directions_file), "--layers", "1:1", "--strategy", "magic"],
         "unknown strategy 'magic'; registered: biprojected, householder, norm-preserving, projected, standard", out)


def test_unknown_architecture(llama: Path, directions_file: Path, tmp_path: Path) -> None:
    ckpt, out = copy_checkpoint(llama, tmp_path / "unknown"), tmp_path / "o"
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "mamba9"
    (ckpt / "config.json").write_text(json.dumps(config))
    fail(["rewrite", str(ckpt), str(out), "-d", str(directions_file), "--layers", "1:1"],
         "unknown architecture: model_type 'mamba9'", out)


def test_output_inside_source(llama: Path, directions_file: Path) -> None:
    fail(["rewrite", str(llama), str(llama / "sub"), "-d", str(directions_file), "--layers", "1:1"],
         "is the source or inside it", llama / "sub")


def test_non_empty_foreign_output(llama: Path, directions_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    fail(["rewrite", str(llama), str(out), "-d", str(directions_file), "--layers", "1:1"], "holds files this tool did not write (precious.txt)")
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


@pytest.mark.parametrize("args,expected", [
    (["--layers", "1:1", "--scale", "2.5"], "scale 2.5 is outside [0, 2]"),
    (["--layers", "1:1", "--sparsity", "1.5"], "sparsity 1.5 is outside [0, 1]"),
    (["--layers", "1:1", "--direction", "sideways"], "unknown strategy 'sideways'"),
    (["--layers", "0:0", "--layer-ensemble"], "the layer ensemble of measurement 0 needs its neighbours -1 and 1"),
    (["--layers", "1-x:1"], "expected FIRST[-LAST]:MEASUREMENT"),
    (["--layers", "1:1", "--layers", "1:2"], "layer 1 appears more than once"),
    ([], "the plan edits no layer"),
])
def test_bad_layer_specs(llama: Path, directions_file: Path, tmp_path: Path, args: list[str], expected: str) -> None:
    out = tmp_path / "o"
    fail(["rewrite", str(llama), str(out), "-d", str(directions_file), *args], expected, out)


def test_bad_plan_files(llama: Path, directions_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    plan = tmp_path / "plan.yml"
    plan.write_text("ablate:\n  - layer: 1\n    measurement: 1\n    sparsity: 2\n")
    fail(["rewrite", str(llama), str(out), "-d", str(directions_file), "--plan", str(plan)], "sparsity 2 is outside [0, 1]", out)
    plan.write_text("ablate:\n  - layer: 1\n    sparsity: 0.001\n")
    fail(["rewrite", str(llama), str(out), "-d", str(directions_file), "--plan", str(plan)], "sparsity 0.001 keeps no component", out)
    plan.write_text("invert: 'yes'\nablate: [{layer: 1}]\n")
    fail(["rewrite", str(llama), str(out), "-d", str(directions_file), "--plan", str(plan)], "invert must be true or false", out)
    plan.write_text("ablate: [{measurement: 1}]\n")
    fail(["rewrite", str(llama), str(out), "-d", str(directions_file), "--plan", str(plan)], "needs 'layer'", out)
    fail(["rewrite", str(llama), str(out), "-d", str(directions_file), "--plan", str(tmp_path / "nope.yml")], "plan file not found", out)
    fail(["rewrite", str(llama), str(out), "-d", str(directions_file), "--plan", str(plan), "--layers", "1:1"], "either --plan or --layers", out)


def test_missing_inputs(llama: Path, directions_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    fail(["rewrite", str(tmp_path / "nothing"), str(out), "-d", str(directions_file), "--layers", "1:1"], "checkpoint directory not found", out)
    fail(["rewrite", str(llama), str(out), "-d", str(tmp_path / "none.safetensors"), "--layers", "1:1"], "direction file not found", out)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    fail(["rewrite", str(llama), str(out), "-d", str(junk), "--layers", "1:1"], "not a direction file", out)
    fail(["rewrite", str(llama), str(out), "--layers", "1:1"], "no direction file given", out)
