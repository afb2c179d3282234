"""The engine's edit type: remove one unit direction from one tensor along one axis.

All the engine needs to edit a tensor; where the direction and scale came from (plans,
layers, components) is the planner's business (``rewriter.edits``).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, replace

import torch

from ..errors import AbliterateError
from .threads import run_each

# (matrix [d_model, columns] in the compute dtype, unit direction, scale) -> (new matrix, zeroed columns);
# it may work in place. Each column is edited on its own: the engine hands an update chunks of
# COLUMNS columns, possibly on several threads at once.
Update = Callable[[torch.Tensor, torch.Tensor, float], "tuple[torch.Tensor, int]"]

COLUMNS = 2048  # columns per chunk: the unit of work that edit threads share


@dataclass(frozen=True)
class TensorEdit:
    """Remove ``direction`` (unit, float64) along ``axis`` of tensor ``name`` at ``scale`` with ``update``.

    ``stacked``: axis 0 indexes independent matrices (fused experts), each edited on its own
    exactly as the same matrix stored alone would be. So the engine may read, edit and
    write one slice at a time, and memory is bounded by a slice, not by the tensor.
    """

    name: str
    axis: int
    scale: float
    direction: torch.Tensor
    update: Update
    stacked: bool = False

    def slices(self, shape: tuple[int, ...]) -> int:
        """How many pieces along axis 0 a tensor of ``shape`` is edited in (1 unless stacked)."""
        return shape[0] if self.stacked and shape else 1

    def piece(self, index: int) -> TensorEdit:
        """The edit of slice ``index`` of a stacked tensor (named ``name[index]`` in errors)."""
        return replace(self, name=f"{self.name}[{index}]", axis=self.axis - 1, stacked=False)

    def apply(self, tensor: torch.Tensor, compute: torch.dtype = torch.float32, *, in_place: bool = False,
              workspace: torch.Tensor | None = None, pool: Executor | None = None) -> tuple[torch.Tensor, int]:
        """The edited tensor in its stored dtype, and how many columns had to be zeroed.

        ``in_place`` writes the result into ``tensor`` itself (the engine owns that buffer,
        which saves a stored-size copy). ``workspace`` (1-D, ``compute`` dtype, at least
        ``tensor.numel()`` long) holds the working copy: reused across edits it saves
        allocating, and page-faulting, a tensor-sized buffer each time, which costs more
        than the edit math (180 ms against 22 ms for the conversion of a [3840, 15360]
        bf16 tensor into float32 here). ``pool`` runs the column chunks on its threads.
        """
        if self.scale == 0:
            return tensor, 0
        if self.stacked:
            return self._apply_stacked(tensor, compute, in_place, workspace, pool)
        out = tensor if in_place else torch.empty(tensor.shape, dtype=tensor.dtype)
        # [d_model, ..., columns]; a vector (a bias) is one column
        moved, target = (t.movedim(self.axis, 0) if t.dim() > 1 else t.unsqueeze(1) for t in (tensor, out))
        room = workspace if workspace is not None else torch.empty(tensor.numel(), dtype=compute)
        direction = self.direction.to(compute)
        per_column = tensor.numel() // moved.shape[-1]

        # the direction's axis is the tensor's last (fused experts): each column lies contiguous in
        # memory, so the working copy keeps that layout (a transposing copy made such an edit 3-6x
        # slower) and the update gets its [d_model, columns] view
        across = moved.dim() == 2 and moved.shape[0] > 1 and moved.stride(0) == 1

        def edit_chunk(columns: slice) -> int:
            # each chunk has a contiguous working copy of its own: an update on a strided view
            # of a whole working copy ran 1.5x slower
            src = moved[..., columns]
            offset = per_column * columns.start
            flat = room[offset : offset + src.numel()]
            work = flat.view(src.shape[::-1]).copy_(src.T).T if across else flat.view(src.shape).copy_(src)
            if not math.isfinite(float(work.sum())):  # one pass, no allocation: finite but for extreme values
                _refuse_nonfinite(self.name, tensor)
            edited, zeroed = self.update(work.reshape(src.shape[0], -1), direction, self.scale)
            target[..., columns].copy_(edited.reshape(src.shape))
            return zeroed

        return out, sum(run_each(pool, edit_chunk, column_chunks(moved.shape[-1])))

    def _apply_stacked(self, tensor: torch.Tensor, compute: torch.dtype, in_place: bool,
                       workspace: torch.Tensor | None, pool: Executor | None) -> tuple[torch.Tensor, int]:
        """Slice by slice, as the engine streams it, so that both compute the same bits."""
        out = tensor if in_place else torch.empty_like(tensor)
        zeroed = 0
        for i in range(tensor.shape[0]):
            edited, z = self.piece(i).apply(tensor[i], compute, in_place=in_place, workspace=workspace, pool=pool)
            if not in_place:
                out[i].copy_(edited)
            zeroed += z
        return out, zeroed


def column_chunks(columns: int) -> list[slice]:
    """The pieces an edit's columns are worked in: fixed by the width alone, so that the bits
    never depend on how many threads ran them (``verify`` recomputes on one)."""
    return [slice(start, min(start + COLUMNS, columns)) for start in range(0, columns, COLUMNS)]


def _refuse_nonfinite(name: str, stored: torch.Tensor) -> None:
    """One NaN or inf in a weight would spread to its whole column: refuse, with the count
    (over the whole stored tensor; a sum that overflowed on finite values is no error)."""
    bad = int((~torch.isfinite(stored)).sum())
    if bad:
        raise AbliterateError(f"{name}: {bad} NaN or inf values in the stored weight; refusing to edit it")
