"""Plans: which decoder layers are edited, with which measurement's direction, how strongly."""
from __future__ import annotations

import os
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import AbliterateError
from .io.files import write_atomic

MAX_LAYERS = 100_000  # more decoder layers than any model has: a bound before ranges are expanded
TOP_LEVEL_KEYS = ("model", "measurements", "output", "scale", "ablate")
ENTRY_KEYS = ("layer", "measurement", "scale", "sparsity", "components")


@dataclass(frozen=True)
class PlanEntry:
    layer: int
    measurement: int
    scale: float = 1.0
    components: Mapping[str, float] = field(default_factory=dict)

    def scale_for(self, component: str) -> float:
        """Entry scale times the component's own scale (1.0 when not given)."""
        return self.scale * self.components.get(component, 1.0)


@dataclass(frozen=True)
class Plan:
    entries: tuple[PlanEntry, ...]
    model: str | None = None
    measurements: str | None = None
    output: str | None = None

    def __post_init__(self) -> None:
        if not self.entries:
            raise AbliterateError("the plan edits no layer: give --plan or --layers")
        seen: set[int] = set()
        for e in self.entries:
            if e.layer in seen:
                raise AbliterateError(f"layer {e.layer} appears more than once in the plan")
            seen.add(e.layer)
            for what, value in (("scale", e.scale), *((f"{c} scale", v) for c, v in e.components.items())):
                if not 0.0 <= value <= 1.0:
                    raise AbliterateError(f"layer {e.layer}: {what} {value} is outside [0, 1]")

    def check(self, num_layers: int, components: Collection[str]) -> None:
        """Every layer inside the model, every component one the architecture declares."""
        for e in self.entries:
            if not 0 <= e.layer < num_layers:
                raise AbliterateError(f"plan layer {e.layer} is out of range: the model has layers 0-{num_layers - 1}")
            for c in e.components:
                if c not in components:
                    raise AbliterateError(f"layer {e.layer}: unknown component '{c}' (this architecture has: "
                                          f"{', '.join(components)})")

    def as_dict(self) -> list[dict[str, Any]]:
        """A canonical form, for fingerprints and model cards."""
        return [
            {"layer": e.layer, "measurement": e.measurement, "scale": e.scale, "components": dict(e.components)}
            for e in sorted(self.entries, key=lambda e: e.layer)
        ]

    def to_yaml(self) -> str:
        doc: dict[str, Any] = {k: v for k, v in (("model", self.model), ("measurements", self.measurements), ("output", self.output)) if v}
        doc["ablate"] = [
            {k: v for k, v in d.items() if k != "components" or v} for d in self.as_dict()
        ]
        return yaml.safe_dump(doc, sort_keys=False)

    def save(self, path: Path) -> None:
        """Write the plan with paths inside its folder relative to it (the folder can move) and
        others absolute, so that it works from any directory."""
        folder = path.resolve().parent

        def rel(p: str | None, local: bool = True) -> str | None:
            if not p or not local:
                return p
            target = Path(p).resolve()
            return os.path.relpath(target, folder) if target.is_relative_to(folder) else str(target)

        model_is_path = self.model is not None and Path(self.model).exists()
        plan = replace(self, model=rel(self.model, model_is_path), measurements=rel(self.measurements), output=rel(self.output))
        write_atomic(path, plan.to_yaml().encode())


def load_plan(path: str | Path) -> Plan:
    """Read the reference tool's YAML (``model``, ``measurements``, ``output``, ``ablate``),
    plus a global ``scale`` (default for entries) and per-entry ``components`` scales."""
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise AbliterateError(f"plan file not found: {p}") from None
    except (OSError, yaml.YAMLError) as exc:
        raise AbliterateError(f"{p}: unreadable plan ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("ablate"), list):
        raise AbliterateError(f"{p}: a plan needs an 'ablate:' list of {{layer, measurement, scale}}")
    _known_keys(doc, TOP_LEVEL_KEYS, p)
    default_scale = _number(doc.get("scale", 1.0), p, "scale")
    entries = []
    for i, item in enumerate(doc["ablate"]):
        where = f"{p}: ablate[{i}]"
        if not isinstance(item, dict) or "layer" not in item or "measurement" not in item:
            raise AbliterateError(f"{where} needs 'layer' and 'measurement'")
        _known_keys(item, ENTRY_KEYS, where)
        if _number(item.get("sparsity", 0.0), p, "sparsity") != 0.0:
            raise AbliterateError(f"{where}: sparsity {item['sparsity']} is not supported; use 0")
        components = item.get("components") or {}
        if not isinstance(components, dict):
            raise AbliterateError(f"{where}: 'components' must map component names (attention, mlp, ...) to scales")
        entries.append(
            PlanEntry(
                _integer(item["layer"], where, "layer"),
                _integer(item["measurement"], where, "measurement"),
                _number(item.get("scale", default_scale), where, "scale"),
                {str(k): _number(v, where, str(k)) for k, v in components.items()},
            )
        )
    here = p.resolve().parent
    model = _opt_str(doc.get("model"))
    if model is not None and (here / model).exists():
        model = str(here / model)
    return Plan(tuple(entries), model, _relative_to(here, doc.get("measurements")), _relative_to(here, doc.get("output")))


def _relative_to(folder: Path, value: Any) -> str | None:
    """A path written in a plan, read relative to the plan's own folder."""
    text = _opt_str(value)
    return None if text is None else str(folder / Path(text).expanduser())


def _known_keys(doc: Mapping[Any, Any], known: tuple[str, ...], where: object) -> None:
    unknown = sorted(str(k) for k in doc if k not in known)
    if unknown:
        raise AbliterateError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                              f"(known: {', '.join(known)})")


_SPEC = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+))?\s*:\s*(\d+)\s*$")


def parse_layer_specs(specs: Iterable[str], scale: float, components: Mapping[str, float]) -> Plan:
    """``--layers 11-23:23 --layers 24-41:29``: target range, colon, measurement layer."""
    entries = []
    for spec in specs:
        m = _SPEC.match(spec)
        if not m:
            raise AbliterateError(f"--layers '{spec}': expected FIRST[-LAST]:MEASUREMENT, e.g. 11-23:23")
        first, last, measurement = int(m[1]), int(m[2] or m[1]), int(m[3])
        if last < first:
            raise AbliterateError(f"--layers '{spec}': range {first}-{last} is empty")
        if last >= MAX_LAYERS or measurement >= MAX_LAYERS:
            raise AbliterateError(f"--layers '{spec}': layer numbers must be below {MAX_LAYERS:,}")
        entries += [PlanEntry(n, measurement, scale, dict(components)) for n in range(first, last + 1)]
    return Plan(tuple(entries))


def _number(value: Any, where: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AbliterateError(f"{where}: {what} must be a number, got {value!r}")
    return float(value)


def _integer(value: Any, where: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_LAYERS:
        raise AbliterateError(f"{where}: {what} must be an integer from 0 to {MAX_LAYERS - 1:,}, got {value!r}")
    return value


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)
