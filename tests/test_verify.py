"""`abliterate verify` passes a faithful rewrite and names each kind of tampering."""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from rewriter.cli import main

O_PROJ = "model.layers.1.self_attn.o_proj.weight"
Q_PROJ = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture()
def rewritten(checkpoint_factory: Callable[[str], Path], directions_file: Path, tmp_path: Path) -> tuple[Path, Path, list[str]]:
    src, out = checkpoint_factory("llama"), tmp_path / "out"
    args = ["-d", str(directions_file), "--layers", "0-3:1"]
    result = CliRunner().invoke(main, ["rewrite", str(src), str(out), "-q", *args])
    assert result.exit_code == 0, result.output
    return src, out, args


def verify(src: Path, out: Path, args: list[str], *extra: str):
    return CliRunner().invoke(main, ["verify", str(src), str(out), "-q", *args, *extra])


def tamper(out: Path, name: str, change: Callable[[torch.Tensor], torch.Tensor]) -> None:
    for shard in out.glob("*.safetensors"):
        tensors = load_file(shard)
        if name in tensors:
            tensors[name] = change(tensors[name])
            save_file(tensors, shard, metadata={"format": "pt"})


def test_faithful_output_verifies(rewritten) -> None:
    src, out, args = rewritten
    result = verify(src, out, args)
    assert result.exit_code == 0, result.output
    assert "verified (norm-preserving, 8 edited tensors bit for bit)" in result.output


def test_wrong_plan_is_caught(rewritten) -> None:
    src, out, args = rewritten
    result = verify(src, out, ["-d", args[1], "--layers", "0-2:1"])
    assert result.exit_code == 1
    assert "model.layers.3.mlp.down_proj.weight: not edited by the plan, yet its bytes changed" in result.output


def test_unedited_writer_is_caught(rewritten, checkpoint_factory) -> None:
    src, out, args = rewritten
    original = load_file(next(p for p in src.glob("*.safetensors") if O_PROJ in load_file(p)))[O_PROJ]
    tamper(out, O_PROJ, lambda t: original)
    result = verify(src, out, args)
    assert result.exit_code == 1
    assert "elements differ from a fresh edit of the source tensor" in result.output.split(f"{O_PROJ}: ")[1]
    assert f"{O_PROJ}: still writes along the direction" in result.output
    assert f"{O_PROJ}: column norms changed" not in result.output  # the original has the original norms


def test_changed_norms_and_changed_bystanders_are_caught(rewritten) -> None:
    src, out, args = rewritten
    tamper(out, O_PROJ, lambda t: t * 1.5)
    tamper(out, Q_PROJ, lambda t: t + 1)
    result = verify(src, out, args)
    assert result.exit_code == 1
    assert f"{O_PROJ}: column norms changed" in result.output
    assert f"{Q_PROJ}: not edited by the plan, yet its bytes changed" in result.output


def test_missing_files_are_caught(rewritten) -> None:
    src, out, args = rewritten
    (out / "chat_template.jinja").unlink()
    (out / "model.safetensors.index.json").unlink()
    shard = sorted(out.glob("*.safetensors"))[-1]
    shard.unlink()
    result = verify(src, out, args)
    assert result.exit_code == 1
    for what in ("chat_template.jinja: missing", "model.safetensors.index.json: missing", f"{shard.name}: missing"):
        assert what in result.output
    shutil.rmtree(out)
