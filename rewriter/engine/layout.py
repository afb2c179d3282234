"""An output shard laid out differently from its source shard (a quantized checkpoint written
out dequantized): its own header, and which of its tensors are made rather than copied."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..io.checkpoint import Shard
from ..io.safetensors_io import Header
from .coded import DecodedTensor


@dataclass(frozen=True)
class ShardLayout:
    """``header`` of the output shard; ``made``: its tensors decoded from source parts (every
    other tensor is the source shard's tensor of the same name, copied or edited)."""

    header: Header
    made: Mapping[str, DecodedTensor]


@dataclass(frozen=True)
class Reshape:
    """How the output differs from the source's layout: shards by name, and files whose new
    contents replace the source's (a config without its quantization, a new index)."""

    shards: Mapping[str, ShardLayout]
    files: Mapping[str, bytes]

    def size(self, shard: Shard) -> int:
        """The output size of ``shard``."""
        layout = self.shards.get(shard.name)
        return layout.header.file_size if layout else shard.header.file_size
