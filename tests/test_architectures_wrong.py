"""Deliberately wrong maps must fail the proof, and a plugin author's map can be proven with
``abliterate check-architecture`` (this module is itself such a plugin: ``-p``)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner
from rewriter.architectures.blocks import Linear, slot
from rewriter.architectures.decoder import ATTENTION_READS, DecoderMap, LayerMap
from rewriter.architectures.moe import MAPS as MOE_MAPS
from rewriter.architectures.moe import routed

from rewriter.archcheck import prove
from rewriter.cli import main
from rewriter.hookspecs import hookimpl
from rewriter.registry import Registry

SQUARE = {"intermediate_size": 64}  # gpt-oss's d_ff equals d_model: shapes cannot tell the axis
GPT_OSS = next(m for m in MOE_MAPS if m.name == "gpt_oss")
# gpt-oss with its fused down_proj [E, d_ff, d_model] declared as [E, d_model, d_ff]
WRONG_AXIS = replace(GPT_OSS, summary="wrong axis", slots=(
    GPT_OSS.slots[0],
    slot(routed(axis=1, router=("router.weight", "router.bias"), fused_bias="down_proj_bias",
                fused_inputs=("gate_up_proj", "gate_up_proj_bias")))))


@hookimpl
def abliterate_architectures() -> list[LayerMap]:
    """As a plugin (-p tests.test_architectures_wrong): the wrong-axis gpt-oss map."""
    return [WRONG_AXIS]


class _Plugin:
    def __init__(self, maps: Sequence[LayerMap]) -> None:
        self.maps = list(maps)

    @hookimpl
    def abliterate_architectures(self) -> list[LayerMap]:
        return self.maps


def _registry(block: str, *maps: LayerMap) -> Registry:
    registry = Registry([f"no:{block}"])
    registry.register(_Plugin(maps), "third-party")
    return registry


def _problems(model_type: str, tmp_path: Path, registry: Registry, **overrides: object) -> list[str]:
    proofs = prove(model_type, tmp_path, registry=registry, overrides=overrides)
    return [p for proof in proofs for p in proof.problems]


def test_fused_experts_with_the_wrong_axis_fail(tmp_path: Path) -> None:
    problems = _problems("gpt_oss", tmp_path, _registry("moe", WRONG_AXIS), **SQUARE)
    assert any("experts (model.layers.0.mlp.experts) still writes along r" in p for p in problems), problems
    assert any("the layer's update" in p for p in problems), problems


def test_the_right_axis_passes_as_a_third_party_map(tmp_path: Path) -> None:
    assert _problems("gpt_oss", tmp_path, _registry("moe", replace(GPT_OSS, summary="a plugin's")), **SQUARE) == []


def test_a_wrong_norm_gain_fails(tmp_path: Path) -> None:
    """OLMo-2's norms apply g, not 1 + g."""
    wrong = DecoderMap("olmo2", ("olmo2",), "1 + g", output_norms=("post_attention_layernorm",
                                                                    "post_feedforward_layernorm"))
    problems = _problems("olmo2", tmp_path, _registry("postnorm", wrong))
    assert any("attention (model.layers.0.post_attention_layernorm) still writes along r" in p for p in problems)


def test_a_forgotten_output_norm_fails(tmp_path: Path) -> None:
    wrong = DecoderMap("gemma2", ("gemma2",), "no norms")
    problems = _problems("gemma2", tmp_path, _registry("postnorm", wrong))
    assert any("the layer's update" in p and "still writes along r" in p for p in problems), problems


def test_an_undeclared_tensor_is_an_error_naming_it_and_the_hook(tmp_path: Path) -> None:
    """A qwen2-moe map that forgets the shared expert: its tensors are neither written nor declared."""
    qwen2_moe = next(m for m in MOE_MAPS if m.name == "qwen2_moe")
    problems = _problems("qwen2_moe", tmp_path, _registry("moe", replace(qwen2_moe, slots=qwen2_moe.slots[:2])))
    assert problems and all(p.startswith("layer 0: architecture qwen2_moe does not say whether "
                                         "model.layers.0.mlp.shared_expert.down_proj.weight") for p in problems), problems
    assert "residual_writers() or non_writers() (plugin hook abliterate_architectures" in problems[0]


def test_a_map_that_misses_a_writer_fails(tmp_path: Path) -> None:
    """Declaring o_proj a non-writer hides nothing from the forward pass."""
    wrong = LayerMap("llama", ("llama",), "o_proj declared a reader", (
        slot(Linear("mlp.down_proj", "mlp", reads=("mlp.gate_proj.weight", "mlp.up_proj.weight"))),),
        reads=("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.o_proj.weight",
               *ATTENTION_READS))
    problems = _problems("llama", tmp_path, _registry("llama", wrong))
    assert any("the layer's update" in p for p in problems), problems


def test_check_architecture_command_with_a_plugin(tmp_path: Path) -> None:
    runner = CliRunner()
    good = runner.invoke(main, ["check-architecture", "gpt_oss", "--config", "intermediate_size=64", "--keep",
                                str(tmp_path / "good")])
    assert good.exit_code == 0, good.output
    assert "gpt_oss [hub] -> gpt_oss: PROVEN" in good.output
    assert "mlp.experts.down_proj axis 2 of [4, 64, 64]" in good.output
    assert (tmp_path / "good" / "hub-out" / "abliteration.json").is_file()
    bad = runner.invoke(main, ["check-architecture", "gpt_oss", "--config", "intermediate_size=64",
                               "-p", "no:moe", "-p", "tests.test_architectures_wrong"])
    assert bad.exit_code == 1
    assert "FAILED" in bad.output and "still writes along r" in bad.output
    assert bad.output.strip().splitlines()[-1] == "Error: check-architecture: the map for gpt_oss fails on the hub layout"


@pytest.mark.parametrize("args, expected", [
    (["nosuch_model"], "has no model_type 'nosuch_model'"),
    (["llama", "--config", "=3"], "--config '=3': expected KEY=VALUE"),
    (["llama", "--config", "hidden_size=-1"], "transformers cannot build a tiny llama"),
])
def test_check_architecture_errors_are_one_line(args: list[str], expected: str) -> None:
    from tests.helpers import fail

    fail(["check-architecture", *args], expected)
