"""Streaming rewrites of tiny random checkpoints of every built-in architecture, checked against
in-memory edits, byte-level copies, and the models transformers loads back."""
from __future__ import annotations

import json
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from rewriter.io.checkpoint import Checkpoint
from rewriter.cli import main
from rewriter.directions import Measurements
from rewriter.edits import plan_edits
from rewriter.plan import parse_layer_specs
from rewriter.registry import Registry
from tests.helpers import ALL_ARCHS, build_model

LAYERS = "1-3:2"


def run_rewrite(src: Path, out: Path, directions: Path, *extra: str) -> None:
    result = CliRunner().invoke(main, ["rewrite", str(src), str(out), "-d", str(directions), "--layers", LAYERS, "-q", *extra])
    assert result.exit_code == 0, result.output


def load(path: Path) -> torch.nn.Module:
    import transformers as tf

    config = json.loads((path / "config.json").read_text())
    cls = tf.AutoModelForImageTextToText if "vision_config" in config else tf.AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.bfloat16).eval()


def canonical(name: str) -> str:
    """'language_model.model.layers.1.x' and 'model.language_model.layers.1.x' -> 'layers.1.x'."""
    return name[name.index("layers."):] if ".layers." in f".{name}" and "vision" not in name else name


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(3, 19).reshape(2, 8)
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def raw_bytes(path: Path, name: str) -> bytes:
    from rewriter.io.safetensors_io import read_header

    e = read_header(path).entry(name)
    with open(path, "rb") as f:
        f.seek(e.start)
        return f.read(e.end - e.start)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_rewrite_matches_in_memory_edit_and_loads(arch: str, checkpoint_factory: Callable[[str], Path],
                                                  directions_file: Path, tmp_path: Path) -> None:
    src = checkpoint_factory(arch)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = tmp_path / "out"
    run_rewrite(src, out, directions_file)
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before, "the source was modified"

    ckpt = Checkpoint.open(src)
    registry = Registry()
    edits = plan_edits(ckpt, registry.architecture_for(ckpt.config, ckpt.names),
                       parse_layer_specs([LAYERS], 1.0, {}), Measurements.load(directions_file),
                       registry.strategy("norm-preserving"))
    assert len(edits) == 6  # o_proj and down_proj of layers 1, 2, 3

    # every shard: same header, untouched tensors byte-identical, edited ones equal to the in-memory edit
    for shard in ckpt.shards:
        assert (out / shard.name).read_bytes()[: len(shard.header.raw)] == shard.header.raw
        assert stat.S_IMODE((out / shard.name).stat().st_mode) == 0o644
        with safe_open(str(shard.path), "pt") as fs, safe_open(str(out / shard.name), "pt") as fo:
            assert fo.metadata() == fs.metadata()
            for name in fs.keys():
                if name in edits:
                    expected, _ = edits[name].apply(fs.get_tensor(name))
                    assert torch.equal(fo.get_tensor(name), expected), name
                    assert not torch.equal(fo.get_tensor(name), fs.get_tensor(name)), name
                else:
                    assert raw_bytes(out / shard.name, name) == raw_bytes(shard.path, name), name
    for other in ("config.json", "model.safetensors.index.json", "tokenizer_config.json", "chat_template.jinja", "custom_code.py"):
        assert (out / other).read_bytes() == (src / other).read_bytes()
    assert not list(out.glob("*.partial"))
    assert json.loads((out / "abliteration.json").read_text())["complete"] is True

    # the rewritten checkpoint loads in transformers and computes what the in-memory edited model computes
    original, rewritten = load(src), load(out)
    by_canonical = {canonical(n): t for n, t in edits.items()}
    reference_logits = logits(original)
    with torch.no_grad():
        hits = 0
        for pname, param in original.named_parameters():
            if canonical(pname) in by_canonical:
                param.copy_(by_canonical[canonical(pname)].apply(param.detach())[0])
                hits += 1
    assert hits == len(edits)
    edited_logits, rewritten_logits = logits(original), logits(rewritten)
    assert torch.equal(rewritten_logits, edited_logits)
    assert not torch.allclose(rewritten_logits, reference_logits)


def test_gemma_edit_removes_direction_from_what_reaches_the_residual(checkpoint_factory: Callable[[str], Path],
                                                                     directions_file: Path, tmp_path: Path) -> None:
    """Gemma's post-norm sits between o_proj and the residual add: the projection of its *output* on r goes to ~0."""
    src = checkpoint_factory("gemma3_text")
    out = tmp_path / "out"
    run_rewrite(src, out, directions_file, "--strategy", "biprojected")
    m = Measurements.load(directions_file)
    from rewriter.plugins.strategies import biprojected_direction

    r = biprojected_direction(m, 2, 1)
    r = (r / r.norm()).float()

    def projection(path: Path) -> float:
        model = load(path).float()
        seen = []
        layer = model.model.layers[1]
        h = layer.post_attention_layernorm.register_forward_hook(lambda mod, i, o: seen.append(o))
        with torch.no_grad():
            model(input_ids=torch.arange(3, 19).reshape(2, 8))
        h.remove()
        y = seen[0]
        return float((y @ r).abs().mean() / y.norm(dim=-1).mean())

    before, after = projection(src), projection(out)
    assert before > 0.02
    print(f"gemma post-norm projection on r: before {before:.4f}, after {after:.5f}")
    assert after < before * 0.05, (before, after)


def test_build_model_is_deterministic() -> None:
    a, b = build_model("llama"), build_model("llama")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
