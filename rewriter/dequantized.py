"""``--output-format bf16``: a quantized checkpoint written out as a plain bfloat16 one.

Every quantized weight, edited or not, becomes one bfloat16 tensor under its logical
name and shape, in the shard that held its first part; its scales and attached tensors
go; the config loses its ``quantization_config`` and the index is written anew. Shards
without quantized weights keep their layout, byte for byte.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch

from .engine.coded import DecodedTensor
from .engine.edit import TensorEdit
from .engine.layout import Reshape, ShardLayout
from .io.checkpoint import Checkpoint
from .io.safetensors_io import build_header, byte_size
from .logical import LogicalTensors

OUTPUT_FORMATS = ("same", "bf16")


def dequantized(ckpt: Checkpoint, view: LogicalTensors, edits: Mapping[str, TensorEdit]) -> Reshape:
    """The layout of the bfloat16 output; ``edits`` by logical name (those of quantized weights
    are applied while decoding)."""
    assert view.codec is not None
    home = {p.parts[0]: p for p in view.packed.values()}
    gone = {n for p in view.packed.values() for n in (*p.parts[1:], *p.attached)}
    shards: dict[str, ShardLayout] = {}
    weight_map: dict[str, str] = {}
    total = 0
    for shard in ckpt.shards:
        specs: list[tuple[str, str, tuple[int, ...]]] = []
        made: dict[str, DecodedTensor] = {}
        for e in shard.header.entries:
            packed = home.get(e.name)
            if packed is not None:
                specs.append((packed.name, "BF16", packed.shape))
                edit = edits.get(packed.name)
                # fused experts go slice by slice, edited or not (an edit along axis 0 needs the whole)
                stacked = (edit is None or edit.stacked) and view.stacked(ckpt, packed.name)
                made[packed.name] = DecodedTensor(packed.parts, partial(view.codec.decode, packed), edit, stacked,
                                                  torch.bfloat16)
            elif e.name not in gone:
                specs.append((e.name, e.dtype, e.shape))
        weight_map.update(dict.fromkeys((name for name, _, _ in specs), shard.name))
        total += sum(byte_size(dtype, shape) for _, dtype, shape in specs)
        if made or len(specs) != len(shard.header.entries):
            shards[shard.name] = ShardLayout(build_header(specs, shard.header.metadata), made)
    files = {"config.json": _plain_config(ckpt.config)}
    if ckpt.index_name:
        index = json.loads(ckpt.index_bytes())
        metadata = {**(index.get("metadata") or {}), "total_size": total}
        files[ckpt.index_name] = _json({"metadata": metadata, "weight_map": weight_map})
    return Reshape(shards, files)


def _plain_config(config: dict[str, Any]) -> bytes:
    """config.json without ``quantization_config`` (top level or in a sub-config)."""
    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    for key, value in plain.items():
        if isinstance(value, dict) and "quantization_config" in value:
            plain[key] = {k: v for k, v in value.items() if k != "quantization_config"}
    return _json(plain)


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=False) + "\n").encode()
