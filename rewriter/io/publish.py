"""Publishing to the Hub: shards pre-uploaded as they are finished, then one commit with the
index, configs, direction file, plan and model card, so that no reader ever sees an index
pointing at missing shards. A rerun skips LFS objects the Hub already has.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .. import __version__
from ..errors import AbliterateError
from .files import sha256_file
from .hub import endpoint, hub_error
from .manifest import MANIFEST_NAME, load_manifest, published_files


class Publisher:
    def __init__(self, repo: str, *, private: bool = True, dry_run: bool = False,
                 log: Callable[[str], None] = lambda s: None) -> None:
        from huggingface_hub import HfApi

        self.repo, self.private, self.dry_run, self.log = repo, private, dry_run, log
        self.api = HfApi(endpoint=endpoint())
        self.ops: dict[str, Any] = {}

    def _call(self, action: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except AbliterateError:
            raise
        except Exception as exc:
            raise hub_error(exc, self.repo, action) from None

    def start(self) -> None:
        if self.dry_run:
            self.log(f"would create {'private' if self.private else 'public'} repo {self.repo} (if missing)")
            return
        self._call("create", self.api.create_repo, self.repo, private=self.private, exist_ok=True)

    def add(self, path_in_repo: str, content: Path | bytes, preupload: bool = False) -> None:
        """Stage a file for the final commit; ``preupload`` sends an LFS file's bytes now."""
        from huggingface_hub import CommitOperationAdd

        size = content.stat().st_size if isinstance(content, Path) else len(content)
        if self.dry_run:
            self.log(f"would upload {path_in_repo} ({size:,} bytes)")
            self.ops[path_in_repo] = None
            return
        op = CommitOperationAdd(path_in_repo, str(content) if isinstance(content, Path) else content)
        if preupload:
            self._call("upload to", self.api.preupload_lfs_files, self.repo, [op])
        self.ops[path_in_repo] = op

    def shard_done(self, name: str, path: Path) -> None:
        """The engine's on_shard callback: upload a finished shard while the next is written."""
        self.log(f"uploading {name}")
        self.add(name, path, preupload=True)

    def finish(self, output: Path, files: list[str], card: str, extra: dict[str, Path | bytes]) -> str | None:
        """Commit ``files`` of ``output`` not staged yet, the extras and the card, in one commit."""
        for rel in files:
            if rel not in self.ops:
                self.add(rel, output / rel, preupload=rel.endswith(".safetensors"))
        for name, content in extra.items():
            self.add(name, content)
        self.add("README.md", card.encode())
        if self.dry_run:
            self.log(f"would commit {len(self.ops)} files to {self.repo}")
            return None
        info = self._call("commit to", self.api.create_commit, self.repo, list(self.ops.values()),
                          commit_message=f"Abliterated with abliterate-rewriter {__version__}")
        return str(info.oid)


def model_card(manifest: dict[str, Any], *, base_model: str | None, evaluation: dict[str, Any] | None = None,
               repo: str | None = None) -> str:
    """README.md for the published model ``repo``: metadata, method, plan, provenance, evaluation,
    and the command that checks it against its base."""
    fp = manifest.get("fingerprint", {})
    strategy = fp.get("strategy", "unknown")
    summary = (manifest.get("record") or {}).get("strategy_summary")
    plan = fp.get("plan", [])
    origin = fp.get("origin") or {}
    base = base_model or origin.get("repo")
    front = ["---", *( [f"base_model: {base}"] if base else []), "tags:", "- abliterated", f"- {strategy}", "---", ""]
    lines = [
        f"# {base.split('/')[-1] + ' (abliterated)' if base else 'Abliterated model'}",
        "",
        "This model is a directional ablation of its base: the refusal direction, the difference of mean "
        "residual activations on harmful and harmless prompts, was removed from the weights that write into "
        "the residual stream (attention and MLP output projections) of the layers below. "
        f"The `{strategy}` strategy was used" + (f" ({summary})." if summary else "."),
        "",
        "## Plan",
        "",
        "| layer | measurement | scale | components |",
        "| --- | --- | --- | --- |",
        *(f"| {e['layer']} | {e['measurement']} | {e['scale']:g} | {json.dumps(e.get('components') or {})} |" for e in plan),
        "",
        "## Provenance",
        "",
        f"- base model: {base or 'local checkpoint'}" + (f" at revision `{origin['revision']}`" if origin.get("revision") else ""),
        f"- direction file sha256: `{fp.get('directions_sha256', 'unknown')}`",
        f"- edit precision: {fp.get('precision', 'fp32')}",
        *_format_lines(fp, manifest.get("record") or {}),
        f"- tool: abliterate-rewriter {manifest.get('tool_version', __version__)}",
    ]
    if evaluation:
        lines += ["", "## Evaluation", "", *_evaluation_lines(evaluation)]
    lines += ["", "## Check it", "",
              "The record `abliteration.json` and the direction file let anyone recompute the edit from the base "
              "and compare every byte, streaming both repos shard by shard:", "",
              "```bash",
              f"pip install abliterate-rewriter && abliterate verify {_base_spec(base, origin)} {repo or 'ORG/NAME'} --low-disk",
              "```", "",
              "It says that this repo is the base at that revision with the recorded edit and nothing else, or "
              "lists every tensor and file that differs."]
    return "\n".join(front + lines) + "\n"


def _base_spec(base: str | None, origin: dict[str, Any]) -> str:
    if origin.get("repo") and origin.get("revision"):
        return f"{origin['repo']}@{origin['revision']}"
    return base or "path/to/base-model"


