"""Third-party plugins: a made-up architecture, listing, blocking."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import save_file

from rewriter.io.checkpoint import Checkpoint
from rewriter.edits import plan_edits
from rewriter.plan import parse_layer_specs
from rewriter.registry import Registry
from rewriter.cli import main
from rewriter.directions import Measurements
from tests import toy_plugin
from tests.helpers import random_measurements

WIDTH, BLOCKS = 32, 3


@pytest.fixture()
def toy_checkpoint(tmp_path: Path) -> Path:
    root = tmp_path / "toy"
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "toyformer", "n_blocks": BLOCKS, "width": WIDTH}))
    g = torch.Generator().manual_seed(0)
    tensors = {"embed.weight": torch.randn(50, WIDTH, generator=g)}
    for i in range(BLOCKS):
        tensors[f"blocks.{i}.attn.out.weight"] = torch.randn(WIDTH, WIDTH, generator=g)
        tensors[f"blocks.{i}.ffn.w2.weight"] = torch.randn(WIDTH, 48, generator=g)
        tensors[f"blocks.{i}.moe.experts_down"] = torch.randn(4, 48, WIDTH, generator=g)
    save_file(tensors, root / "model.safetensors")
    return root


@pytest.fixture()
def toy_directions(tmp_path: Path) -> Path:
    path = tmp_path / "toy-directions.safetensors"
    random_measurements(WIDTH, BLOCKS).save(path)
    return path


def test_registered_plugin_maps_a_made_up_architecture(toy_checkpoint: Path, toy_directions: Path) -> None:
    registry = Registry()
    ckpt = Checkpoint.open(toy_checkpoint)
    with pytest.raises(Exception, match="abliterate_architectures"):
        registry.architecture_for(ckpt.config, ckpt.names)
    registry.register(toy_plugin, "toy")
    arch = registry.architecture_for(ckpt.config, ckpt.names)
    edits = plan_edits(ckpt, arch, parse_layer_specs(["0-2:1"], 1.0, {}), Measurements.load(toy_directions),
                       registry.strategy("norm-preserving"))
    assert len(edits) == 9
    assert edits["blocks.1.moe.experts_down"].axis == 2


def test_plugin_from_the_command_line(toy_checkpoint: Path, toy_directions: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    listed = runner.invoke(main, ["plugins", "-p", "tests.toy_plugin"])
    assert listed.exit_code == 0
    assert "toyformer" in listed.output and "plugin tests.toy_plugin" in listed.output
    out = tmp_path / "out"
    result = runner.invoke(main, ["rewrite", str(toy_checkpoint), str(out), "-d", str(toy_directions),
                                  "--layers", "0-2:1", "-q", "-p", "tests.toy_plugin"])
    assert result.exit_code == 0, result.output
    r = Measurements.load(toy_directions)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        experts = f.get_tensor("blocks.1.moe.experts_down").double()
        embed_same = f.get_tensor("embed.weight")
    from rewriter.plugins.strategies import biprojected_direction

    d = biprojected_direction(r, 1, 1)
    assert (experts @ (d / d.norm())).abs().max() < 1e-5
    with safe_open(str(toy_checkpoint / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("embed.weight"), embed_same)


def test_block_a_builtin_plugin(checkpoint_factory, directions_file: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["rewrite", str(checkpoint_factory("llama")), str(tmp_path / "o"),
                                       "-d", str(directions_file), "--layers", "1:1", "-p", "no:llama"])
    assert result.exit_code == 1
    assert "unknown architecture: model_type 'llama'" in result.output
    assert not (tmp_path / "o").exists()


def test_unimportable_plugin_is_a_clear_error() -> None:
    result = CliRunner().invoke(main, ["plugins", "-p", "no_such_module_xyz"])
    assert result.exit_code == 1
    assert "cannot import plugin module 'no_such_module_xyz'" in result.output
