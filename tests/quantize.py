"""Quantized copies of tiny float checkpoints, laid out as the formats' publishers lay them out.

The values come from the codecs' own encoders; that transformers reads them as intended is
what the tests that load the outputs check. The cases marked ``by_library`` are made by the
format's own producer instead: compressed-tensors' ``ModelCompressor`` with its own scale
rule (``calculate_qparams``), saved by transformers' ``save_pretrained``.
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
    by_library: bool = False  # made by the format's own library (compressed-tensors), not by the codec


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
    Case("compressed-channel-by-library", "llama", compressed("channel"), "compressed-tensors-fp8", loads=True,
         tolerance=0.05, by_library=True),
    Case("compressed-tensor-by-library", "llama", compressed("tensor"), "compressed-tensors-fp8", loads=True,
         tolerance=0.08, by_library=True),
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
    if case.by_library:
        return by_compressed_tensors(case.quantization["config_groups"]["group_0"]["weights"]["strategy"],
                                     tmp / "quantized"), TEXT["hidden_size"], TEXT["num_hidden_layers"]
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


def by_compressed_tensors(strategy: str, path: Path) -> Path:
    """The tiny llama's linear layers (not ``lm_head``) in compressed-tensors FP8 with one scale per
    output channel or per tensor, as its library quantizes and compresses them, in sharded files."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus, apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams

    model = build_model("llama").float()
    args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True, dynamic=False)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)}, ignore=["lm_head"],
        quantization_status=QuantizationStatus.INITIALIZED))
    for module in model.modules():
        if getattr(module, "quantization_scheme", None) is not None:  # what an observer sees: min and max
            w = module.weight.data
            lo, hi = (w.amin(1, keepdim=True), w.amax(1, keepdim=True)) if strategy == "channel" else (w.min(), w.max())
            scale, zero = calculate_qparams(lo.reshape(-1), hi.reshape(-1), args)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="float-quantized")
    compressor.compress_model(model)
    write_checkpoint(model, path, "llama")
    compressor.update_config(path)
    return path


def loading_options(codec_name: str) -> dict[str, Any]:
    """What ``from_pretrained`` needs to dequantize a checkpoint of this codec on CPU: a
    compressed-tensors model keeps its codes as the weight unless told to decompress."""
    if codec_name != "compressed-tensors-fp8":
        return {}
    import transformers as tf

    return {"quantization_config": tf.CompressedTensorsConfig(run_compressed=False)}