def _evaluation_lines(evaluation: dict[str, Any]) -> list[str]:
    """The numbers of ``evaluate --json`` (and of the base model, under ``original``, when given)."""
    def refusals(e: dict[str, Any]) -> str:
        if e.get("refusals") is None:
            return f"not counted (no generation); refusal score {_figure(e.get('refusal_score'), '+.3f')}"
        return f"{e['refusals']}/{e.get('prompts')} (answers up to {e.get('max_new_tokens')} tokens)"

    lines = []
    if isinstance(evaluation.get("original"), dict):
        lines.append(f"- base model's refusals on {evaluation.get('prompts')} harmful prompts: "
                     f"{refusals(evaluation['original'])}")
    lines.append(f"- refusals on {evaluation.get('prompts')} harmful prompts: {refusals(evaluation)}")
    if isinstance(evaluation.get("refusal_counts"), dict) and evaluation.get("refusals") is not None:
        lines.append(f"- counted otherwise: {_counts(evaluation)}")
    if evaluation.get("other_script"):
        lines.append(f"- answers mostly in another script than their prompt (markers read English and Chinese only): "
                     f"{_figure(evaluation['other_script'], 'd')}")
    if evaluation.get("kl") is not None:
        lines.append(f"- KL divergence from the base model on harmless prompts: {_figure(evaluation['kl'], '.4f')}")
    if isinstance(evaluation.get("capability"), dict):
        c = evaluation["capability"]
        lines.append(f"- KL over whole answers (teacher-forced on the base model's own answers to "
                     f"{_figure(c.get('answer_prompts'), 'd')} harmless prompts): {_figure(c.get('answer_kl'), '.4f')} "
                     "per token")
        lines.append(f"- known-answer accuracy ({_figure(c.get('questions'), 'd')} arithmetic and formatting "
                     f"questions): {_figure(c.get('accuracy'), '.0%')} (base model {_figure(c.get('original_accuracy'), '.0%')})")
    if isinstance(evaluation.get("by_category"), dict) and evaluation["by_category"]:
        lines += ["", "Refusals per harm category (this model):", "", *_category_table(evaluation["by_category"])]
    return lines


def _counts(evaluation: dict[str, Any]) -> str:
    """Each marker set's count and the judge's, with the base model's where known."""
    base = evaluation.get("original") if isinstance(evaluation.get("original"), dict) else {}
    before = base.get("refusal_counts") if isinstance(base.get("refusal_counts"), dict) else {}
    parts = []
    for name, n in evaluation["refusal_counts"].items():
        label = f"judge {_cell(evaluation.get('judge'))}" if name == "judge" else f"{_cell(name)} markers"
        was = f" (base model {_figure(before[name], 'd')})" if name in before else ""
        parts.append(f"{label} {_figure(n, 'd')}{was}")
    return "; ".join(parts)


def _category_table(by_category: dict[str, Any]) -> list[str]:
    rows = [(_cell(cat), row) for cat, row in by_category.items() if isinstance(row, dict)]
    names = list(dict.fromkeys(n for _, row in rows for n in row if n != "prompts"))
    lines = ["| category | prompts | " + " | ".join(map(_cell, names)) + " |", "| --- | --: |" + " --: |" * len(names)]
    for cat, row in rows:
        lines.append(f"| {cat} | {_figure(row.get('prompts'), 'd')} | " +
                     " | ".join(_figure(row.get(n), "d") for n in names) + " |")
    return lines


def _cell(text: object) -> str:
    """A name from an evaluation file as one line of card text that cannot end a table cell."""
    return " ".join(str(text).split()).replace("|", "/")[:80]


def _figure(value: Any, spec: str) -> str:
    """A number of an evaluation file (an input like any other) formatted, or 'unknown' (a count
    given as a float too: ``format(1.5, "d")`` raises)."""
    kinds = int if spec.endswith("d") else (int, float)
    return format(value, spec) if isinstance(value, kinds) and not isinstance(value, bool) else "unknown"


def _format_lines(fingerprint: dict[str, Any], record: dict[str, Any]) -> list[str]:
    """How a quantized base was handled: kept in its format, or written out in bf16."""
    codec = record.get("codec")
    if not codec:
        return []
    if fingerprint.get("output_format") == "bf16":
        return [f"- weights: the base's {codec} weights dequantized to bfloat16"]
    return [f"- weights: {codec}, as in the base; edited weights were decoded, edited in float32 and re-encoded "
            "with fresh scales, rounded so as to keep the refusal direction out"]


def plan_yaml(manifest: dict[str, Any]) -> bytes:
    """The plan the output was written with, as YAML that ``rewrite --plan`` takes."""
    entries = manifest.get("fingerprint", {}).get("plan", [])
    ablate = [{k: v for k, v in e.items() if k != "components" or v} for e in entries]
    return yaml.safe_dump({"ablate": ablate}, sort_keys=False).encode()


def publish(output: Path, *, publisher: Publisher, base_model: str | None = None,
            directions: Path | None = None, evaluation: dict[str, Any] | None = None) -> str | None:
    """Push a finished output folder (what ``abliterate push`` does, and ``rewrite --push-to`` ends with).

    Only the files the manifest records are uploaded (shards, index, copied files, the
    manifest itself), whatever else the folder holds.
    """
    files = published_files(output)
    manifest = load_manifest(output) or {}
    extra: dict[str, Path | bytes] = {"plan.yml": plan_yaml(manifest), MANIFEST_NAME: output / MANIFEST_NAME}
    if directions is not None:
        if sha256_file(directions) != manifest["fingerprint"].get("directions_sha256"):
            raise AbliterateError(f"{directions} is not the direction file this output was made with")
        extra["directions.safetensors"] = directions
    card = model_card(manifest, base_model=base_model, evaluation=evaluation, repo=publisher.repo)
    return publisher.finish(output, files, card, extra)
