"""What an architecture plugin tells the engine: which tensors write into the residual stream."""
from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

Config = Mapping[str, Any]


@dataclass(frozen=True)
class OutputNorm:
    """A norm between a writer and the residual add (Gemma's sandwich norms).

    Its gain is applied as ``offset + g``; removing ``normalize(r * (offset + g))`` from
    the writer's output is what removes ``r`` from what reaches the residual stream.
    ``then`` is a second norm that this one's output (summed with others) goes through
    before the residual add, as in Gemma-4's mixture-of-experts block; the gains multiply.
    """

    name: str
    offset: float = 1.0
    then: OutputNorm | None = None

    def chain(self) -> Iterator[OutputNorm]:
        """This norm and every one after it, innermost first."""
        norm: OutputNorm | None = self
        while norm is not None:
            yield norm
            norm = norm.then


@dataclass(frozen=True)
class ResidualWriter:
    """One tensor that writes into the residual stream.

    ``component`` is one of the map's ``components`` (e.g. attention, mlp, experts).

    ``axis`` is the tensor axis that spans the model width (0 for a ``[d_model, d_in]``
    Linear weight and for a bias; 1 or 2 for fused ``[E, ...]`` expert tensors). A tensor
    of three or more axes whose residual axis is not 0 stacks one matrix per index of
    axis 0 (an expert each), and each is edited on its own, as if stored separately.
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


@runtime_checkable
class DeclaresLayer(Protocol):
    """What a map may add so that nothing in a planned layer goes unexamined.

    The planner requires every tensor under a planned layer's prefix to be a residual
    writer or one of ``non_writers``; anything else is an error naming it. A map without
    these methods gets the prefix its writers' names share and no declared non-writers.
    """

    def layer_prefix(self, layer: int, config: Config, names: Collection[str]) -> str:
        """The name prefix of decoder layer ``layer``'s tensors, e.g. ``model.layers.3``."""

    def non_writers(self, layer: int, config: Config, names: Collection[str]) -> Collection[str]:
        """The tensors of layer ``layer`` (among ``names``) that write nothing into the residual
        stream: read-side projections, norms, routers, SSM state."""
