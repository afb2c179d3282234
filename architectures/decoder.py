"""A map for the common decoder layout: ``PREFIX.{i}.self_attn.o_proj`` and ``PREFIX.{i}.mlp.down_proj``.

Most dense decoder-only models share it; a plugin for such a model is one
``DecoderMap(...)`` with its ``model_type`` names and, where they differ, its prefixes.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from rewriter.architecture import Config, OutputNorm, ResidualWriter
from rewriter.errors import AbliterateError


@dataclass(frozen=True)
class DecoderMap:
    name: str
    model_types: tuple[str, ...]
    summary: str = ""
    # Layer prefixes to try, in order; the first the checkpoint has is used.
    prefixes: tuple[str, ...] = ("model.layers",)
    # Where the decoder's hyper-parameters live in config.json (None: at the top level).
    text_config: str | None = None
    attention_out: str = "self_attn.o_proj"
    mlp_out: str = "mlp.down_proj"
    # Norms between each writer and the residual add, as (attention, mlp) names in the layer.
    output_norms: tuple[str, str] | None = None
    norm_offset: float = 1.0
    components: tuple[str, ...] = ("attention", "mlp")

    def _config(self, config: Config) -> Config:
        return config.get(self.text_config) or {} if self.text_config else config

    def prefix(self, names: Collection[str]) -> str | None:
        for p in self.prefixes:
            head = p + "."
            if any(n.startswith(head) for n in names):
                return p
        return None

    def matches(self, config: Config, names: Collection[str]) -> bool:
        return config.get("model_type") in self.model_types and self.prefix(names) is not None

    def num_layers(self, config: Config) -> int:
        return _positive_int(self._config(config), "num_hidden_layers", self.name)

    def hidden_size(self, config: Config) -> int:
        return _positive_int(self._config(config), "hidden_size", self.name)

    def residual_writers(self, layer: int, config: Config, names: Collection[str]) -> list[ResidualWriter]:
        base = f"{self.prefix(names)}.{layer}"
        writers = []
        for i, (component, module) in enumerate(zip(self.components, (self.attention_out, self.mlp_out))):
            norm = OutputNorm(f"{base}.{self.output_norms[i]}.weight", self.norm_offset) if self.output_norms else None
            writers.append(ResidualWriter(f"{base}.{module}.weight", component, output_norm=norm))
            writers.append(ResidualWriter(f"{base}.{module}.bias", component, required=False, bias=True, output_norm=norm))
        return writers


def _positive_int(config: Config, key: str, arch: str) -> int:
    if not isinstance(config, Mapping) or key not in config:
        raise AbliterateError(f"config.json has no '{key}' for architecture {arch}")
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AbliterateError(f"config.json: '{key}' is {value!r}; expected a positive integer")
    return value
