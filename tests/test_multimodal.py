"""Gemma-3 multimodal: only language layers are edited, under both naming schemes; vision passes through."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors import safe_open

from rewriter.cli import main


@pytest.mark.parametrize("arch,prefix", [("gemma3", "language_model.model.layers."),
                                         ("gemma3-new-names", "model.language_model.layers.")])
def test_language_layers_edited_vision_untouched(arch: str, prefix: str, checkpoint_factory: Callable[[str], Path],
                                                 directions_file: Path, tmp_path: Path) -> None:
    src, out = checkpoint_factory(arch), tmp_path / "out"
    result = CliRunner().invoke(main, ["rewrite", str(src), str(out), "-d", str(directions_file), "--layers", "0-3:1", "-q"])
    assert result.exit_code == 0, result.output
    assert "tensors edited: 8" in result.output
    changed, vision = set(), 0
    for shard in src.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as fs, safe_open(str(out / shard.name), "pt") as fo:
            for name in fs.keys():
                same = fs.get_tensor(name).equal(fo.get_tensor(name))
                if "vision_tower" in name or "multi_modal_projector" in name:
                    vision += 1
                    assert same, name
                elif not same:
                    changed.add(name)
    assert vision > 10
    assert changed == {f"{prefix}{i}.{m}.weight" for i in range(4) for m in ("self_attn.o_proj", "mlp.down_proj")}
