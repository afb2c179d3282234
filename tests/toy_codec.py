"""Test plugin: a third-party codec, int8 weights with one float32 scale per output row.

``NAME.qweight`` (int8) and ``NAME.qscale`` (float32 [rows, 1]) stand for ``NAME.weight``;
loaded with ``-p tests.toy_codec`` like any plugin. It ignores the rounding choice it is
offered, as a codec may.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from rewriter.codec import Packed
from rewriter.hookspecs import hookimpl
from rewriter.io.safetensors_io import TensorEntry
from rewriter.rounding import Rounding


class RowInt8:
    name = "toy-int8"
    summary = "int8 weights, one float32 scale per row (a test plugin)"

    def matches(self, quantization: Mapping[str, Any]) -> bool:
        return quantization.get("quant_method") == "toy-int8"

    def packed(self, quantization: Mapping[str, Any], entries: Mapping[str, TensorEntry]) -> list[Packed]:
        return [Packed(n[: -len("qweight")] + "weight", (n, n[: -len("qweight")] + "qscale"), e.shape)
                for n, e in entries.items() if n.endswith(".qweight")]

    def decode(self, packed: Packed, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return parts[packed.parts[0]].to(torch.float32) * parts[packed.parts[1]]

    def encode(self, packed: Packed, tensor: torch.Tensor, like: Mapping[str, torch.Tensor],
               rounding: Rounding | None = None) -> dict[str, torch.Tensor]:
        scale = (tensor.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-12)
        return {packed.parts[0]: torch.round(tensor / scale).to(torch.int8), packed.parts[1]: scale}


@hookimpl
def abliterate_codecs() -> list[RowInt8]:
    return [RowInt8()]
