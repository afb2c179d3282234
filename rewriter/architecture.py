"""What an architecture plugin tells the engine: which tensors write into the residual stream."""
from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

Config = Mapping[str, Any]


@dataclass(frozen=True)
class OutputNorm:
    """A norm between a writer and the residual add (Gemma's sandwich norms).

    Its gain is applied as ``offset + g``; removing ``normalize(r * (offset + g))`` from
    the writer's output is what removes ``r`` from what reaches the residual stream.
    """

    name: str
    offset: float = 1.0


@dataclass(frozen=True)
class ResidualWriter:
    """One tensor that writes into the residual stream.

    ``component`` is one of the map's ``components`` (e.g. attention, mlp, experts).

    ``axis`` is the tensor axis that spans the model width (0 for a ``[d_model, d_in]``
    Linear weight and for a bias; 1 or 2 for fused ``[E, ...]`` expert tensors).
    A required writer that the checkpoint lacks is an error; an optional one (a bias)
    is simply absent.
    """

    name: str
    component: str
    axis: int = 0
    required: bool = True
    bias: bool = False
    output_norm: OutputNorm | None = None


@runtime_checkable
class Architecture(Protocol):
    """An architecture map, as returned by ``abliterate_architectures()``."""

    name: str
    summary: str  # one line for ``abliterate plugins``
    components: tuple[str, ...]  # the component names its writers carry; plans scale them by name

    def matches(self, config: Config, names: Collection[str]) -> bool:
        """True when this map understands a checkpoint with this config and tensor names."""

    def num_layers(self, config: Config) -> int:
        """Number of decoder layers whose writers this map can name."""

    def hidden_size(self, config: Config) -> int:
        """Width of the residual stream."""

    def residual_writers(self, layer: int, config: Config, names: Collection[str]) -> list[ResidualWriter]:
        """Every residual writer of decoder layer ``layer``."""
