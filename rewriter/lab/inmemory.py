"""A plan's edits applied to a model loaded in memory, and undone: what a search needs to
score a plan without writing a checkpoint. The edit is the rewrite's own (same planner,
same TensorEdit), computed from the stored dtype and cast back, so a plan scores here as
its rewritten checkpoint would."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..edits import PlannedEdit
from ..errors import AbliterateError
from ..io.checkpoint import Checkpoint
from ..io.safetensors_io import FLOAT_DTYPES
from .models import LoadedModel


class InMemoryEditor:
    """Applies edits to the parameters of ``lm`` and restores them; keeps one original copy
    of each parameter it has ever edited."""

    def __init__(self, lm: LoadedModel, ckpt: Checkpoint) -> None:
        self.params = dict(lm.model.named_parameters())
        self.ckpt = ckpt
        self.saved: dict[str, torch.Tensor] = {}
        self.edited: list[str] = []

    def apply(self, edits: Mapping[str, PlannedEdit]) -> None:
        """Restore, then apply ``edits`` (tensor name -> edit)."""
        self.restore()
        with torch.no_grad():
            for name, edit in edits.items():
                param = self._param(name)
                original = self.saved.setdefault(name, param.detach().clone())
                stored = original.to(FLOAT_DTYPES[self.ckpt.entry(name).dtype])
                edited, _ = edit.apply(stored)
                param.copy_(edited)
                self.edited.append(name)

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
