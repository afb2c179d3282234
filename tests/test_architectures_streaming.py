"""Fused expert tensors streamed one expert slice at a time, checked by verify; component
scales and the completeness check of a planned layer, through the command line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from rewriter.plugins.strategies import norm_preserving, subtractive

import rewriter.engine.rewrite as engine
from rewriter.archcheck import random_measurements, random_model, save, tiny_config
from rewriter.cli import main
from rewriter.directions import Measurements
from rewriter.edits import plan_edits
from rewriter.engine.buffers import Scratch
from rewriter.engine.edit import TensorEdit
from rewriter.io.checkpoint import Checkpoint
from rewriter.plan import parse_layer_specs
from rewriter.registry import Registry
from tests.helpers import copy_checkpoint, edit_tensor_file, fail

FUSED = "model.layers.1.mlp.experts.down_proj"  # [4, 64, 32] in bf16


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny Qwen3-MoE in bf16, fused as transformers saves it, and a direction file."""
    root = tmp_path_factory.mktemp("moe")
    save(random_model(tiny_config("qwen3_moe")).to(torch.bfloat16), root / "ckpt", "fused")
    random_measurements(64, 4).save(root / "d.safetensors")
    return root / "ckpt", root / "d.safetensors"


@pytest.mark.parametrize("shape, axis", [((4, 16, 24), 1), ((4, 24, 16), 2), ((3, 2, 16, 5), 2)])
@pytest.mark.parametrize("update", [norm_preserving, subtractive])
def test_stacked_edit_is_the_edit_of_each_slice(shape: tuple[int, ...], axis: int, update) -> None:
    g = torch.Generator().manual_seed(0)
    tensor = torch.randn(shape, generator=g).to(torch.bfloat16)
    r = torch.randn(16, generator=g, dtype=torch.float64)
    edit = TensorEdit("w", axis, 1.0, r / r.norm(), update, stacked=True)
    whole, _ = edit.apply(tensor)
    for i in range(shape[0]):
        alone, _ = edit.piece(i).apply(tensor[i].clone())
        assert torch.equal(whole[i], alone)
    in_place = tensor.clone()
    edit.apply(in_place, in_place=True, workspace=torch.empty(tensor[0].numel()))
    assert torch.equal(in_place, whole)
    assert edit.slices(tensor.shape) == shape[0] and edit.piece(2).name == "w[2]"


def test_fused_tensor_is_read_edited_and_written_one_expert_at_a_time(moe: tuple[Path, Path], tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    src, directions = moe
    ckpt = Checkpoint.open(src)
    registry = Registry()
    edits = plan_edits(ckpt, registry.architecture_for(ckpt.config, ckpt.names), parse_layer_specs(["1-3:1"], 1.0, {}),
                       Measurements.load(directions), registry.strategy("norm-preserving"))
    assert edits[FUSED].stacked and edits[FUSED].axis == 1
    assert not edits["model.layers.1.self_attn.o_proj.weight"].stacked
    fused = ckpt.entry(FUSED)
    scratch = Scratch(edits, ckpt, torch.float32)
    assert scratch.read_bytes < fused.end - fused.start and scratch.numel < 4 * 64 * 32

    reads: list[str] = []
    real = engine.read_tensor
    monkeypatch.setattr(engine, "read_tensor", lambda f, entry, into=None: reads.append(entry.name) or real(f, entry, into))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["rewrite", str(src), str(out), "-d", str(directions), "--layers", "1-3:1", "-q"])
    assert result.exit_code == 0, result.output
    assert [n for n in reads if n.startswith(FUSED)] == [f"{FUSED}[{e}]" for e in range(4)]
    verified = CliRunner().invoke(main, ["verify", str(src), str(out), "-q"])
    assert verified.exit_code == 0, verified.output
    assert "bit for bit" in verified.output


def test_nan_in_one_expert_names_its_slice(moe: tuple[Path, Path], tmp_path: Path) -> None:
    src, directions = moe
    ckpt = copy_checkpoint(src, tmp_path / "nan")
    edit_tensor_file(ckpt, FUSED, lambda t: t[FUSED][2].__setitem__((5, 7), float("nan")))
    fail(["rewrite", str(ckpt), str(tmp_path / "o"), "-d", str(directions), "--layers", "1:1", "-q"],
         f"{FUSED}[2]: 1 NaN or inf values in the stored weight")


def test_components_come_from_the_map(moe: tuple[Path, Path], tmp_path: Path) -> None:
    src, directions = moe
    inspected = CliRunner().invoke(main, ["inspect", str(src), "--layer", "1"])
    assert inspected.exit_code == 0, inspected.output
    assert "components: attention, mlp, experts" in inspected.output
    assert FUSED in inspected.output

    dry = CliRunner().invoke(main, ["rewrite", str(src), "--dry-run", "-d", str(directions), "--layers", "1-2:1",
                                    "--component-scale", "experts=0.25", "--attn-scale", "0.5"])
    assert dry.exit_code == 0, dry.output
    assert any("experts" in line and "scale 0.25" in line and FUSED in line for line in dry.output.splitlines())
    assert any("attention" in line and "scale 0.5" in line for line in dry.output.splitlines())
    fail(["rewrite", str(src), str(tmp_path / "o"), "-d", str(directions), "--layers", "1:1",
          "--component-scale", "shared_experts=0.5"],
         "layer 1: unknown component 'shared_experts' (this architecture has: attention, mlp, experts)")


def test_a_tensor_the_map_does_not_know_stops_the_rewrite(checkpoint_factory, directions_file: Path,
                                                          tmp_path: Path) -> None:
    src = copy_checkpoint(checkpoint_factory("llama"), tmp_path / "extra")
    name = "model.layers.2.mlp.mystery.weight"
    down = "model.layers.2.mlp.down_proj.weight"
    edit_tensor_file(src, down, lambda t: t.update({name: torch.zeros(4, 4)}))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"][name] = index["weight_map"][down]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    fail(["rewrite", str(src), str(tmp_path / "o"), "-d", str(directions_file), "--layers", "1-3:1"],
         f"layer 2: architecture llama does not say whether {name} write into the residual stream; a map must "
         "name every tensor of a planned layer in residual_writers() or non_writers() (plugin hook "
         "abliterate_architectures", tmp_path / "o")
    result = CliRunner().invoke(main, ["rewrite", str(src), str(tmp_path / "o"), "-d", str(directions_file),
                                       "--layers", "3:1", "-q"])
    assert result.exit_code == 0, result.output  # layer 2 is not planned: its tensors are only copied
