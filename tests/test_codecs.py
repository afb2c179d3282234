"""Quantized checkpoints in, the same format out: FP8 block-scaled, compressed-tensors FP8, MXFP4.

Tiny models from transformers' classes are quantized by the tests (block sizes that do not
divide the shapes included, scales in another shard than their weights) or by the format's
own library (compressed-tensors), rewritten by the CLI, and then checked: the dequantized
output is the fp32 edit of the dequantized input within the format's error, the edit removed
the direction, every other byte is unchanged, ``verify`` passes, and transformers loads the
output where it can load the format on CPU.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from rewriter.cli import main
from rewriter.codec import Packed
from rewriter.io.checkpoint import Checkpoint
from rewriter.pipeline import RewriteJob, prepare
from rewriter.plan import parse_layer_specs
from tests.helpers import random_measurements
from tests.quantize import CASES, Case, loading_options, quantized

def _tensors(path: Path) -> dict[str, tuple[str, torch.Tensor]]:
    """Every stored tensor: name -> (shard, tensor)."""
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update({k: (shard.name, f.get_tensor(k)) for k in f.keys()})  # noqa: SIM118
    return out


def _parts(job: RewriteJob, name: str) -> tuple[str, ...]:
    """The stored tensors of a logical one (itself, when stored in float)."""
    return job.view.packed[name].parts if name in job.view.packed else (name,)


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _along(w: torch.Tensor, r: torch.Tensor, axis: int) -> torch.Tensor:
    """|w . r| over ``axis`` for every other index: what remains of the direction in each column."""
    return torch.tensordot(w.double().movedim(axis, -1), r, dims=1).abs()


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _rewritten(case: Case, tmp_path: Path, *options: str) -> tuple[Path, Path, RewriteJob]:
    """``case`` quantized, rewritten by the CLI (layers 1-2, norm-preserving) and verified; the job."""
    src, width, layers = quantized(case, tmp_path)
    directions = tmp_path / "directions.safetensors"
    random_measurements(width, layers).save(directions)
    out = tmp_path / "out"
    _invoke("rewrite", str(src), str(out), "-d", str(directions), "--layers", "1-2:1", *options)
    assert "verified" in _invoke("verify", str(src), str(out)).lower()
    return src, out, prepare(src, None, directions, parse_layer_specs(["1-2:1"], 1.0, {}), "norm-preserving")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_quantized_rewrite_keeps_the_format(case: Case, tmp_path: Path) -> None:
    src, out, job = _rewritten(case, tmp_path)
    before, after = _tensors(src), _tensors(out)
    assert set(before) == set(after)
    edited_parts = {p for name in job.edits for p in _parts(job, name)}
    assert edited_parts and all(p.startswith(("model.layers.1.", "model.layers.2.")) for p in edited_parts)
    for shard in Checkpoint.open(src).shards:  # same headers: same names, dtypes, shapes, offsets, sizes
        assert (out / shard.name).read_bytes()[: len(shard.header.raw)] == shard.header.raw
    for name, (_, t) in before.items():
        if name not in edited_parts:
            assert _bytes(after[name][1]) == _bytes(t), f"{name} changed, yet it is outside the plan"
    _check_fidelity(case, job, before, after)
    if case.by_library:  # the codec reads the library's own files as transformers and the library do
        _check_transformers_loads(job, src, before)
    if case.loads:
        _check_transformers_loads(job, out, after)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_edit_threads_give_the_bits_of_one_thread(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A quantized edit's column chunks and its rounding's column groups run on the edit threads;
    ``verify`` recomputes every edit on one thread and must find the same bits. Small chunks and
    groups, and FP8's bands of rows one block tall, so that a tiny model has several of each
    (the bands' sums along r are added in their order, whichever thread finished first)."""
    monkeypatch.setattr("rewriter.engine.edit.COLUMNS", 16)
    monkeypatch.setattr("rewriter.rounding.COLUMNS", 8)
    monkeypatch.setattr("rewriter.plugins.fp8.BAND_ROWS", 1)
    _rewritten(case, tmp_path, "--workers", "1", "--edit-threads", "3")


def _check_fidelity(case: Case, job: RewriteJob, before: dict[str, Any], after: dict[str, Any]) -> None:
    c = job.view.codec
    assert c is not None and c.name == case.codec
    coded = [(name, edit) for name, edit in job.edits.items() if name in job.view.packed]
    assert coded
    for name, edit in coded:
        packed = job.view.packed[name]
        source = c.decode(packed, {p: before[p][1] for p in packed.parts})
        written = c.decode(packed, {p: after[p][1] for p in packed.parts})
        expected, _ = edit.apply(source, torch.float32)
        error = float(torch.linalg.vector_norm(written - expected) / torch.linalg.vector_norm(expected))
        assert error < case.tolerance, f"{name}: requantized edit is {error:.3f} away from the fp32 edit"
        kept = float(_along(written, edit.direction, edit.axis).mean() / _along(source, edit.direction, edit.axis).mean())
        assert kept < 0.1, f"{name}: {kept:.2f} of the component along the direction is left after requantization"
        assert float(_along(expected, edit.direction, edit.axis).max()) < 1e-4 * float(
            _along(source, edit.direction, edit.axis).max())


