"""The checkpoint's tensors as the model sees them: a quantized weight's parts folded into one.

For a float checkpoint this is the stored names. For a quantized one, the codec that
reads its ``quantization_config`` says which stored tensors (packed values, scales) make
up each logical weight; maps, plans and edits then use the logical names and shapes,
exactly as for the same model in float.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from .codec import Codec, Packed
from .errors import AbliterateError
from .io.checkpoint import Checkpoint, quant_method
from .registry import Registry

if TYPE_CHECKING:
    from .engine.coded import CodedEdit
    from .engine.edit import TensorEdit


@dataclass(frozen=True)
class LogicalTensors:
    names: frozenset[str]
    packed: dict[str, Packed]  # logical name -> its stored parts
    codec: Codec | None

    @classmethod
    def of(cls, ckpt: Checkpoint, registry: Registry) -> LogicalTensors:
        """Identity for a float checkpoint; else the codec's view, every part checked to exist once."""
        quant = ckpt.quantization()
        if quant is None:
            return cls(ckpt.names, {}, None)
        codec = registry.codec_for(quant)
        entries = {n: ckpt.entry(n) for n in sorted(ckpt.names)}  # sorted: the same first error every run
        packed: dict[str, Packed] = {}
        owner: dict[str, str] = {}
        for p in codec.packed(quant, entries):
            for part in (*p.parts, *p.attached):
                if part not in entries:
                    raise AbliterateError(f"codec {codec.name}: {p.name} is stored in '{part}', which no shard holds")
                if part in owner:
                    raise AbliterateError(f"codec {codec.name}: '{part}' is a part of both {owner[part]} and {p.name}")
                owner[part] = p.name
            if p.name in entries and p.name not in owner:
                raise AbliterateError(f"codec {codec.name}: {p.name} is both stored as such and packed in "
                                      f"{', '.join(p.parts)}")
            packed[p.name] = p
        if not packed:
            raise AbliterateError(f"{ckpt.root}: config.json declares quant_method '{quant_method(quant)}' but no "
                                  f"tensor is stored in that format ({codec.name}): the weights do not match the "
                                  "declared format; remove quantization_config if the weights are plain floats")
        return cls(frozenset((ckpt.names - owner.keys()) | packed.keys()), packed, codec)

    @classmethod
    def floats(cls, ckpt: Checkpoint) -> LogicalTensors:
        """The stored names, for work that reads float weights only (a quantized checkpoint is refused)."""
        if quant := ckpt.quantization():
            raise AbliterateError(f"{ckpt.root}: quantized checkpoint (quant_method '{quant_method(quant)}'); "
                                  "only float weights can be read here")
        return cls(ckpt.names, {}, None)

    def shape(self, ckpt: Checkpoint, name: str) -> tuple[int, ...]:
        return self.packed[name].shape if name in self.packed else ckpt.entry(name).shape

    def stacked(self, ckpt: Checkpoint, name: str) -> bool:
        """Whether a packed weight can be decoded one slice along axis 0 at a time (fused experts):
        every part holds the same slices along axis 0 as the logical tensor."""
        packed = self.packed[name]
        return len(packed.shape) >= 3 and all(ckpt.entry(p).shape[:1] == packed.shape[:1] for p in packed.parts)

    def coded(self, name: str, edit: TensorEdit) -> CodedEdit:
        """The edit of a packed weight as the engine applies it: decode, edit, re-encode."""
        from .engine.coded import CodedEdit  # torch: imported where an edit is made, not to read names

        packed = self.packed[name]
        assert self.codec is not None
        into = getattr(self.codec, "decode_into", None)  # optional: see rewriter.codec
        return CodedEdit(edit, packed.parts, partial(self.codec.decode, packed), partial(self.codec.encode, packed),
                         packed.shape, partial(into, packed) if into is not None else None)
