"""Prompt sets: the project's own defaults, and user files in the usual formats."""
from __future__ import annotations

import csv
import hashlib
import json
from importlib.resources import files
from pathlib import Path

from ..errors import AbliterateError
from ..io.hub import is_repo_id

DEFAULT_SETS = ("harmful-measure", "harmful-eval", "harmless-measure", "harmless-eval")


def default_prompts(name: str) -> list[str]:
    """One of the project's own prompt sets (64 prompts each; measure and eval halves are disjoint)."""
    if name not in DEFAULT_SETS:
        raise AbliterateError(f"unknown prompt set '{name}'; known: {', '.join(DEFAULT_SETS)}")
    text = files("rewriter.lab").joinpath("prompt_sets", f"{name}.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_prompts(source: str | Path, column: str = "text") -> list[str]:
    """Prompts from .txt (one per line), .json (a list), .jsonl, .parquet or .csv (``column``),
    or a Hub dataset id (needs the network)."""
    path = Path(source)
    if not path.exists():
        if is_repo_id(str(source)):
            return _from_hub(str(source), column)
        raise AbliterateError(f"prompt file not found: {source}")
    try:
        prompts = _read(path, column)
    except AbliterateError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep
        raise AbliterateError(f"{path}: unreadable prompt file ({str(exc).splitlines()[0]})") from None
    prompts = [p.strip() for p in prompts if isinstance(p, str) and p.strip()]
    if not prompts:
        raise AbliterateError(f"{path}: no prompts in the file")
    return prompts


def _read(path: Path, column: str) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return path.read_text(encoding="utf-8").splitlines()
    if suffix == ".json":
        return [_field(item, column, path) for item in _as_list(json.loads(path.read_text(encoding="utf-8")), path)]
    if suffix == ".jsonl":
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return [_field(json.loads(ln), column, path) for ln in lines]
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if rows and column not in rows[0]:
            raise AbliterateError(f"{path}: no column '{column}' (columns: {', '.join(rows[0])}); choose one with --column")
        return [r[column] for r in rows]
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise AbliterateError("reading .parquet needs pyarrow: pip install pyarrow") from None
        table = pq.read_table(path)
        if column not in table.column_names:
            raise AbliterateError(f"{path}: no column '{column}' (columns: {', '.join(table.column_names)}); choose one with --column")
        return table.column(column).to_pylist()
    raise AbliterateError(f"{path}: unsupported prompt file type '{suffix}' (use .txt, .json, .jsonl, .csv or .parquet)")


def _as_list(doc: object, path: Path) -> list[object]:
    if not isinstance(doc, list):
        raise AbliterateError(f"{path}: expected a JSON list of prompts")
    return doc


def _field(item: object, column: str, path: Path) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get(column), str):
        return item[column]
    raise AbliterateError(f"{path}: an entry has no string field '{column}'; choose one with --column")


def _from_hub(repo_id: str, column: str) -> list[str]:
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
    return [p for f in data for p in load_prompts(f, column)]


def prompts_sha256(prompts: list[str]) -> str:
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()
