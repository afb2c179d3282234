"""Gemma-3: text-only and multimodal, with sandwich norms after each residual writer.

Multimodal checkpoints name the language model ``language_model.model.layers`` (older
files) or ``model.language_model.layers`` (newer); the vision tower and projector are
never residual writers and pass through untouched.
"""
from __future__ import annotations

from rewriter.hookspecs import hookimpl

from .decoder import DecoderMap, LayerMap

NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")
MULTIMODAL = ("model.language_model.layers", "language_model.model.layers")

MAPS = [
    DecoderMap("gemma3_text", ("gemma3_text",), "Gemma-3 text-only (270M, 1B)", output_norms=NORMS),
    DecoderMap("gemma3", ("gemma3",), "Gemma-3 multimodal (4B-27B); language layers only",
               prefixes=MULTIMODAL, text_config="text_config", output_norms=NORMS),
]


@hookimpl
def abliterate_architectures() -> list[LayerMap]:
    return MAPS
