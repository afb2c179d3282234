"""Decoders whose norms sit between the writers and the residual add: Gemma-2, OLMo-2 and
Gemma-4 (per-layer inputs, and in its MoE layers two norms in a row after each branch).

The norm's gain ``g`` enters as ``1 + g`` in Gemma-2, as ``g`` in OLMo-2 and Gemma-4
(``norm_offset``); the planner removes ``r * (offset + g)`` from the writer for it.
"""
from __future__ import annotations

from rewriter.hookspecs import hookimpl

from .blocks import Experts, Linear, slot
from .decoder import ATTENTION_READS, MLP_READS, NORMS, DecoderMap, LayerMap
from .gemma3 import MULTIMODAL

SANDWICH = ("post_attention_layernorm", "post_feedforward_layernorm")
FF, FF_1, FF_2 = "post_feedforward_layernorm", "post_feedforward_layernorm_1", "post_feedforward_layernorm_2"

GEMMA4_SLOTS = (
    slot(Linear("self_attn.o_proj", "attention", ("post_attention_layernorm",), ATTENTION_READS)),
    # In a layer with experts, the MLP's output goes through FF_1, is summed with the experts', then FF.
    slot(Linear("mlp.down_proj", "mlp", (FF_1, FF), MLP_READS, when=f"{FF_1}.weight"),
         Linear("mlp.down_proj", "mlp", (FF,), MLP_READS)),
    slot(Experts("experts", axis=1, norms=(FF_2, FF),
                 reads=("experts.gate_up_proj", "router.proj.weight", "router.scale", "router.per_expert_scale",
                        "pre_feedforward_layernorm_2.weight")), optional=True),
    slot(Linear("per_layer_projection", "per_layer_input", ("post_per_layer_input_norm",),
                ("per_layer_input_gate.weight",)), optional=True),
)
GEMMA4_READS = (*NORMS, "layer_scalar")

MAPS = [
    DecoderMap("gemma2", ("gemma2",), "Gemma-2 (sandwich norms, gain 1 + g)", output_norms=SANDWICH),
    DecoderMap("olmo2", ("olmo2",), "OLMo-2 (norms after the writers, gain g)", output_norms=SANDWICH,
               norm_offset=0.0),
    LayerMap("gemma4_text", ("gemma4_text",), "Gemma-4 text (per-layer inputs; MoE block)", GEMMA4_SLOTS,
             GEMMA4_READS),
    LayerMap("gemma4", ("gemma4",), "Gemma-4 multimodal; language layers only", GEMMA4_SLOTS, GEMMA4_READS,
             prefixes=MULTIMODAL, text_config="text_config"),
]


@hookimpl
def abliterate_architectures() -> list[LayerMap]:
    return MAPS
