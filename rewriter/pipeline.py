"""The rewrite job as a user states it: source, directions, plan, strategy -> output."""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .architecture import Architecture
from .directions import Measurements
from .dtypes import DTYPES, PRECISIONS, dtype_name
from .edits import PlannedEdit, plan_edits
from .engine.rewrite import Summary, check_output_path, rewrite
from .io.checkpoint import Checkpoint, Shard
from .io.hub import open_hub_checkpoint, parse_spec
from .plan import Plan
from .registry import Registry
from .strategy import Strategy


@dataclass(frozen=True)
class RewriteJob:
    """Everything checked and resolved; nothing written yet."""

    ckpt: Checkpoint
    arch: Architecture
    strategy: Strategy
    plan: Plan
    edits: Mapping[str, PlannedEdit]
    precision: str
    fingerprint: dict[str, Any]
    record: dict[str, Any]

    @property
    def compute(self) -> torch.dtype:
        return DTYPES[self.precision]

    def run(self, output: Path, *, overwrite: bool = False, progress: bool = True, workers: int = 1,
            on_shard: Callable[[str, Path], None] | None = None) -> Summary:
        return rewrite(
            self.ckpt, output, self.edits, self.fingerprint, record=self.record, compute=self.compute,
            overwrite=overwrite, progress=progress, workers=workers, on_shard=on_shard,
        )

    def describe(self) -> Iterable[str]:
        """What a dry run prints: per layer, per component, which measurement and scale."""
        yield f"architecture: {self.arch.name}; strategy: {self.strategy.name}; precision: {self.precision}"
        by_layer: dict[int, list[PlannedEdit]] = {}
        for e in self.edits.values():
            by_layer.setdefault(e.layer, []).append(e)
        width = max((len(e.component) for e in self.edits.values()), default=9)
        for layer in sorted(by_layer):
            for e in by_layer[layer]:
                yield (f"  layer {layer:>3}  {e.component:<{width}}  measurement {e.measurement:>3}  "
                       f"scale {e.scale:<5g}  {e.name}")
        yield f"{len(self.edits)} tensors in {len(by_layer)} layers would be edited"


def prepare(
    source: str | Path,
    output: str | Path | None,
    directions: str | Path,
    plan: Plan,
    strategy: str,
    *,
    precision: str = "float32",
    registry: Registry | None = None,
    download_dir: Path | None = None,
) -> RewriteJob:
    """Open and check everything a rewrite needs; raises AbliterateError on any problem.

    ``source`` is a checkpoint directory or a Hub ``ORG/NAME[@REVISION]``; for the latter,
    ``download_dir`` (--low-disk) holds one shard at a time instead of the HF cache.
    """
    registry = registry or Registry()
    precision = dtype_name(precision, PRECISIONS)
    spec = parse_spec(str(source))
    ckpt = open_hub_checkpoint(*spec, download_dir) if spec else Checkpoint.open(source)
    if output is not None:
        check_output_path(ckpt.root, Path(output))
    strat = registry.strategy(strategy)
    meas = Measurements.load(directions)
    arch = registry.architecture_for(ckpt.config, ckpt.names)
    edits = plan_edits(ckpt, arch, plan, meas, strat)
    fingerprint = {
        "strategy": strat.name,
        "precision": precision,
        "plan": plan.as_dict(),
        "directions_sha256": meas.sha256,
        "source_headers": _header_digest(ckpt.shards),
        **({"origin": ckpt.origin} if ckpt.origin else {}),
    }
    record = {
        "source": str(source) if spec else str(Path(source).resolve()),
        "directions": str(Path(directions).resolve()),
        "architecture": arch.name,
        "strategy_summary": strat.summary,
        "torch_version": torch.__version__,
        "tool_version": __version__,
    }
    return RewriteJob(ckpt, arch, strat, plan, edits, precision, fingerprint, record)


def _header_digest(shards: Sequence[Shard]) -> dict[str, Any]:
    return {s.name: {"size": s.header.file_size, "header_sha256": hashlib.sha256(s.header.raw).hexdigest()} for s in shards}
