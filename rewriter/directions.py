"""Direction files: per-layer harmful and harmless means, and the metadata that says how."""
from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from .errors import AbliterateError

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

    def _get(self, means: Mapping[int, torch.Tensor], layer: int) -> torch.Tensor:
        if layer not in means:
            raise AbliterateError(
                f"measurement layer {layer} is not in the direction file (it has layers "
                f"{_ranges(self.layers)})"
            )
        return means[layer]

    def harmful_mean(self, layer: int) -> torch.Tensor:
        return self._get(self.harmful, layer)

    def harmless_mean(self, layer: int) -> torch.Tensor:
        return self._get(self.harmless, layer)

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
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> Measurements:
        """Read this tool's safetensors file, or the reference tool's torch-saved dict."""
        p = Path(path)
        if not p.is_file():
            raise AbliterateError(f"direction file not found: {p}")
        with open(p, "rb") as f:
            magic = f.read(4)
        if zipfile.is_zipfile(p) or magic[:2] == b"\x80\x02":
            return _load_reference(p)
        return _load_native(p)


def _load_native(p: Path) -> Measurements:
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise AbliterateError(f"{p}: not a direction file ({exc})") from None
    if meta.get("format") != FORMAT or not {"layers", "harmful_mean", "harmless_mean"} <= tensors.keys():
        raise AbliterateError(f"{p}: not a direction file (format '{meta.get('format')}', expected '{FORMAT}')")
    layers = [int(n) for n in tensors["layers"].tolist()]
    harmful, harmless = tensors["harmful_mean"], tensors["harmless_mean"]
    if harmful.shape[0] != len(layers) or harmless.shape != harmful.shape:
        raise AbliterateError(f"{p}: layers and means disagree in shape")
    return Measurements(
        {n: harmful[i] for i, n in enumerate(layers)},
        {n: harmless[i] for i, n in enumerate(layers)},
        int(meta.get("harmful_count", 0)),
        int(meta.get("harmless_count", 0)),
        meta,
    )


def _load_reference(p: Path) -> Measurements:
    """The reference tool's file: ``{"layers": L, "harmful_N": t, "harmless_N": t, "refuse_N": t, ...}``."""
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as exc:
        raise AbliterateError(f"{p}: not a direction file ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise AbliterateError(f"{p}: not a direction file (a {type(data).__name__}, expected a dict)")
    harmful = {int(k.split("_", 1)[1]): v for k, v in data.items() if k.startswith("harmful_")}
    harmless = {int(k.split("_", 1)[1]): v for k, v in data.items() if k.startswith("harmless_")}
    if not harmful:
        raise AbliterateError(f"{p}: no harmful_N / harmless_N entries; not a measurement file")
    meta = {"source_format": "llm-abliteration measure.py (torch.save)", "convention": CONVENTION}
    return Measurements(harmful, harmless, metadata=meta)


def _ranges(layers: list[int]) -> str:
    """Compact '0-5, 9' form of a sorted layer list."""
    out: list[str] = []
    for n in layers:
        if out and int(out[-1].split("-")[-1]) == n - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{n}"
        else:
            out.append(str(n))
    return ", ".join(out) or "none"

