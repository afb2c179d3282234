"""A third-party plugin, as a user would write one: a made-up architecture with fused experts."""
from __future__ import annotations

from collections.abc import Collection

from rewriter.architecture import Config, ResidualWriter
from rewriter.hookspecs import hookimpl


class Toyformer:
    name = "toyformer"
    summary = "made-up test architecture"
    components = ("attention", "mlp", "experts")

    def matches(self, config: Config, names: Collection[str]) -> bool:
        return config.get("model_type") == "toyformer"

    def num_layers(self, config: Config) -> int:
        return config["n_blocks"]

    def hidden_size(self, config: Config) -> int:
        return config["width"]

    def residual_writers(self, layer: int, config: Config, names: Collection[str]) -> list[ResidualWriter]:
        return [
            ResidualWriter(f"blocks.{layer}.attn.out.weight", "attention"),
            ResidualWriter(f"blocks.{layer}.ffn.w2.weight", "mlp"),
            ResidualWriter(f"blocks.{layer}.moe.experts_down", "experts", axis=2),  # [E, d_ff, d_model]
        ]


@hookimpl
def abliterate_architectures() -> list[Toyformer]:
    return [Toyformer()]
