"""More dense decoders with the plain layout (``self_attn.o_proj``, ``mlp.down_proj``), one
line each, and the language layers inside multimodal wrappers of that layout.

Phi-3 fuses q/k/v and gate/up, Cohere-2 runs attention and MLP in parallel from one
norm: neither changes which tensors write into the residual stream.
"""
from __future__ import annotations

from rewriter.hookspecs import hookimpl

from .decoder import DecoderMap, LayerMap
from .gemma3 import MULTIMODAL

MAPS = [
    DecoderMap("phi3", ("phi3",), "Phi-3 / Phi-3.5 / Phi-4 (fused qkv and gate_up)"),
    DecoderMap("granite", ("granite",), "IBM Granite 3 dense"),
    DecoderMap("cohere2", ("cohere2",), "Cohere Command R7B / A (parallel attention and MLP)"),
    DecoderMap("smollm3", ("smollm3",), "SmolLM3"),
    DecoderMap("phi", ("phi",), "Phi-1.5 / Phi-2 (attention 'dense', MLP 'fc2', biases)", attention_out="self_attn.dense",
               mlp_out="mlp.fc2"),
    DecoderMap("mistral3", ("mistral3",), "Mistral Small 3.1/3.2 multimodal; language layers only",
               prefixes=MULTIMODAL, text_config="text_config"),
    DecoderMap("qwen2_5_vl", ("qwen2_5_vl",), "Qwen2.5-VL; language layers only",
               prefixes=("model.language_model.layers", "model.layers"), text_config="text_config"),
    DecoderMap("qwen3_vl", ("qwen3_vl",), "Qwen3-VL dense; language layers only",
               prefixes=("model.language_model.layers",), text_config="text_config"),
]


@hookimpl
def abliterate_architectures() -> list[LayerMap]:
    return MAPS
