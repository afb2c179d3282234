"""What a strategy plugin gives the engine: a direction refinement, weight and bias updates,
and the invariants ``verify`` checks on what they wrote."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .directions import Measurements
    from .engine.edit import TensorEdit, Update

# (measurements, measurement layer, target layer) -> float64 direction in residual space
Refine = Callable[["Measurements", int, int], "torch.Tensor"]
# (edit, source [d_model, columns], written [d_model, columns], relative tolerance), both matrices in the
# compute dtype -> a one-line problem, or None when the written tensor has the property
Invariant = Callable[["TensorEdit", "torch.Tensor", "torch.Tensor", float], "str | None"]


@dataclass(frozen=True)
class Strategy:
    """An edit strategy: how the direction is refined, how weights and biases change, and
    what is true of every tensor it writes (``abliterate verify`` checks ``invariants``)."""

    name: str
    summary: str
    refine: Refine
    update_weight: Update
    update_bias: Update
    invariants: tuple[Invariant, ...] = ()
