"""Direction files: per-layer harmful and harmless means, and the metadata that says how."""
from __future__ import annotations

import hashlib
import io
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from . import __version__
from .errors import AbliterateError
from .io.files import write_atomic
from .io.safetensors_io import parse_header, serialize

FORMAT = "abliterate-directions/1"
CONVENTION = (
    "N indexes hidden_states[N] as transformers returns it with output_hidden_states=True: "
    "N=0 is the embedding output, N=k the residual stream entering decoder layer k; "
    "taken at the last prompt token"
)


@dataclass(frozen=True)
class Reference:
    """What only a reference file holds, per layer, float64: ``refuse_N`` (the difference of the
    means, taken before they were rounded) and ``refusenorm_N`` (that difference normalized,
    and projected against the harmless mean when measure.py ran with ``--projected``)."""

    differences: dict[int, torch.Tensor]
    units: dict[int, torch.Tensor]
    projected: bool | None  # measured with --projected; None where no layer tells (all zero)
    dtype: str  # the dtype the vectors were stored in (the model's)


@dataclass
class Measurements:
    """Means of residual activations per measurement layer, kept in float64."""

    harmful: dict[int, torch.Tensor]
    harmless: dict[int, torch.Tensor]
    harmful_count: int = 0
    harmless_count: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    sha256: str = ""  # of the file it was read from
    reference: Reference | None = None  # set for a file the reference tool's measure.py wrote
    ensemble: bool = False  # measured directions are the mean of three neighbours' (see ``ensembled``)

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
        """The refusal direction r_N = harmful_mean[N] - harmless_mean[N], float64.

        For a reference file, its own ``refuse_N``: the same difference, taken in float64
        before the means were rounded to the model dtype, so it does not suffer the
        cancellation a difference of the rounded means would."""
        if self.reference is not None:
            self._get("harmful", self.harmful, layer)
            return self.reference.differences[layer]
        return self.harmful_mean(layer) - self.harmless_mean(layer)

    def measured_direction(self, layer: int) -> torch.Tensor:
        """The direction a strategy starts from (float64): ``direction(N)``; for a reference file the
        unit ``refusenorm_N`` exactly as its measure.py wrote it (projected against the harmless
        mean there when measured with ``--projected``), as the reference tool's ablation uses it;
        with ``ensemble``, normalize(n(d_{N-1}) + n(d_N) + n(d_{N+1})) of those."""
        if not self.ensemble:
            return self._measured(layer)
        missing = [n for n in (layer - 1, layer + 1) if n not in self.harmful]
        if missing:
            raise AbliterateError(f"the layer ensemble of measurement {layer} needs its neighbours {layer - 1} and "
                                  f"{layer + 1}; the direction file has measurements {_ranges(self.layers)}")
        total = sum(_normalized(self._measured(n), f"measurement {n}") for n in (layer - 1, layer, layer + 1))
        return _normalized(total, f"the ensemble of measurement {layer}")

    def _measured(self, layer: int) -> torch.Tensor:
        """One layer's measured direction, without the ensemble."""
        if self.reference is None:
            return self.direction(layer)
        self._get("harmful", self.harmful, layer)
        return _normalized(self.reference.units[layer], f"refusenorm_{layer}")

    def ensembled(self) -> Measurements:
        """These measurements with every measured direction replaced by its three-layer ensemble
        (the reference tool's ``--layerensemble``)."""
        return replace(self, ensemble=True)

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
        write_atomic(Path(path), serialize(tensors, meta))

    @classmethod
    def load(cls, path: str | Path) -> Measurements:
        """Read this tool's safetensors file, or the reference tool's torch-saved dict (read once, hashed)."""
        p = Path(path)
        if not p.is_file():
            raise AbliterateError(f"direction file not found: {p}")
        data = p.read_bytes()
        # a safetensors header opens with its length, then '{': that length may itself begin with the
        # bytes of a pickle's protocol mark (0x80 0x02 is a 640-byte header), so look at the '{' first
        safetensors = data[8:9] == b"{" and int.from_bytes(data[:8], "little") <= len(data) - 8
        if not safetensors and (data[:2] == b"\x80\x02" or zipfile.is_zipfile(io.BytesIO(data))):
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
    if meta.get("format") != FORMAT:
        raise AbliterateError(f"{p}: not a direction file (format {_short(repr(meta.get('format')))}, expected '{FORMAT}')")
    missing = [k for k in ("layers", "harmful_mean", "harmless_mean") if k not in tensors]
    if missing:
        raise AbliterateError(f"{p}: the direction file lacks the tensor{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
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


MAX_COUNT_DIGITS = 18  # a prompt count is a small number; a longer one is hostile, not a count


def _count(meta: Mapping[str, str], key: str, p: Path) -> int:
    value = meta.get(key, "0")
    if not (value.isascii() and value.isdigit() and len(value) <= MAX_COUNT_DIGITS):
        raise AbliterateError(f"{p}: metadata {key} is {_short(value)}, not a number of prompts")
    return int(value)


def _short(value: str, limit: int = 40) -> str:
    """``value`` quoted, cut to ``limit`` characters: a hostile value keeps an error message short."""
    return repr(value[:limit]) + (f" ({len(value):,} characters)" if len(value) > limit else "")


# Every key the reference tool's measure.py writes: layers, and per layer N harmful_N and
# harmless_N (the means), refuse_N (their difference) and refusenorm_N (its unit vector).
_REFERENCE_KEY = re.compile(r"^(harmful|harmless|refuse|refusenorm)_(\d+)$")
_REFERENCE_KEYS = "layers, harmful_N, harmless_N, refuse_N, refusenorm_N"
# |cos(refusenorm_N, harmless_N)| below this at every layer means measure.py --projected: what
# rounding the unit vector to bf16 leaves is about 1e-4; an unprojected direction is far from it
_PROJECTED_COS = 3e-3


def _load_reference(p: Path, data: bytes) -> Measurements:
    """The reference tool's file (torch.save of a dict, every vector in the model's dtype)."""
    try:
        doc = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise AbliterateError(f"{p}: refused: it holds Python objects that would run code when loaded; a "
                              "measurement file holds only tensors") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise AbliterateError(f"{p}: not a direction file ({_short(str(exc).splitlines()[0] if str(exc) else '', 120)})") from None
    if not isinstance(doc, dict):
        raise AbliterateError(f"{p}: not a direction file (a {type(doc).__name__}, expected a dict)")
    parts: dict[str, dict[int, torch.Tensor]] = {"harmful": {}, "harmless": {}, "refuse": {}, "refusenorm": {}}
    for key, value in doc.items():
        m = _REFERENCE_KEY.match(key) if isinstance(key, str) else None
        if key == "layers":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < MAX_REFERENCE_LAYERS:
                raise AbliterateError(f"{p}: 'layers' must be the model's number of layers, found {_short(repr(value))}")
            continue
        if m is None:
            raise AbliterateError(f"{p}: unexpected key {_short(key) if isinstance(key, str) else _short(repr(key))} "
                                  f"(expected {_REFERENCE_KEYS})")
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dim() != 1:
            raise AbliterateError(f"{p}: {key} is not a 1-D float tensor")
        parts[m[1]][int(m[2])] = value
    if not parts["harmful"]:
        raise AbliterateError(f"{p}: no harmful_N / harmless_N entries; not a measurement file")
    for kind in ("refuse", "refusenorm"):
        if parts[kind] and set(parts[kind]) != set(parts["harmful"]):
            raise AbliterateError(f"{p}: {kind}_N and harmful_N cover different layers")
    dtype = str(next(iter(parts["harmful"].values())).dtype).removeprefix("torch.")
    meta = {"source_format": "llm-abliteration measure.py (torch.save)", "convention": CONVENTION, "dtype": dtype}
    m = Measurements(parts["harmful"], parts["harmless"], metadata=meta)
    if parts["refusenorm"]:
        differences = ({n: t.to(torch.float64) for n, t in parts["refuse"].items()} if parts["refuse"]
                       else {n: m.harmful[n] - m.harmless[n] for n in m.layers})
        units = {n: t.to(torch.float64) for n, t in parts["refusenorm"].items()}
        for n, t in (*differences.items(), *units.items()):
            if t.shape != (m.width,) or not torch.isfinite(t).all():
                raise AbliterateError(f"{p}: the direction of layer {n} has the wrong width or NaN/inf values")
        projected = _measured_projected(units, m.harmless)
        meta["refusenorm"] = {True: "projected at measurement (measure.py --projected)", False: "plain",
                              None: "all zero"}[projected]
        m = replace(m, reference=Reference(differences, units, projected, dtype))
    return m


MAX_REFERENCE_LAYERS = 100_000


def _measured_projected(units: Mapping[int, torch.Tensor], harmless: Mapping[int, torch.Tensor]) -> bool | None:
    cosines = [float(u @ harmless[n]) / float(u.norm() * harmless[n].norm())
               for n, u in units.items() if u.any() and harmless[n].any()]
    return None if not cosines else max(abs(c) for c in cosines) < _PROJECTED_COS


def _normalized(v: torch.Tensor, what: str) -> torch.Tensor:
    norm = torch.linalg.vector_norm(v)
    if not norm > 0:
        raise AbliterateError(f"direction data: {what} is zero")
    return v / norm


def _ranges(layers: list[int]) -> str:
    """Compact '0-5, 9' form of a sorted layer list."""
    out: list[str] = []
    for n in layers:
        if out and int(out[-1].split("-")[-1]) == n - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{n}"
        else:
            out.append(str(n))
    return ", ".join(out) or "none"

