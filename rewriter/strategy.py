"""What a strategy plugin gives the engine: a direction refinement and a weight update."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .directions import Measurements

# (measurements, measurement layer, target layer) -> float64 direction in residual space
Refine = Callable[["Measurements", int, int], torch.Tensor]
# (matrix [d_model, columns] in compute dtype, unit direction, scale) -> (new matrix, zeroed columns)
Update = Callable[[torch.Tensor, torch.Tensor, float], "tuple[torch.Tensor, int]"]


@dataclass(frozen=True)
class Strategy:
    """An edit strategy: how the direction is refined, and how weights and biases change."""

    name: str
    summary: str
    refine: Refine
    update_weight: Update
    update_bias: Update
    # Invariants that ``abliterate verify`` checks on the output.
    removes_direction: bool = True  # at scale 1, r^T W' = 0
    preserves_column_norms: bool = False
