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
MAX_SCALE = 2.0  # the reference tool takes any scale; past 2 an edit writes more along r than it removed
# Options an entry may carry, and that a plan's top level (or the command line) sets for every entry.
OPTION_KEYS = ("ensemble", "invert", "direction")
TOP_LEVEL_KEYS = ("model", "measurements", "output", "scale", *OPTION_KEYS, "strategy", "ablate")
ENTRY_KEYS = ("layer", "measurement", "scale", "sparsity", "components", *OPTION_KEYS)


@dataclass(frozen=True)
class PlanEntry:
    """One target layer: its measurement layer and scale, and the reference tool's options.

    ``sparsity`` s > 0 keeps the ⌊s·d⌋ largest-magnitude components of the direction;
    ``ensemble`` takes the mean of the normalized directions of measurements m-1, m, m+1;
    ``invert`` negates the scale (induction instead of ablation); ``direction`` names the
    strategy whose direction refinement replaces the chosen strategy's own.
    """

    layer: int
    measurement: int
    scale: float = 1.0
    components: Mapping[str, float] = field(default_factory=dict)
    sparsity: float = 0.0
    ensemble: bool = False
    invert: bool = False
    direction: str | None = None

    def scale_for(self, component: str) -> float:
        """Entry scale times the component's own scale (1.0 when not given), negative when inverted."""
        return (-1.0 if self.invert else 1.0) * self.scale * self.components.get(component, 1.0)

    def as_dict(self) -> dict[str, Any]:
        """The canonical form (fingerprints, cards, saved plans); options only where set, so that
        a plan without them has the fingerprint it always had."""
        out: dict[str, Any] = {"layer": self.layer, "measurement": self.measurement, "scale": self.scale,
                               "components": dict(self.components)}
        defaults = PlanEntry(0, 0)
        for key in ("sparsity", *OPTION_KEYS):
            if getattr(self, key) != getattr(defaults, key):
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_dict(cls, item: Mapping[Any, Any], where: object, global_scale: float = 1.0,
                  defaults: Mapping[str, Any] | None = None) -> PlanEntry:
        """An entry from a plan's ``ablate`` item (or a recorded one); ``global_scale`` multiplies
        the entry's scale, as the reference tool's global ``scale`` does, and ``defaults`` holds the
        plan's top-level options."""
        if not isinstance(item, Mapping) or "layer" not in item:
            raise AbliterateError(f"{where} needs 'layer' (and 'measurement', which defaults to the layer)")
        _known_keys(item, ENTRY_KEYS, where)
        components = item.get("components") or {}
        if not isinstance(components, Mapping):
            raise AbliterateError(f"{where}: 'components' must map component names (attention, mlp, ...) to scales")
        options = {**(defaults or {}), **{k: item[k] for k in OPTION_KEYS if k in item}}
        return cls(
            _integer(item["layer"], where, "layer"),
            _integer(item.get("measurement", item["layer"]), where, "measurement"),
            _number(item.get("scale", 1.0), where, "scale") * global_scale,
            {str(k): _number(v, where, str(k)) for k, v in components.items()},
            _number(item.get("sparsity", 0.0), where, "sparsity"),
            _flag(options.get("ensemble", False), where, "ensemble"),
            _flag(options.get("invert", False), where, "invert"),
            _name(options.get("direction"), where, "direction"),
        )


