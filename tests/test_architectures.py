"""Every built-in map proven by a forward pass (rewriter.archcheck): a tiny random model of
each type from transformers' own classes, saved in the Hub's and in transformers' fused
layout, rewritten, loaded back and run with hooks on every residual write."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from rewriter.archcheck import prove, prove_checkpoint, random_model, save, tiny_config
from rewriter.registry import Registry
from tests.helpers import rename_tensors

PLAIN = ("attention", "mlp")
QWEN_MOE = ("attention", "experts", "shared_experts")
DEEPSEEK = ("attention", "experts", "mlp", "shared_experts")
QWEN_NEXT = ("attention", "experts", "linear_attention", "shared_experts")
# Transformers computes Qwen2.5-VL's rotary sections in its modeling code ([16, 24, 24], for
# head_dim 128); the tiny head_dim is 16.
MROPE = {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}}


@dataclass(frozen=True)
class Case:
    id: str
    model_type: str
    layouts: tuple[str, ...]  # the layouts that hold different tensors, each proven
    components: tuple[str, ...]
    fused: tuple[str, ...] = ()  # 'tensor axis k' of each fused expert writer
    overrides: dict[str, Any] = field(default_factory=dict)
    saved: tuple[str, ...] = ("hub", "fused")  # the layouts transformers is asked to save


CASES = [
    Case("llama", "llama", ("hub",), PLAIN),
    Case("mistral", "mistral", ("hub",), PLAIN),
    Case("qwen2", "qwen2", ("hub",), PLAIN),
    Case("qwen3", "qwen3", ("hub",), PLAIN),
    Case("gemma3_text", "gemma3_text", ("hub",), PLAIN),
    Case("gemma3", "gemma3", ("hub", "fused"), PLAIN),
    Case("gemma2", "gemma2", ("hub",), PLAIN),
    Case("olmo2", "olmo2", ("hub",), PLAIN),
    Case("phi3", "phi3", ("hub",), PLAIN),
    Case("granite", "granite", ("hub",), PLAIN),
    Case("cohere2", "cohere2", ("hub",), PLAIN),
    Case("smollm3", "smollm3", ("hub",), PLAIN),
    Case("phi", "phi", ("hub",), PLAIN),  # attention 'dense', MLP 'fc2', with biases
    Case("mistral3", "mistral3", ("hub", "fused"), PLAIN),
    Case("qwen2_5_vl", "qwen2_5_vl", ("hub", "fused"), PLAIN, overrides=MROPE),
    Case("qwen3_vl", "qwen3_vl", ("hub",), PLAIN),
    Case("gemma4_text", "gemma4_text", ("hub",), ("attention", "mlp", "per_layer_input")),
    Case("gemma4_text-moe", "gemma4_text", ("hub",), ("attention", "experts", "mlp", "per_layer_input"),
         ("layers.N.experts.down_proj axis 1",), {"enable_moe_block": True}),
    Case("gemma4-moe", "gemma4", ("hub",), ("attention", "experts", "mlp", "per_layer_input"),
         ("layers.N.experts.down_proj axis 1",), {"enable_moe_block": True}),
    Case("qwen2_moe", "qwen2_moe", ("hub", "fused"), QWEN_MOE, ("mlp.experts.down_proj axis 1",)),
    Case("qwen3_moe", "qwen3_moe", ("hub", "fused"), ("attention", "experts"), ("mlp.experts.down_proj axis 1",)),
    Case("mixtral", "mixtral", ("hub", "fused"), ("attention", "experts"), ("mlp.experts.down_proj axis 1",)),
    Case("minimax_m2", "minimax_m2", ("hub", "fused"), ("attention", "experts"), ("mlp.experts.down_proj axis 1",)),
    Case("deepseek_v3", "deepseek_v3", ("hub", "fused"), DEEPSEEK, ("mlp.experts.down_proj axis 1",)),
    Case("glm4_moe", "glm4_moe", ("hub", "fused"), DEEPSEEK, ("mlp.experts.down_proj axis 1",)),
    # Its Hub layout as transformers saves it is wrong (see test_kimi_k25_hub_layout).
    Case("kimi_k25", "kimi_k25", ("fused",), DEEPSEEK, ("mlp.experts.down_proj axis 1",), saved=("fused",)),
    # d_ff = d_model, as in gpt-oss itself: shapes cannot tell the axis, the map must.
    Case("gpt_oss", "gpt_oss", ("hub",), ("attention", "experts"), ("mlp.experts.down_proj axis 2",),
         {"intermediate_size": 64}),
    Case("llama4_text", "llama4_text", ("hub",), ("attention", "experts", "mlp", "shared_experts"),
         ("feed_forward.experts.down_proj axis 2",), {"interleave_moe_layer_step": 2}),
    Case("llama4", "llama4", ("hub",), ("attention", "experts", "mlp", "shared_experts"),
         ("feed_forward.experts.down_proj axis 2",), {"interleave_moe_layer_step": 2}),
    Case("qwen3_next", "qwen3_next", ("hub", "fused"), QWEN_NEXT, ("mlp.experts.down_proj axis 1",)),
    Case("qwen3_5_text", "qwen3_5_text", ("hub",), ("attention", "linear_attention", "mlp")),
    Case("qwen3_5", "qwen3_5", ("hub",), ("attention", "linear_attention", "mlp")),
    Case("qwen3_5_moe_text", "qwen3_5_moe_text", ("hub", "fused"), QWEN_NEXT, ("mlp.experts.down_proj axis 1",)),
    Case("qwen3_5_moe", "qwen3_5_moe", ("hub", "fused"), QWEN_NEXT, ("mlp.experts.down_proj axis 1",)),
    Case("lfm2", "lfm2", ("hub",), ("attention", "conv", "mlp"), overrides={
        "num_hidden_layers": 5, "layer_types": ["conv", "full_attention", "conv", "full_attention", "conv"]}),
    Case("nemotron_h", "nemotron_h", ("hub", "fused"), ("attention", "experts", "mamba", "mlp", "shared_experts"),
         ("mixer.experts.down_proj axis 1",),
         {"layers_block_type": ["moe", "linear_attention", "moe", "full_attention", "mlp", "linear_attention"]}),
]


def _needs(model_type: str) -> None:
    """The one acceptable skip: this transformers has no such model type."""
    from transformers import CONFIG_MAPPING, __version__

    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {__version__} has no model_type '{model_type}'")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_map_is_proven_by_a_forward_pass(case: Case, tmp_path: Path) -> None:
    _needs(case.model_type)
    proofs = prove(case.model_type, tmp_path, overrides=case.overrides, layouts=case.saved)
    report = "\n".join(line for p in proofs for line in p.lines())
    print(report)
    assert [p.layout for p in proofs] == list(case.layouts), report
    for proof in proofs:
        assert not proof.problems, report
        assert proof.architecture == case.model_type, report
        assert tuple(proof.components) == case.components, report
        assert len(proof.planned) >= 3, report
        assert proof.worst < 1e-5 and proof.weakest > 1e-2, report
    fused = [f for p in proofs for f in p.fused]
    for expected in case.fused:
        assert any(expected in f for f in fused), report
    if case.fused:
        assert all(p.experts > 0 for p in proofs), report


def test_kimi_k25_hub_layout(tmp_path: Path) -> None:
    """Kimi-K2.5 on the Hub: 'language_model.model.layers', experts one by one. (transformers
    5.x saves this layout with 'language_model.model.blocks', reversing its own 'blocks' ->
    'layers' rename of the vision tower on the language layers too; no Hub file has that.)"""
    _needs("kimi_k25")
    src = save(random_model(tiny_config("kimi_k25")), tmp_path / "hub", "hub")
    rename_tensors(src, lambda n: n.replace("language_model.model.blocks.", "language_model.model.layers."))
    proof = prove_checkpoint("kimi_k25", "hub", src, tmp_path, Registry())
    assert not proof.problems, "\n".join(proof.lines())
    assert proof.experts > 0 and proof.edited > 10


def test_per_expert_and_fused_layouts_are_edited_identically(tmp_path: Path) -> None:
    """The same model saved both ways: each expert's edit is bit-identical, since a fused
    tensor is edited one expert slice at a time exactly as a per-expert tensor is."""
    proofs = prove("qwen3_moe", tmp_path, layouts=("hub", "fused"))
    assert not any(p.problems for p in proofs)

    def tensors(layout: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for shard in (tmp_path / f"{layout}-out").glob("*.safetensors"):
            out.update(load_file(shard))
        return out

    hub, fused = tensors("hub"), tensors("fused")
    compared = 0
    for layer in range(3):
        stacked = fused[f"model.layers.{layer}.mlp.experts.down_proj"]
        for e in range(stacked.shape[0]):
            assert torch.equal(stacked[e], hub[f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight"])
            compared += 1
    assert compared == 12


def test_kimi_k2_is_the_deepseek_v3_layout(tmp_path: Path) -> None:
    """Kimi-K2's config says model_type 'kimi_k2' (its own modeling code, not in transformers);
    its tensors are DeepSeek-V3's, which the proof above covers."""
    import json

    src = save(random_model(tiny_config("deepseek_v3")), tmp_path / "k2", "hub")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "kimi_k2"}))
    from rewriter.io.checkpoint import Checkpoint

    ckpt = Checkpoint.open(src)
    arch = Registry().architecture_for(ckpt.config, ckpt.names)
    assert arch.name == "deepseek_v3"
    writers = [w.name for w in arch.residual_writers(1, ckpt.config, ckpt.names)]
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in writers
