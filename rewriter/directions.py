"""Direction files: per-layer harmful and harmless means, and the metadata that says how."""
from __future__ import annotations

import hashlib
import io
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from . import __version__
from .errors import AbliterateError
from .io.files import write_atomic
from .io.safetensors_io import parse_header

FORMAT = "abliterate-directions/1"
CONVENTION = (
    "N indexes hidden_states[N] as transformers returns it with output_hidden_states=True: "
    "N=0 is the embedding output, N=k the residual stream entering decoder layer k; "
    "taken at the last prompt token"
)


@dataclass
class Measurements:
    """Means of residual activations per measurement layer, kept in float64."""

    harmful: dict[int, torch.Tensor]
    harmless: dict[int, torch.Tensor]
    harmful_count: int = 0
    harmless_count: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    sha256: str = ""  # of the file it was read from

    def __post_init__(self) -> None:
        if not self.harmful or set(self.harmful) != set(self.harmless):
            raise AbliterateError("direction data must hold harmful and harmless means for the same layers")
        widths = {t.shape for t in [*self.harmful.values(), *self.harmless.values()]}
        if len(widths) != 1 or len(next(iter(widths))) != 1:
            raise AbliterateError(f"direction data holds means of different shapes: {sorted(widths)}")
        for kind, means in (("harmful", self.harmful), ("harmless", self.harmless)):
            for layer, t in means.items():
                means[layer] = t.to(torch.float64)
                if not torch.isfinite(means[layer]).all():
                    raise AbliterateError(f"direction data: {kind} mean of layer {layer} has NaN or inf values")


    @property
    def layers(self) -> list[int]:
        return sorted(self.harmful)

    @property
    def width(self) -> int:
        return next(iter(self.harmful.values())).shape[0]

    def _get(self, kind: str, means: Mapping[int, torch.Tensor], layer: int) -> torch.Tensor:
        if layer not in means:
            raise AbliterateError(
                f"measurement layer {layer} is not in the direction file (it has layers "
                f"{_ranges(self.layers)})"
            )
        if not means[layer].any():
            raise AbliterateError(f"direction data: the {kind} mean of layer {layer} is zero")
        return means[layer]

    def harmful_mean(self, layer: int) -> torch.Tensor:
        return self._get("harmful", self.harmful, layer)

    def harmless_mean(self, layer: int) -> torch.Tensor:
        return self._get("harmless", self.harmless, layer)

    def direction(self, layer: int) -> torch.Tensor:
        """The refusal direction r_N = harmful_mean[N] - harmless_mean[N], float64."""
        return self.harmful_mean(layer) - self.harmless_mean(layer)

    def save(self, path: str | Path) -> None:
        layers = self.layers
        tensors = {
            "layers": torch.tensor(layers, dtype=torch.int64),
            "harmful_mean": torch.stack([self.harmful[n] for n in layers]),
            "harmless_mean": torch.stack([self.harmless[n] for n in layers]),
        }
        meta = {
            **self.metadata,
            "format": FORMAT,
            "convention": CONVENTION,
            "harmful_count": str(self.harmful_count),
            "harmless_count": str(self.harmless_count),
        }
        meta.setdefault("tool_version", __version__)
        write_atomic(Path(path), save_safetensors(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> Measurements:
        """Read this tool's safetensors file, or the reference tool's torch-saved dict (read once, hashed)."""
        p = Path(path)
        if not p.is_file():
            raise AbliterateError(f"direction file not found: {p}")
        data = p.read_bytes()
        if data[:2] == b"\x80\x02" or zipfile.is_zipfile(io.BytesIO(data)):
            m = _load_reference(p, data)
        else:
            m = _load_native(p, data)
        m.sha256 = hashlib.sha256(data).hexdigest()
        return m


def _load_native(p: Path, data: bytes) -> Measurements:
    try:
        meta = parse_header(data, len(data), p).metadata
    except AbliterateError as exc:
        raise AbliterateError(f"{p}: not a direction file ({str(exc).removeprefix(f'{p}: ')})") from None
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError) as exc:
        raise AbliterateError(f"{p}: not a direction file ({exc})") from None
    if meta.get("format") != FORMAT or not {"layers", "harmful_mean", "harmless_mean"} <= tensors.keys():
        raise AbliterateError(f"{p}: not a direction file (format '{meta.get('format')}', expected '{FORMAT}')")
    layers_t, harmful, harmless = tensors["layers"], tensors["harmful_mean"], tensors["harmless_mean"]
    if layers_t.dtype != torch.int64 or layers_t.dim() != 1:
        raise AbliterateError(f"{p}: 'layers' must be a 1-D int64 tensor, found {layers_t.dtype} {list(layers_t.shape)}")
    layers = [int(n) for n in layers_t.tolist()]
    if len(set(layers)) != len(layers) or min(layers, default=0) < 0:
        raise AbliterateError(f"{p}: 'layers' must list distinct non-negative layer numbers, found {layers[:16]}")
    if harmful.dim() != 2 or harmful.shape[0] != len(layers) or harmless.shape != harmful.shape:
        raise AbliterateError(f"{p}: layers and means disagree in shape")
    if not harmful.is_floating_point() or not harmless.is_floating_point():
        raise AbliterateError(f"{p}: the means must be float tensors")
    return Measurements(
        {n: harmful[i] for i, n in enumerate(layers)},
        {n: harmless[i] for i, n in enumerate(layers)},
        _count(meta, "harmful_count", p),
        _count(meta, "harmless_count", p),
        meta,
    )


def _count(meta: Mapping[str, str], key: str, p: Path) -> int:
    value = meta.get(key, "0")
    if not value.isdigit():
        raise AbliterateError(f"{p}: metadata {key} is {value!r}, not a number of prompts")
    return int(value)


_REFERENCE_KEY = re.compile(r"^(harmful|harmless|refuse)_(\d+)$")


def _load_reference(p: Path, data: bytes) -> Measurements:
    """The reference tool's file: ``{"layers": L, "harmful_N": t, "harmless_N": t, "refuse_N": t, ...}``."""
    try:
        doc = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise AbliterateError(f"{p}: not a direction file ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise AbliterateError(f"{p}: not a direction file (a {type(doc).__name__}, expected a dict)")
    means: dict[str, dict[int, torch.Tensor]] = {"harmful": {}, "harmless": {}}
    for key, value in doc.items():
        if key == "layers":
            continue
        m = _REFERENCE_KEY.match(key) if isinstance(key, str) else None
        if m is None:
            raise AbliterateError(f"{p}: unexpected key {key!r} (expected layers, harmful_N, harmless_N, refuse_N)")
        if m[1] in means:
            if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() != 1:
                raise AbliterateError(f"{p}: {key} is not a 1-D float tensor")
            means[m[1]][int(m[2])] = value
    if not means["harmful"]:
        raise AbliterateError(f"{p}: no harmful_N / harmless_N entries; not a measurement file")
    meta = {"source_format": "llm-abliteration measure.py (torch.save)", "convention": CONVENTION}
    return Measurements(means["harmful"], means["harmless"], metadata=meta)


def _ranges(layers: list[int]) -> str:
    """Compact '0-5, 9' form of a sorted layer list."""
    out: list[str] = []
    for n in layers:
        if out and int(out[-1].split("-")[-1]) == n - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{n}"
        else:
            out.append(str(n))
    return ", ".join(out) or "none"