def _check_transformers_loads(job: RewriteJob, out: Path, after: dict[str, Any]) -> None:
    """transformers dequantizes the output on CPU into the values the codec decodes (compressed-tensors
    through its own package, told to decompress: it keeps the codes as the weight otherwise)."""
    import transformers as tf

    c = job.view.codec
    assert c is not None
    model = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, **loading_options(c.name)).eval()
    params = dict(model.named_parameters())
    for name in job.edits:
        packed = job.view.packed.get(name)
        ours = c.decode(packed, {p: after[p][1] for p in packed.parts}) if packed else after[name][1].float()
        loaded = params[name].detach().float()
        assert loaded.shape == ours.shape
        assert torch.allclose(loaded, ours, rtol=1e-2, atol=1e-6), f"{name}: transformers reads other values"
    logits = model(torch.arange(8).unsqueeze(0)).logits
    assert torch.isfinite(logits).all()


def test_scale_zero_leaves_quantized_weights_untouched(tmp_path: Path) -> None:
    src, width, layers = quantized(CASES[0], tmp_path)
    directions = tmp_path / "directions.safetensors"
    random_measurements(width, layers).save(directions)
    out = tmp_path / "out"
    _invoke("rewrite", str(src), str(out), "-d", str(directions), "--layers", "1-2:1", "--scale", "0")
    for shard in Checkpoint.open(src).shards:
        assert (out / shard.name).read_bytes() == shard.path.read_bytes()


def test_codec_rejects_a_mismatched_scale(tmp_path: Path) -> None:
    src, width, layers = quantized(CASES[0], tmp_path)
    directions = tmp_path / "directions.safetensors"
    random_measurements(width, layers).save(directions)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"]["weight_block_size"] = [16, 16]  # the stored grids are for 32 x 32
    (src / "config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(main, ["rewrite", str(src), str(tmp_path / "o"), "-d", str(directions),
                                       "--layers", "1:1"])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1, result.output
    assert ("model.layers.0.mlp.down_proj.weight_scale_inv has shape [2, 3]; blocks of [16, 16] over [64, 96] "
            "need [4, 6]") in result.output, result.output
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("*.safetensors"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bf16_output_is_a_plain_checkpoint(case: Case, tmp_path: Path) -> None:
    """--output-format bf16: every quantized weight decoded (and edited where planned) into one
    bfloat16 tensor of its logical name; scales and quantization config gone; loads as float."""
    import transformers as tf

    src, out, job = _rewritten(case, tmp_path, "--output-format", "bf16")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    before, after = _tensors(src), _tensors(out)
    assert set(after) == job.view.names
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert {n: shard for n, (shard, _) in after.items()} == index
    c = job.view.codec
    assert c is not None
    for name, (_, t) in after.items():
        packed = job.view.packed.get(name)
        if packed is None:
            edit = job.edits.get(name)
            expected = edit.apply(before[name][1], torch.float32)[0] if edit else before[name][1]
            assert _bytes(t) == _bytes(expected), name
            continue
        decoded = c.decode(packed, {p: before[p][1] for p in packed.parts})
        edit = job.edits.get(name)
        expected = (edit.apply(decoded, torch.float32)[0] if edit else decoded).to(torch.bfloat16)
        assert t.dtype == torch.bfloat16 and torch.equal(t, expected), name
    model = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    for name in job.edits:
        assert torch.equal(params[name].detach(), after[name][1].float()), name
    assert torch.isfinite(model(torch.arange(8).unsqueeze(0)).logits).all()


def test_bf16_output_needs_a_quantized_source(checkpoint_factory: Callable[[str], Path], directions_file: Path,
                                              tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["rewrite", str(checkpoint_factory("llama")), str(tmp_path / "o"), "-d",
                                       str(directions_file), "--layers", "1:1", "--output-format", "bf16"])
    assert result.exit_code == 1 and "is not quantized; --output-format bf16 writes a quantized checkpoint out " \
        "dequantized" in result.output, result.output


def test_a_third_party_codec(checkpoint_factory: Callable[[str], Path], directions_file: Path, tmp_path: Path) -> None:
    """A codec from a plugin of one's own (tests/toy_codec.py) is used like a built-in one."""
    from tests.quantize import quantize
    from tests.toy_codec import RowInt8

    def convert(name: str, t: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if not name.endswith(("o_proj.weight", "down_proj.weight")):
            return None
        head = name[: -len("weight")]
        parts = RowInt8().encode(Packed(name, (head + "qweight", head + "qscale"), tuple(t.shape)), t.float(), {})
        return parts

    src = quantize(checkpoint_factory("llama"), tmp_path / "int8", {"quant_method": "toy-int8"}, convert)
    out = tmp_path / "out"
    fail_without = CliRunner().invoke(main, ["rewrite", str(src), str(out), "-d", str(directions_file),
                                             "--layers", "1:1"])
    assert fail_without.exit_code == 1 and "quant_method 'toy-int8' cannot be re-encoded" in fail_without.output
    _invoke("rewrite", str(src), str(out), "-d", str(directions_file), "--layers", "1:1", "-p", "tests.toy_codec")
    assert "verified" in _invoke("verify", str(src), str(out), "-p", "tests.toy_codec").lower()
    head = "model.layers.1.self_attn.o_proj."
    before, after = _tensors(src), _tensors(out)
    assert not torch.equal(before[head + "qweight"][1], after[head + "qweight"][1])
    assert torch.equal(before["model.layers.2.self_attn.o_proj.qweight"][1],
                       after["model.layers.2.self_attn.o_proj.qweight"][1])
