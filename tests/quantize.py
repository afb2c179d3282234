"""Quantized copies of tiny float checkpoints, laid out as the formats' publishers lay them out.

The values come from the codecs' own encoders; that transformers reads them as intended is
what the tests that load the outputs check.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from rewriter.archcheck import random_model, save, tiny_config
from rewriter.codec import Packed
from rewriter.registry import Registry
from tests.helpers import TEXT, build_model, write_checkpoint

GROUP = 32


def fp8_parts(codec: Any, quantization: dict[str, Any], name: str, t: torch.Tensor,
              scale_dtype: torch.dtype, scalar: bool) -> dict[str, torch.Tensor]:
    """``name`` (a float matrix) as float8 values and a scale grid named by ``codec.scale_suffix``."""
    rows, cols = t.shape[-2:]
    block = codec.block_of(quantization, rows, cols)
    scale = name[: -len("weight")] + codec.scale_suffix
    grid = (1,) if scalar else (*t.shape[:-2], -(-rows // block[0]), -(-cols // block[1]))
    like = {name: torch.empty(t.shape, dtype=torch.float8_e4m3fn), scale: torch.empty(grid, dtype=scale_dtype)}
    return codec.encode(Packed(name, (name, scale), tuple(t.shape), (), block), t.float(), like)


def mxfp4_parts(codec: Any, name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """A fused expert tensor [E, C, R] as ``_blocks`` [E, R, C/32, 16] and ``_scales`` [E, R, C/32]."""
    parts = (name + "_blocks", name + "_scales")
    return codec.encode(Packed(name, parts, tuple(t.shape)), t.float(), {})


def quantize(src: Path, dst: Path, quantization: dict[str, Any],
             convert: Callable[[str, torch.Tensor], dict[str, torch.Tensor] | None],
             apart: Callable[[str], bool] = lambda name: False) -> Path:
    """A copy of ``src`` where ``convert(name, tensor)`` replaces a tensor by its parts (None keeps it).

    Parts for which ``apart(name)`` holds go into a shard of their own, after the others, so
    that a weight and its scale lie in different shards.
    """
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization
    (dst / "config.json").write_text(json.dumps(config))
    index_path = src / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values())) if index_path.exists() \
        else ["model.safetensors"]
    weight_map: dict[str, str] = {}
    set_apart: dict[str, torch.Tensor] = {}
    for shard in shards:
        out: dict[str, torch.Tensor] = {}
        for name, t in load_file(src / shard).items():
            for part, value in (convert(name, t) or {name: t}).items():
                (set_apart if apart(part) else out)[part] = value.contiguous()
        save_file(out, dst / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, shard))
    if set_apart:
        save_file(set_apart, dst / "model-apart.safetensors", metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(set_apart, "model-apart.safetensors"))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def codec(name: str) -> Any:
    return Registry().codecs()[name].item


LINEAR = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight", "up_proj.weight",
          "down_proj.weight")


@dataclass(frozen=True)
class Case:
    id: str
    base: str  # tiny model: "llama" or "gpt_oss"
    quantization: dict[str, Any]
    codec: str
    loads: bool  # transformers can load this format on CPU
    tolerance: float  # relative error of the requantized edit (Frobenius)
    scale_dtype: torch.dtype = torch.float32
    scalar_scale: bool = False
    input_scale: bool = False
    apart: Callable[[str], bool] = field(default=lambda name: False)


def compressed(strategy: str, **extra: Any) -> dict[str, Any]:
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False, **extra}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}, "ignore": ["lm_head"]}


CASES = [
    Case("fp8-block", "llama", {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": [32, 32]}, "fp8", loads=True, tolerance=0.05),
    Case("fp8-partial-blocks-apart", "llama", {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                               "weight_block_size": [48, 40]}, "fp8", loads=False, tolerance=0.05,
         scale_dtype=torch.bfloat16, apart=lambda name: name.startswith("model.layers.1.") and "scale" in name),
    Case("compressed-channel", "llama", compressed("channel"), "compressed-tensors-fp8", loads=True, tolerance=0.05,
         scale_dtype=torch.bfloat16, input_scale=True),
    Case("compressed-tensor", "llama", compressed("tensor"), "compressed-tensors-fp8", loads=True, tolerance=0.08,
         scalar_scale=True),
    Case("mxfp4-experts", "gpt_oss", {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}, "mxfp4",
         loads=True, tolerance=0.2, apart=lambda name: name.startswith("model.layers.2.") and name.endswith("_scales")),
]


def _float_source(base: str, path: Path) -> tuple[Path, int, int]:
    """A tiny float checkpoint, its width and its layer count."""
    if base == "llama":
        return write_checkpoint(build_model("llama"), path, "llama"), TEXT["hidden_size"], TEXT["num_hidden_layers"]
    model = random_model(tiny_config("gpt_oss", {"intermediate_size": 64}))
    return save(model, path, "hub"), model.config.hidden_size, model.config.num_hidden_layers


def quantized(case: Case, tmp: Path) -> tuple[Path, int, int]:
    """``case``'s tiny model quantized into ``tmp/quantized``; its width and layer count."""
    src, width, layers = _float_source(case.base, tmp / "float")
    c = codec(case.codec)

    def convert(name: str, t: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if case.base == "gpt_oss":
            return mxfp4_parts(c, name, t) if name.endswith(("experts.gate_up_proj", "experts.down_proj")) else None
        if not (name.startswith("model.layers.") and name.endswith(LINEAR)):
            return None
        parts = fp8_parts(c, case.quantization, name, t, case.scale_dtype, case.scalar_scale)
        if case.input_scale:
            parts[name[: -len("weight")] + "input_scale"] = torch.tensor([0.0123], dtype=case.scale_dtype)
        return parts

    return quantize(src, tmp / "quantized", case.quantization, convert, case.apart), width, layers
