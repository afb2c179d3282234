"""The parts a decoder layer is built from, as a map names them: Linear writers, routed
experts (per expert or fused), and the tensors declared to write nothing.

Names are relative to the layer (``self_attn.o_proj``); in a pattern, ``*`` stands for
one dotted segment (an expert's index), so a pattern never reaches into another module.
"""
from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Protocol

from rewriter.architecture import Config, OutputNorm, ResidualWriter
from rewriter.errors import AbliterateError

# Where configs keep the number of routed experts, by model family.
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


class Block(Protocol):
    """One alternative for a part of a layer (its mixer, its feed-forward, ...).

    ``reads``: patterns of its tensors that write nothing; its ``norms`` (output norms,
    innermost first) write nothing either and need not be repeated there.
    """

    component: str
    norms: tuple[str, ...]
    reads: tuple[str, ...]

    def present(self, base: str, names: Collection[str]) -> bool:
        """True when the checkpoint holds this block in the layer named ``base``."""

    def writers(self, base: str, config: Config, names: Collection[str], offset: float) -> list[ResidualWriter]:
        """Its residual writers; ``offset`` is the map's norm gain offset."""


def output_norm(base: str, norms: tuple[str, ...], offset: float) -> OutputNorm | None:
    """The chain of norms named ``norms`` (innermost first) in layer ``base``, or None."""
    chain = None
    for norm in reversed(norms):
        chain = OutputNorm(f"{base}.{norm}.weight", offset, then=chain)
    return chain


@dataclass(frozen=True)
class Linear:
    """A Linear writer ``{module}.weight`` and its ``{module}.bias`` where the checkpoint has one.

    ``norms``: the norms between it and the residual add, innermost first.
    ``reads``: patterns of the tensors that come with it and write nothing (q/k/v projections).
    """

    module: str
    component: str
    norms: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    # A layer-relative tensor that must be present too: selects a variant of the layer
    # (Gemma-4's MLP has one more norm after it in layers with experts).
    when: str | None = None

    def present(self, base: str, names: Collection[str]) -> bool:
        return f"{base}.{self.module}.weight" in names and (self.when is None or f"{base}.{self.when}" in names)

    def writers(self, base: str, config: Config, names: Collection[str], offset: float) -> list[ResidualWriter]:
        norm = output_norm(base, self.norms, offset)
        name = f"{base}.{self.module}"
        return [ResidualWriter(f"{name}.weight", self.component, output_norm=norm),
                ResidualWriter(f"{name}.bias", self.component, required=False, bias=True, output_norm=norm)]


@dataclass(frozen=True)
class Experts:
    """Routed experts, in either layout a checkpoint may use.

    Per expert, as most Hub checkpoints store them: ``{module}.{e}.{per_expert}.weight``
    (each a Linear weight, residual axis 0) for every ``e`` the config counts. Fused, as
    transformers holds them: one ``{module}.{fused}`` tensor ``[E, ...]`` whose residual
    axis is ``axis`` (declared, never guessed: ``[E, d_model, d_ff]`` is 1, ``[E, d_ff,
    d_model]`` is 2), with its bias ``{module}.{fused_bias}`` ``[E, d_model]`` if any.
    """

    module: str = "mlp.experts"
    per_expert: str = "down_proj"
    fused: str = "down_proj"
    axis: int = 1
    fused_bias: str | None = None
    component: str = "experts"
    norms: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()

    def present(self, base: str, names: Collection[str]) -> bool:
        head = f"{base}.{self.module}"
        return f"{head}.{self.fused}" in names or f"{head}.0.{self.per_expert}.weight" in names

    def writers(self, base: str, config: Config, names: Collection[str], offset: float) -> list[ResidualWriter]:
        norm = output_norm(base, self.norms, offset)
        head = f"{base}.{self.module}"
        if f"{head}.{self.fused}" in names:
            fused = [ResidualWriter(f"{head}.{self.fused}", self.component, axis=self.axis, output_norm=norm)]
            if self.fused_bias:
                fused.append(ResidualWriter(f"{head}.{self.fused_bias}", self.component, axis=1, required=False,
                                            bias=True, output_norm=norm))
            return fused
        out = []
        for e in range(expert_count(config)):
            name = f"{head}.{e}.{self.per_expert}"
            out.append(ResidualWriter(f"{name}.weight", self.component, output_norm=norm))
            out.append(ResidualWriter(f"{name}.bias", self.component, required=False, bias=True, output_norm=norm))
        return out


def expert_count(config: Config) -> int:
    for key in EXPERT_COUNT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise AbliterateError(f"config.json has no expert count ({', '.join(EXPERT_COUNT_KEYS)}) for a layer with "
                          "per-expert tensors")


@dataclass(frozen=True)
class Slot:
    """A part of the layer and the blocks that may fill it; the first one present is used.

    A layer without any of them is an error (the first block's writers are reported
    missing) unless the slot is ``optional``.
    """

    blocks: tuple[Block, ...]
    optional: bool = False

    def choose(self, base: str, names: Collection[str]) -> Block | None:
        for block in self.blocks:
            if block.present(base, names):
                return block
        return None if self.optional else self.blocks[0]


def slot(*blocks: Block, optional: bool = False) -> Slot:
    return Slot(tuple(blocks), optional)


def matcher(patterns: Collection[str]) -> re.Pattern[str]:
    """One regex for layer-relative patterns; ``*`` matches one dotted segment."""
    alternatives = (re.escape(p).replace(r"\*", r"[^.]+") for p in sorted(set(patterns)))
    return re.compile("(?:" + "|".join(alternatives) + ")")


def positive_int(config: Config, key: str, arch: str) -> int:
    if not isinstance(config, Mapping) or key not in config:
        raise AbliterateError(f"config.json has no '{key}' for architecture {arch}")
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AbliterateError(f"config.json: '{key}' is {value!r}; expected a positive integer")
    return value
