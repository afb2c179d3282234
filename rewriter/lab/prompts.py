"""Prompt sets: the project's own defaults, and user files in the usual formats; each prompt
optionally tagged with a harm category, so that evaluate can say where refusals are left."""
from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from ..errors import AbliterateError
from ..io.hub import is_repo_id

# The untagged sets (64 prompts each) are what measure, optimize and the demo use by default, and
# what the figures in docs/quality.md were measured on. The tagged sets (80 each) cover the ten
# harm categories of JailbreakBench evenly, 8 prompts each, written by the project; each harmless
# prompt is matched in form and subject to a harmful one and carries its category.
UNTAGGED_SETS = ("harmful-measure", "harmful-eval", "harmless-measure", "harmless-eval")
TAGGED_SETS = ("harmful-tagged-measure", "harmful-tagged-eval", "harmless-tagged-measure", "harmless-tagged-eval")
DEFAULT_SETS = UNTAGGED_SETS + TAGGED_SETS
CATEGORIES = {
    "harassment": "harassment and discrimination", "malware": "malware and hacking", "physical": "physical harm",
    "economic": "economic harm", "fraud": "fraud and deception", "disinformation": "disinformation and defamation",
    "sexual": "sexual and adult content", "privacy": "privacy", "expert": "expert advice (medical, legal, financial)",
    "government": "government decision-making (elections, borders, courts, officials)",
}
UNTAGGED = "untagged"  # the category of a prompt in a tagged file that has none


@dataclass(frozen=True)
class Prompts:
    """Prompts and, when the source tags them, each one's category (same order and length)."""

    texts: list[str]
    categories: list[str] | None = None


def default_prompts(name: str) -> list[str]:
    """One of the project's own prompt sets (measure and eval halves are disjoint)."""
    return default_set(name).texts


def default_set(name: str) -> Prompts:
    """One of the project's own prompt sets with its categories (None for the untagged sets)."""
    if name not in DEFAULT_SETS:
        raise AbliterateError(f"unknown prompt set '{name}'; known: {', '.join(DEFAULT_SETS)}")
    if name in UNTAGGED_SETS:
        text = files("rewriter.lab").joinpath("prompt_sets", f"{name}.txt").read_text(encoding="utf-8")
        return Prompts([line.strip() for line in text.splitlines() if line.strip()])
    text = files("rewriter.lab").joinpath("prompt_sets", f"{name}.tsv").read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line.strip()]
    return Prompts([p.strip() for _, p in rows], [c.strip() for c, _ in rows])


def load_prompts(source: str | Path, column: str = "text") -> list[str]:
    """Prompts from .txt (one per line), .json (a list), .jsonl, .parquet or .csv (``column``),
    a built-in set's name (when no such file exists), or a Hub dataset id (needs the network)."""
    return load_tagged(source, column).texts


def load_tagged(source: str | Path, column: str = "text", category_column: str = "category") -> Prompts:
    """``load_prompts``, with each prompt's category from ``category_column`` where the file has
    one (.json/.jsonl objects, .csv, .parquet; a built-in tagged set's own tags)."""
    path = Path(source)
    if not path.exists():
        if str(source) in DEFAULT_SETS:
            return default_set(str(source))
        if is_repo_id(str(source)):
            return _from_hub(str(source), column, category_column)
        raise AbliterateError(f"prompt file not found: {source} (nor a built-in set: {', '.join(DEFAULT_SETS)})")
    try:
        rows = _read(path, column, category_column)
    except AbliterateError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
        raise AbliterateError(f"{path}: unreadable prompt file ({str(exc).splitlines()[0]})") from None
    rows = [(p.strip(), c) for p, c in rows if isinstance(p, str) and p.strip()]
    if not rows:
        raise AbliterateError(f"{path}: no prompts in the file")
    return _tagged(rows)


Row = tuple[str, str | None]  # a prompt and its category, if the file gives one


def _tagged(rows: list[Row]) -> Prompts:
    """Prompts with categories when any row has one (the others are UNTAGGED)."""
    cats = [c.strip() if isinstance(c, str) and c.strip() else None for _, c in rows]
    texts = [p for p, _ in rows]
    return Prompts(texts, [c or UNTAGGED for c in cats] if any(cats) else None)


def _read(path: Path, column: str, category_column: str) -> list[Row]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [(line, None) for line in path.read_text(encoding="utf-8").splitlines()]
    if suffix == ".json":
        items = _as_list(json.loads(path.read_text(encoding="utf-8")), path)
        return [_field(item, column, category_column, path) for item in items]
    if suffix == ".jsonl":
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return [_field(json.loads(ln), column, category_column, path) for ln in lines]
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if rows and column not in rows[0]:
            raise AbliterateError(f"{path}: no column '{column}' (columns: {', '.join(rows[0])}); choose one with --column")
        return [(r[column], r.get(category_column)) for r in rows]
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise AbliterateError("reading .parquet needs pyarrow: pip install pyarrow") from None
        table = pq.read_table(path)
        if column not in table.column_names:
            raise AbliterateError(f"{path}: no column '{column}' (columns: {', '.join(table.column_names)}); choose one with --column")
        texts = table.column(column).to_pylist()
        cats = table.column(category_column).to_pylist() if category_column in table.column_names else [None] * len(texts)
        return list(zip(texts, cats))
    raise AbliterateError(f"{path}: unsupported prompt file type '{suffix}' (use .txt, .json, .jsonl, .csv or .parquet)")


def _as_list(doc: object, path: Path) -> list[object]:
    if not isinstance(doc, list):
        raise AbliterateError(f"{path}: expected a JSON list of prompts")
    return doc


def _field(item: object, column: str, category_column: str, path: Path) -> Row:
    if isinstance(item, str):
        return item, None
    if isinstance(item, dict) and isinstance(item.get(column), str):
        category = item.get(category_column)
        return item[column], category if isinstance(category, str) else None
    raise AbliterateError(f"{path}: an entry has no string field '{column}'; choose one with --column")


def _from_hub(repo_id: str, column: str, category_column: str) -> Prompts:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = Path(snapshot_download(repo_id, repo_type="dataset",
                                        allow_patterns=["*.parquet", "*.jsonl", "*.json", "*.csv", "*.txt"]))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise AbliterateError(f"prompt source '{repo_id}' is neither a file nor a reachable Hub dataset ({type(exc).__name__})") from None
    data = sorted(p for p in folder.rglob("*") if p.suffix in {".parquet", ".jsonl", ".json", ".csv", ".txt"}
                  and not p.name.startswith(("README", "dataset_info")))
    if not data:
        raise AbliterateError(f"Hub dataset '{repo_id}' has no prompt files")
    parts = [load_tagged(f, column, category_column) for f in data]
    return _tagged([row for part in parts for row in zip(part.texts, part.categories or [None] * len(part.texts))])


def prompts_sha256(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()
