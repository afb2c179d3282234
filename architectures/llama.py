"""Llama, Mistral, Qwen2 and Qwen3: residual writers at ``model.layers.{i}``."""
from __future__ import annotations

from rewriter.hookspecs import hookimpl

from .decoder import DecoderMap, LayerMap

MAPS = [
    DecoderMap("llama", ("llama",), "Llama 2/3 and derivatives"),
    DecoderMap("mistral", ("mistral",), "Mistral dense models"),
    DecoderMap("qwen2", ("qwen2",), "Qwen2 / Qwen2.5"),
    DecoderMap("qwen3", ("qwen3",), "Qwen3 dense models"),
]


@hookimpl
def abliterate_architectures() -> list[LayerMap]:
    return MAPS
