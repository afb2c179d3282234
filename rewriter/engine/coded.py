"""The edit of a weight stored as several tensors (a quantized format): decode, edit, encode.

The engine knows no format: it receives, for each stored part of a planned weight, the
same ``CodedEdit``, with the codec's two functions bound to that weight.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, replace

import torch

from ..rounding import Rounding
from .edit import TensorEdit

Decode = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]
DecodeInto = Callable[[Mapping[str, torch.Tensor], torch.Tensor, "Executor | None"], torch.Tensor]
Encode = Callable[[torch.Tensor, Mapping[str, torch.Tensor], "Rounding | None"], "dict[str, torch.Tensor]"]


@dataclass(frozen=True)
class CodedEdit:
    """``edit`` applies to the logical tensor (of ``shape``) that ``decode`` makes of the stored ``parts``.

    A stacked edit (fused experts) goes slice by slice along axis 0 of every part.
    """

    edit: TensorEdit
    parts: tuple[str, ...]
    decode: Decode
    encode: Encode
    shape: tuple[int, ...]
    decode_into: DecodeInto | None = None  # the codec's optional decode into a given buffer

    COPIES = 5  # float32 copies of the logical tensor alive at once (4.7 measured for a block-FP8 down_proj)

    @property
    def working_bytes(self) -> int:
        """Memory one edit of this weight (one slice when stacked) takes: decoded, edited, rounded."""
        return self.COPIES * 4 * math.prod(self.shape) // self.slices(self.shape)

    @property
    def name(self) -> str:
        return self.edit.name

    def slices(self, logical_shape: tuple[int, ...]) -> int:
        return self.edit.slices(logical_shape)

    def piece(self, index: int) -> CodedEdit:
        return replace(self, edit=self.edit.piece(index), shape=self.shape[1:])

    def apply(self, parts: Mapping[str, torch.Tensor], compute: torch.dtype = torch.float32,
              pool: Executor | None = None, workspace: torch.Tensor | None = None,
              decoded: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], int]:
        """The parts re-encoded after the edit, and how many columns had to be zeroed.

        The decoded tensor is edited in place. Rounding keeps the edit's direction out of the
        requantized weight (``rewriter.rounding``): plain rounding to nearest would put back
        about half of what the edit removed. ``pool`` runs the edit's column chunks and the
        rounding's column groups on its threads (the bits do not depend on it). ``workspace``
        holds the edit's working copy, as for ``TensorEdit.apply``: a fresh one for a block-FP8
        ``down_proj`` (235 MB) took 100-150 ms to allocate and fault in, each weight. ``decoded``
        (1-D float32, at least the logical tensor's size) likewise holds the decoded tensor when
        the codec can decode into a buffer (``decode_into``).
        """
        if decoded is not None and self.decode_into is not None:
            logical = self.decode_into(parts, decoded[: math.prod(self.shape)].view(self.shape), pool).to(compute)
        else:
            logical = self.decode(parts).to(compute)
        edited, zeroed = self.edit.apply(logical, compute, in_place=True, workspace=workspace, pool=pool)
        rounding = Rounding(self.edit.direction, self.edit.axis, pool)
        return self.encode(edited.to(torch.float32), parts, rounding), zeroed


@dataclass(frozen=True)
class DecodedTensor:
    """An output tensor made by decoding a quantized weight's ``parts`` to ``dtype`` (a plain
    checkpoint out of a quantized one), edited on the way when ``edit`` is given."""

    parts: tuple[str, ...]
    decode: Decode
    edit: TensorEdit | None
    stacked: bool
    dtype: torch.dtype

    def slices(self, logical_shape: tuple[int, ...]) -> int:
        """Stacked (fused experts): streamed one slice along axis 0 at a time, edited or not."""
        return logical_shape[0] if self.stacked and logical_shape else 1

    def piece(self, index: int) -> DecodedTensor:
        return replace(self, edit=self.edit.piece(index) if self.edit else None, stacked=False)

    def produce(self, parts: Mapping[str, torch.Tensor], compute: torch.dtype = torch.float32) -> torch.Tensor:
        logical = self.decode(parts)
        if self.edit is None or self.edit.scale == 0:
            return logical.to(self.dtype)
        edited, _ = self.edit.apply(logical.to(compute), compute, in_place=True)
        return edited.to(self.dtype)
