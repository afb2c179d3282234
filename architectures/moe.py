"""Mixture-of-experts decoders: routed experts per expert (as most Hub checkpoints store
them) or fused ``[E, ...]`` (as transformers saves them, and gpt-oss and Llama-4 on the
Hub), shared experts, dense layers among MoE layers, routers declared as non-writers.

Fused ``down_proj`` orientation, from transformers' modeling code: Qwen2/3-MoE, Mixtral,
MiniMax-M2, DeepSeek-V3 and GLM-4.5 hold ``[E, d_model, d_ff]`` (axis 1); gpt-oss and
Llama-4 hold ``[E, d_ff, d_model]`` (axis 2), with gpt-oss's bias ``[E, d_model]``.
"""
from __future__ import annotations

from rewriter.hookspecs import hookimpl

from .blocks import Experts, Linear, slot
from .decoder import ATTENTION_READS, LayerMap
from .gemma3 import MULTIMODAL

ATTENTION = Linear("self_attn.o_proj", "attention", reads=ATTENTION_READS)
# DeepSeek's multi-head latent attention: low-rank q and kv paths; o_proj writes as usual.
MLA_READS = tuple(f"self_attn.{m}.{p}" for m in ("q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj",
                                                   "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj")
                  for p in ("weight", "bias"))
MLA = Linear("self_attn.o_proj", "attention", reads=MLA_READS)


def dense(ffn: str = "mlp", inputs: tuple[str, ...] = ("gate_proj", "up_proj")) -> Linear:
    """A dense MLP ``{ffn}.down_proj`` (MoE models keep some layers dense)."""
    return Linear(f"{ffn}.down_proj", "mlp", reads=tuple(f"{ffn}.{i}.{p}" for i in inputs for p in ("weight", "bias")))


def shared(module: str, *extra: str, inputs: tuple[str, ...] = ("gate_proj", "up_proj")) -> Linear:
    """Shared experts ``{module}.down_proj``, seen by every token; ``extra`` reads (their gate)."""
    return Linear(f"{module}.down_proj", "shared_experts",
                  reads=(*(f"{module}.{i}.weight" for i in inputs), *extra))


def routed(ffn: str = "mlp", *, per_expert: str = "down_proj", inputs: tuple[str, ...] = ("gate_proj", "up_proj"),
           axis: int = 1, router: tuple[str, ...] = ("gate.weight",), fused_bias: str | None = None,
           fused_inputs: tuple[str, ...] = ("gate_up_proj",)) -> Experts:
    """Routed experts under ``{ffn}.experts``, with the router tensors under ``{ffn}``."""
    head = f"{ffn}.experts"
    return Experts(head, per_expert, "down_proj", axis, fused_bias, reads=(
        *(f"{ffn}.{r}" for r in router), *(f"{head}.{f}" for f in fused_inputs),
        *(f"{head}.*.{i}.{p}" for i in inputs for p in ("weight", "bias"))))


# Qwen-style MoE: routed experts, or a dense MLP in the layers the config keeps dense.
QWEN_FFN = slot(dense(), routed())
QWEN_SHARED = slot(shared("mlp.shared_expert", "mlp.shared_expert_gate.weight"), optional=True)
# DeepSeek-style: the first layers dense, the others routed plus shared experts.
DEEPSEEK_FFN = slot(dense(), routed(router=("gate.weight", "gate.e_score_correction_bias")))
DEEPSEEK_SHARED = slot(shared("mlp.shared_experts"), optional=True)
# Mixtral-style: the Hub names 'block_sparse_moe.experts.{e}.w1/w2/w3', transformers 'mlp.experts'.
MIXTRAL_ROUTER = ("gate.weight", "e_score_correction_bias")
MIXTRAL_FFN = slot(routed("block_sparse_moe", per_expert="w2", inputs=("w1", "w3"), router=MIXTRAL_ROUTER),
                   routed(router=MIXTRAL_ROUTER))
LLAMA4_SLOTS = (
    slot(ATTENTION),
    slot(dense("feed_forward"), routed("feed_forward", axis=2, router=("router.weight",))),
    slot(shared("feed_forward.shared_expert"), optional=True),
)

MAPS = [
    LayerMap("qwen2_moe", ("qwen2_moe",), "Qwen1.5/2-MoE (shared expert with a gate)",
             (slot(ATTENTION), QWEN_FFN, QWEN_SHARED)),
    LayerMap("qwen3_moe", ("qwen3_moe",), "Qwen3-MoE (30B-A3B, 235B-A22B, Coder-480B)", (slot(ATTENTION), QWEN_FFN)),
    LayerMap("mixtral", ("mixtral",), "Mixtral 8x7B / 8x22B", (slot(ATTENTION), MIXTRAL_FFN)),
    LayerMap("minimax_m2", ("minimax_m2",), "MiniMax-M2", (slot(ATTENTION), MIXTRAL_FFN)),
    LayerMap("deepseek_v3", ("deepseek_v3", "kimi_k2"), "DeepSeek-V3/R1, Kimi-K2 (MLA, shared experts)",
             (slot(MLA), DEEPSEEK_FFN, DEEPSEEK_SHARED)),
    LayerMap("kimi_k25", ("kimi_k25",), "Kimi-K2.5 multimodal (DeepSeek-V3 layout); language layers only",
             (slot(MLA), DEEPSEEK_FFN, DEEPSEEK_SHARED),
             prefixes=MULTIMODAL, text_config="text_config"),
    LayerMap("glm4_moe", ("glm4_moe",), "GLM-4.5 / 4.6 (shared experts, first layers dense)",
             (slot(ATTENTION), DEEPSEEK_FFN, DEEPSEEK_SHARED)),
    LayerMap("gpt_oss", ("gpt_oss",), "gpt-oss (fused experts [E, d_ff, d_model] with biases)", (
        slot(Linear("self_attn.o_proj", "attention", reads=(*ATTENTION_READS, "self_attn.sinks"))),
        slot(routed(axis=2, router=("router.weight", "router.bias"), fused_bias="down_proj_bias",
                    fused_inputs=("gate_up_proj", "gate_up_proj_bias"))))),
    LayerMap("llama4_text", ("llama4_text",), "Llama-4 text (fused experts [E, d_ff, d_model])", LLAMA4_SLOTS),
    LayerMap("llama4", ("llama4",), "Llama-4 Scout/Maverick multimodal; language layers only", LLAMA4_SLOTS,
             prefixes=MULTIMODAL, text_config="text_config"),
]


@hookimpl
def abliterate_architectures() -> list[LayerMap]:
    return MAPS
