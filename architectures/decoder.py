"""Maps for decoder stacks at ``PREFIX.{i}``: a ``LayerMap`` lists the parts of a layer and
what fills each; ``DecoderMap`` is the common attention + MLP layout in one line.

Most dense decoder-only models share the plain layout (``self_attn.o_proj``,
``mlp.down_proj``); a plugin for such a model is one ``DecoderMap(...)`` with its
``model_type`` names and, where they differ, its prefixes. Every tensor of a layer is
either a writer or matched by a declared non-writer pattern, so the planner can refuse
a layer holding anything the map does not know.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from rewriter.architecture import Config, ResidualWriter

from .blocks import Block, Linear, Slot, matcher, positive_int, slot

# Layer-level norms of the decoders here (pre-norms, or output norms that a writer names).
NORMS = ("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
         "post_attention_layernorm.bias", "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight")
# What attention reads with: separate or fused q/k/v projections, their biases, q/k norms.
ATTENTION_READS = tuple(f"self_attn.{m}.{p}" for m in ("q_proj", "k_proj", "v_proj", "qkv_proj", "q_norm", "k_norm")
                        for p in ("weight", "bias"))
# What an MLP reads with: separate or fused gate and up projections, or one fc1.
MLP_READS = tuple(f"mlp.{m}.{p}" for m in ("gate_proj", "up_proj", "gate_up_proj", "fc1") for p in ("weight", "bias"))


@dataclass(frozen=True)
class LayerMap:
    """An architecture map from the parts of its layers.

    ``slots``: each part of a layer and the blocks that may fill it (e.g. a dense MLP or
    routed experts). ``reads``: layer-level tensors that write nothing (norms). The first
    of ``prefixes`` that the checkpoint has names the layers; ``text_config`` is where a
    multimodal config keeps the decoder's sizes (the top level when absent).
    """

    name: str
    model_types: tuple[str, ...]
    summary: str
    slots: tuple[Slot, ...]
    reads: tuple[str, ...] = NORMS
    prefixes: tuple[str, ...] = ("model.layers",)
    text_config: str | None = None
    norm_offset: float = 0.0
    # Config keys that list the layers' kinds, counted where 'num_hidden_layers' is absent.
    layer_lists: tuple[str, ...] = ()

    @property
    def components(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for s in self.slots:
            for block in s.blocks:
                seen.setdefault(block.component)
        return tuple(seen)

    def text(self, config: Config) -> Config:
        """The part of config.json with the decoder's hyper-parameters."""
        nested = config.get(self.text_config) if self.text_config else None
        return nested if isinstance(nested, dict) else config

    def prefix(self, names: Collection[str]) -> str | None:
        for p in self.prefixes:
            head = p + "."
            if any(n.startswith(head) for n in names):
                return p
        return None

    def matches(self, config: Config, names: Collection[str]) -> bool:
        return config.get("model_type") in self.model_types and self.prefix(names) is not None

    def num_layers(self, config: Config) -> int:
        text = self.text(config)
        for key in self.layer_lists:  # a list of layer kinds, where the config keeps one instead
            kinds = text.get(key)
            if "num_hidden_layers" not in text and isinstance(kinds, (list, str)) and kinds:
                return len(kinds)
        return positive_int(text, "num_hidden_layers", self.name)

    def hidden_size(self, config: Config) -> int:
        return positive_int(self.text(config), "hidden_size", self.name)

    def layer_prefix(self, layer: int, config: Config, names: Collection[str]) -> str:
        return f"{self.prefix(names)}.{layer}"

    def blocks(self, layer: int, names: Collection[str]) -> list[Block]:
        """The blocks this layer holds, one per slot (none for an absent optional part)."""
        base = self.layer_prefix(layer, {}, names)
        return [b for s in self.slots if (b := s.choose(base, names)) is not None]

    def residual_writers(self, layer: int, config: Config, names: Collection[str]) -> list[ResidualWriter]:
        base, text = self.layer_prefix(layer, config, names), self.text(config)
        return [w for b in self.blocks(layer, names) for w in b.writers(base, text, names, self.norm_offset)]

    def non_writers(self, layer: int, config: Config, names: Collection[str]) -> list[str]:
        head = self.layer_prefix(layer, config, names) + "."
        blocks = self.blocks(layer, names)
        pattern = matcher([*self.reads, *(r for b in blocks for r in b.reads),
                           *(f"{n}.weight" for b in blocks for n in b.norms)])
        return [n for n in names if n.startswith(head) and pattern.fullmatch(n, len(head))]


def DecoderMap(name: str, model_types: tuple[str, ...], summary: str = "", *,
               prefixes: tuple[str, ...] = ("model.layers",), text_config: str | None = None,
               attention_out: str = "self_attn.o_proj", mlp_out: str = "mlp.down_proj",
               output_norms: tuple[str, str] | None = None, norm_offset: float = 1.0) -> LayerMap:
    """The plain layout: attention ``attention_out`` and MLP ``mlp_out`` write, each with its
    output norm from ``output_norms`` (attention, mlp) where the model has them (Gemma)."""
    attn_norm, mlp_norm = ((n,) for n in output_norms) if output_norms else ((), ())
    return LayerMap(
        name, model_types, summary,
        slots=(slot(Linear(attention_out, "attention", attn_norm, ATTENTION_READS)),
               slot(Linear(mlp_out, "mlp", mlp_norm, MLP_READS))),
        prefixes=prefixes, text_config=text_config, norm_offset=norm_offset,
    )
