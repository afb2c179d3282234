"""The recipe of ``abliterate run``: every choice a run makes, in one YAML file that the run
writes (``run.yml`` in its work folder) and ``--recipe`` reads back, so that a second model
goes through with the same settings and a run can be repeated later. No torch here: the
command's --help reads none."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from ..errors import AbliterateError
from ..io.files import write_atomic
from .memory import parse_size

DEFAULT_STRATEGY = "norm-preserving"
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few lines; anything this large is not one


@dataclass(frozen=True)
class Recipe:
    """What ``run`` does with a model; the field names are the recipe file's keys."""

    model: str | None = None
    strategy: str | None = None  # None: a given plan's own, else norm-preserving
    search: bool = False  # optimize the plan (where the model fits in memory); else analyze's heuristic plan
    trials: int = 24
    max_kl: float = 0.05
    refused_only: bool = True  # measure the harmful mean over the prompts the model refuses
    max_prompts: int | None = None  # at most this many prompts of each built-in set
    max_new_tokens: int = 128
    batch_size: int = 16
    capability: bool = True  # the evaluation measures the answer KL and known-answer accuracy too
    judge: str | None = None  # a model that judges each answer beside the markers
    judge_label: str | None = None  # a classifier judge's refusal label
    judge_batch_size: int = 8
    max_memory: int | None = None  # bytes the model may take in memory (else the memory available)
    low_disk: bool = False
    directions: str | None = None  # a direction file to use instead of measuring
    plan: str | None = None  # a plan file to use instead of choosing one
    push_to: str | None = None
    private: bool = True

    def with_changes(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)

    def save(self, path: Path) -> None:
        doc = {f.name: getattr(self, f.name) for f in fields(self)}
        text = "# abliterate run --recipe: every choice of the run (the model argument replaces 'model')\n"
        write_atomic(path, (text + yaml.safe_dump(doc, sort_keys=False)).encode())

    @classmethod
    def load(cls, path: Path) -> Recipe:
        """A recipe file, checked key by key: it is an input like any other."""
        try:
            if path.stat().st_size > MAX_RECIPE_BYTES:
                raise AbliterateError(f"{path}: {path.stat().st_size:,} bytes is not a recipe")
            doc = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise AbliterateError(f"recipe not found: {path}") from None
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise AbliterateError(f"{path}: unreadable recipe ({str(exc).splitlines()[0]})") from None
        except RecursionError:
            raise AbliterateError(f"{path}: unreadable recipe (nested too deep)") from None
        if not isinstance(doc, dict):
            raise AbliterateError(f"{path}: a recipe is a mapping of settings (the run.yml that 'run' writes)")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(str(k) for k in doc if k not in known)
        if unknown:
            raise AbliterateError(f"{path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                                  f"(known: {', '.join(known)})")
        return cls(**{k: _checked(path, k, v, cls.__dataclass_fields__[k].default) for k, v in doc.items()})


def _checked(path: Path, key: str, value: Any, default: Any) -> Any:
    """``value`` if it has the kind the key takes (its default's, or a string where the default is None)."""
    if key == "max_memory" and isinstance(value, str):
        return parse_size(value)
    if value is None and default is None:
        return None
    kind = type(default) if default is not None else (int if key in ("max_prompts", "max_memory") else str)
    ok = isinstance(value, float | int) if kind is float else isinstance(value, kind)
    if not ok or (isinstance(value, bool) and kind is not bool):
        raise AbliterateError(f"{path}: {key} must be {_KIND_WORDS[kind]}, got {type(value).__name__}")
    if kind in (int, float) and value <= 0:
        raise AbliterateError(f"{path}: {key} must be more than zero")
    if kind is str and (not value.strip() or len(value) > 4096):
        raise AbliterateError(f"{path}: {key} must be a non-empty string")
    return float(value) if kind is float else value


_KIND_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
