"""Hybrid decoders, whose layers mix attention with linear attention or state-space mixers:
Qwen3-Next and Qwen3.5 (Gated DeltaNet ``linear_attn.out_proj``), Nemotron-H (one mixer per
layer: Mamba-2 ``mixer.out_proj``, attention, MLP or experts), LFM2 (convolution ``conv.out_proj``).

The recurrent state's tensors (``A_log``, ``dt_bias``, ``D``, convolutions, gated norms) are
declared as non-writers: they act before ``out_proj``, which alone writes the residual.
"""
from __future__ import annotations

from rewriter.hookspecs import hookimpl

from .blocks import Linear, slot
from .decoder import MLP_READS, LayerMap
from .moe import ATTENTION, QWEN_FFN, QWEN_SHARED, dense, routed, shared

DELTANET = Linear("linear_attn.out_proj", "linear_attention", reads=tuple(f"linear_attn.{t}" for t in (
    "in_proj_qkvz.weight", "in_proj_ba.weight", "in_proj_qkv.weight", "in_proj_z.weight", "in_proj_b.weight",
    "in_proj_a.weight", "conv1d.weight", "conv1d.bias", "A_log", "dt_bias", "norm.weight")))
QWEN_MIXER = slot(ATTENTION, DELTANET)
QWEN35_MM = ("model.language_model.layers",)

MAMBA = Linear("mixer.out_proj", "mamba", reads=tuple(f"mixer.{t}" for t in (
    "in_proj.weight", "in_proj.bias", "conv1d.weight", "conv1d.bias", "A_log", "D", "dt_bias", "norm.weight")))
NEMOTRON_SLOTS = (
    slot(MAMBA,
         Linear("mixer.o_proj", "attention", reads=tuple(f"mixer.{m}.{p}" for m in ("q_proj", "k_proj", "v_proj")
                                                         for p in ("weight", "bias"))),
         dense("mixer", inputs=("up_proj",)),
         routed("mixer", inputs=("up_proj",), router=("gate.weight", "gate.e_score_correction_bias"),
                fused_inputs=("up_proj",))),
    slot(shared("mixer.shared_experts", inputs=("up_proj",)), optional=True),
)

# LFM2: a short gated convolution or attention per layer, each with its own out_proj.
LFM2_SLOTS = (
    slot(Linear("self_attn.out_proj", "attention", reads=tuple(
             f"self_attn.{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "q_layernorm", "k_layernorm"))),
         Linear("conv.out_proj", "conv", reads=("conv.in_proj.weight", "conv.in_proj.bias", "conv.conv.weight",
                                                "conv.conv.bias"))),
    slot(Linear("feed_forward.w2", "mlp", reads=("feed_forward.w1.weight", "feed_forward.w3.weight"))),
)

MAPS = [
    LayerMap("qwen3_next", ("qwen3_next",), "Qwen3-Next (DeltaNet + attention, MoE)", (QWEN_MIXER, QWEN_FFN, QWEN_SHARED)),
    LayerMap("qwen3_5_text", ("qwen3_5_text",), "Qwen3.5 dense text (DeltaNet + attention)",
             (QWEN_MIXER, slot(Linear("mlp.down_proj", "mlp", reads=MLP_READS)))),
    LayerMap("qwen3_5", ("qwen3_5",), "Qwen3.5 dense multimodal; language layers only",
             (QWEN_MIXER, slot(Linear("mlp.down_proj", "mlp", reads=MLP_READS))), prefixes=QWEN35_MM,
             text_config="text_config"),
    LayerMap("qwen3_5_moe_text", ("qwen3_5_moe_text",), "Qwen3.5-MoE text (DeltaNet + attention, MoE)",
             (QWEN_MIXER, QWEN_FFN, QWEN_SHARED)),
    LayerMap("qwen3_5_moe", ("qwen3_5_moe",), "Qwen3.5-MoE multimodal; language layers only",
             (QWEN_MIXER, QWEN_FFN, QWEN_SHARED), prefixes=QWEN35_MM, text_config="text_config"),
    LayerMap("lfm2", ("lfm2",), "LFM2 (short convolutions + attention)", LFM2_SLOTS,
             reads=("operator_norm.weight", "ffn_norm.weight")),
    LayerMap("nemotron_h", ("nemotron_h",), "Nemotron-H / Nemotron-3 (Mamba-2, attention, MLP, MoE layers)",
             NEMOTRON_SLOTS, reads=("norm.weight",), prefixes=("backbone.layers", "model.layers"),
             layer_lists=("layers_block_type", "hybrid_override_pattern")),
]


@hookimpl
def abliterate_architectures() -> list[LayerMap]:
    return MAPS
