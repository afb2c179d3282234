"""What a codec plugin gives the planner and the engine: how a quantized format stores a
weight in several tensors, and how to turn those into a float tensor and back.

A quantized checkpoint stores one logical weight (what a float checkpoint would call
``model.layers.3.mlp.down_proj.weight``) as *parts*: packed values and their scales, under
names of their own. A codec folds the parts into the logical tensor, so that architecture
maps, plans and edits see the same names and shapes as for a float checkpoint; the engine
decodes the parts of each planned tensor to float32, applies the edit, and encodes the
result back into parts of the same names, shapes and dtypes, with freshly computed scales.
Parts of tensors outside the plan are copied byte for byte.

A codec may also have ``decode_into(packed, parts, out, pool=None)``: what ``decode`` returns,
written into ``out`` (float32, contiguous, of the logical shape) and returned; ``pool``, when
given, holds the edit threads, for passes that do not depend on each other (the bits must
not depend on it). The engine then decodes every weight into one reused buffer per thread
instead of a new tensor (a new tensor over 32 MiB is mapped and page-faulted afresh each
time).

Both ``decode`` and ``encode`` must accept any number of leading dimensions, so that a
stacked tensor (fused experts) is handled one slice along axis 0 at a time: slice ``i`` of
every part holds slice ``i`` of the logical tensor.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .io.safetensors_io import TensorEntry
from .lazy import torch
from .rounding import Rounding


@dataclass(frozen=True)
class Packed:
    """One logical tensor stored as ``parts``.

    ``parts``: the stored tensors an edit rewrites, the bulk of the data first.
    ``shape``: the logical shape (what transformers' loader makes of the parts).
    ``attached``: stored tensors that belong to this weight but that editing it leaves
    valid (an activation scale, which describes the layer's input), copied unchanged.
    ``block``: the shape of the codec's quantization block, where the stored shapes do not
    determine it (a partial edge block hides its size).
    """

    name: str
    parts: tuple[str, ...]
    shape: tuple[int, ...]
    attached: tuple[str, ...] = ()
    block: tuple[int, ...] = ()


@runtime_checkable
class Codec(Protocol):
    """A quantized format, recognised by its ``quantization_config``."""

    name: str
    summary: str

    def matches(self, quantization: Mapping[str, Any]) -> bool:
        """Whether this codec reads checkpoints with this ``quantization_config``."""

    def packed(self, quantization: Mapping[str, Any], entries: Mapping[str, TensorEntry]) -> list[Packed]:
        """Every logical tensor stored as parts, from the stored tensors' names, dtypes and shapes.
        Raise AbliterateError for a tensor whose parts do not fit the format."""

    def decode(self, packed: Packed, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The logical tensor (or a slice of it), in float32."""

    def encode(self, packed: Packed, tensor: torch.Tensor, like: Mapping[str, torch.Tensor],
               rounding: Rounding | None = None) -> dict[str, torch.Tensor]:
        """``tensor`` (float32, logical) as parts of the shapes and dtypes of ``like``, with new scales.

        ``rounding``, when given, chooses the values at indices ``rounding.rows`` along
        ``rounding.axis`` (``rewriter.rounding``), once the scales are set from ``tensor``: the
        codec rounds every element to nearest, computes the grid neighbour on the other side
        of the wanted value for those elements only, and stores exactly the values that
        ``rounding.choose(tensor, nearest, other)`` returns for them.
        """
