"""A plan's edits applied to a model loaded in memory, and undone: what a search needs to
score a plan without writing a checkpoint. The edit is the rewrite's own (same planner,
same TensorEdit), computed from the stored dtype and cast back, so a plan scores here as
its rewritten checkpoint would. A quantized weight goes the rewrite's way too: its stored
parts decoded, edited, re-encoded with the rounding that keeps the direction out, and
decoded again into the model."""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from ..dtypes import FLOAT_DTYPES
from ..edits import PlannedEdit
from ..errors import AbliterateError
from ..io.checkpoint import Checkpoint
from .models import LoadedModel
from .weights import WeightReader

if TYPE_CHECKING:
    from ..registry import Registry


class InMemoryEditor:
    """Applies edits to the parameters of ``lm`` and restores them; keeps one original copy
    of each parameter it has ever edited (and, for a quantized weight, its stored parts)."""

    def __init__(self, lm: LoadedModel, ckpt: Checkpoint, registry: Registry | None = None) -> None:
        from .streamed import logical_view

        self.params = dict(lm.model.named_parameters())
        self.ckpt, self.view = ckpt, logical_view(ckpt, registry)
        self.saved: dict[str, torch.Tensor] = {}
        self.parts: dict[str, dict[str, torch.Tensor]] = {}
        self.edited: list[str] = []

    def apply(self, edits: Mapping[str, PlannedEdit]) -> None:
        """Restore, then apply ``edits`` (tensor name -> edit)."""
        self.restore()
        with torch.no_grad():
            for name, edit in edits.items():
                param = self._param(name)
                original = self.saved.setdefault(name, param.detach().clone())
                if name in self.view.packed:
                    param.copy_(self._requantized(name, edit))
                else:
                    param.copy_(edit.apply(original.to(FLOAT_DTYPES[self.ckpt.entry(name).dtype]))[0])
                self.edited.append(name)

    def _requantized(self, name: str, edit: PlannedEdit) -> torch.Tensor:
        """The weight as the rewrite stores it: its parts through the codec edit, decoded (fused experts
        slice by slice, as the engine goes)."""
        if name not in self.parts:
            reader = WeightReader(self.ckpt, self.view)
            try:
                self.parts[name] = reader.parts(name)
            finally:
                reader.close()
        parts, coded = self.parts[name], self.view.coded(name, edit)
        pieces = coded.slices(coded.shape)
        if pieces == 1:
            return coded.decode(coded.apply(parts)[0])
        return torch.stack([piece.decode(piece.apply({p: t[i] for p, t in parts.items()})[0])
                            for i in range(pieces) for piece in [coded.piece(i)]])

    def restore(self) -> None:
        with torch.no_grad():
            for name in self.edited:
                self.params[name].copy_(self.saved[name])
        self.edited = []

    def _param(self, name: str) -> torch.nn.Parameter:
        if name not in self.params:
            raise AbliterateError(f"{name}: no parameter of that name in the loaded model; "
                                  "cannot edit it in memory (the rewrite itself does not need this)")
        return self.params[name]