@dataclass(frozen=True)
class Plan:
    entries: tuple[PlanEntry, ...]
    model: str | None = None
    measurements: str | None = None
    output: str | None = None
    strategy: str | None = None  # the strategy the plan was chosen with; rewrite --plan uses it unless --strategy

    def __post_init__(self) -> None:
        if not self.entries:
            raise AbliterateError("the plan edits no layer: give --plan or --layers")
        seen: set[int] = set()
        for e in self.entries:
            if e.layer in seen:
                raise AbliterateError(f"layer {e.layer} appears more than once in the plan")
            seen.add(e.layer)
            for what, value in (("scale", e.scale), *((f"{c} scale", v) for c, v in e.components.items())):
                if not 0.0 <= value <= MAX_SCALE:
                    raise AbliterateError(f"layer {e.layer}: {what} {value:g} is outside [0, {MAX_SCALE:g}]")
            if not 0.0 <= e.sparsity <= 1.0:
                raise AbliterateError(f"layer {e.layer}: sparsity {e.sparsity:g} is outside [0, 1] (the fraction "
                                      "of the direction's components kept; 0 keeps all)")

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
        return [e.as_dict() for e in sorted(self.entries, key=lambda e: e.layer)]

    def with_options(self, **options: Any) -> Plan:
        """Every entry with these options set (the command line's --layer-ensemble, --invert,
        --direction, --sparsity over a plan's); options given as None or False are left alone."""
        given = {k: v for k, v in options.items() if v is not None and v is not False}
        return replace(self, entries=tuple(replace(e, **given) for e in self.entries)) if given else self

    def to_yaml(self) -> str:
        doc: dict[str, Any] = {k: v for k, v in (("model", self.model), ("measurements", self.measurements),
                                                 ("output", self.output), ("strategy", self.strategy)) if v}
        doc["ablate"] = [
            {k: v for k, v in d.items() if k != "components" or v} for d in self.as_dict()
        ]
        return yaml.safe_dump(doc, sort_keys=False)

    def save(self, path: Path, comment: str = "") -> None:
        """Write the plan with paths inside its folder relative to it (the folder can move) and
        others absolute, so that it works from any directory; ``comment`` heads the file."""
        folder = path.resolve().parent

        def rel(p: str | None, local: bool = True) -> str | None:
            if not p or not local:
                return p
            target = Path(p).resolve()
            return os.path.relpath(target, folder) if target.is_relative_to(folder) else str(target)

        model_is_path = self.model is not None and Path(self.model).exists()
        plan = replace(self, model=rel(self.model, model_is_path), measurements=rel(self.measurements), output=rel(self.output))
        write_atomic(path, (f"# {comment}\n" * bool(comment) + plan.to_yaml()).encode())


def load_plan(path: str | Path) -> Plan:
    """Read the reference tool's YAML (``model``, ``measurements``, ``output``, a global ``scale``
    that multiplies every entry's, ``ablate: [{layer, measurement, scale, sparsity}]``), plus
    per-entry ``components`` scales and the options ``ensemble``, ``invert``, ``direction``
    (top level for every entry, or per entry)."""
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise AbliterateError(f"plan file not found: {p}") from None
    except (OSError, yaml.YAMLError) as exc:
        raise AbliterateError(f"{p}: unreadable plan ({str(exc).splitlines()[0]})") from None
    except RecursionError:
        raise AbliterateError(f"{p}: unreadable plan (nested too deep)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("ablate"), list):
        raise AbliterateError(f"{p}: a plan needs an 'ablate:' list of {{layer, measurement, scale}}")
    _known_keys(doc, TOP_LEVEL_KEYS, p)
    global_scale = _number(doc.get("scale", 1.0), p, "scale")
    defaults = {k: doc[k] for k in OPTION_KEYS if k in doc}
    entries = [PlanEntry.from_dict(item, f"{p}: ablate[{i}]", global_scale, defaults)
               for i, item in enumerate(doc["ablate"])]
    here = p.resolve().parent
    model = _opt_str(doc.get("model"))
    if model is not None and (here / model).exists():
        model = str(here / model)
    return Plan(tuple(entries), model, _relative_to(here, doc.get("measurements")), _relative_to(here, doc.get("output")),
                _name(doc.get("strategy"), p, "strategy"))


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


def _flag(value: Any, where: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise AbliterateError(f"{where}: {what} must be true or false, got {value!r}")
    return value


def _name(value: Any, where: object, what: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not value.strip() or len(value) > 100):
        raise AbliterateError(f"{where}: {what} must name a strategy (standard, projected, biprojected, ...)")
    return value


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)
