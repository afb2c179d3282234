"""A quantized checkpoint loaded whole, decoded by its codec plugin.

The model is the one transformers builds in float, filled with the very tensors the streamed
forward fills one layer at a time (``weights.WeightReader``), so that both paths give the same
numbers, and no format needs transformers' own quantizers (most of which want a GPU).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import AbliterateError
from ..io.checkpoint import Checkpoint
from .models import LoadedModel
from .streamed import open_streamed, outside_layers
from .weights import WeightReader, fill

if TYPE_CHECKING:
    from ..registry import Registry


def safetensors_checkpoint(path: Path) -> Checkpoint | None:
    """The checkpoint at ``path``, or None where it is no safetensors checkpoint (transformers loads
    it as it can)."""
    try:
        return Checkpoint.open(path)
    except AbliterateError:
        return None


def load_decoded(ckpt: Checkpoint, dtype: str, registry: Registry | None = None) -> LoadedModel:
    """The whole model of a quantized checkpoint in ``dtype``, every quantized weight decoded
    through its codec."""
    path = ckpt.root
    sm = open_streamed(path, dtype, registry, ckpt)
    embed, head = sm.model.get_input_embeddings(), sm.model.get_output_embeddings()
    reader = WeightReader(sm.ckpt, sm.view)
    try:
        for module in [embed, *sm.layers, *outside_layers(sm), *([] if sm.tied else [head])]:
            fill(module, sm.names(module), reader)
    finally:
        reader.close()
    if sm.tied:
        head._parameters["weight"] = embed._parameters["weight"]
    left = [n for n, t in [*sm.model.named_parameters(), *sm.model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise AbliterateError(f"{path}: {left[0]} lies outside the language model's decoder and head; a quantized "
                              "checkpoint is loaded through its codec for the language model only")
    return LoadedModel(sm.model, sm.tokenizer, sm.path)
