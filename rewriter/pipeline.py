"""The rewrite job as a user states it: source, directions, plan, strategy -> output."""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .architecture import Architecture
from .checkpoint import Checkpoint, Shard
from .directions import Measurements
from .edits import TensorEdit, plan_edits
from .engine import Summary, check_output_path, rewrite
from .hub import open_hub_checkpoint, parse_spec
from .plan import Plan
from .registry import Registry
from .safetensors_io import file_sha256

PRECISIONS = {"fp32": torch.float32, "fp64": torch.float64}


@dataclass(frozen=True)
class RewriteJob:
    """Everything checked and resolved; nothing written yet."""

    ckpt: Checkpoint
    arch: Architecture
    strategy: str
    plan: Plan
    edits: Mapping[str, TensorEdit]
    precision: str
    fingerprint: dict[str, Any]

    def run(self, output: Path, *, overwrite: bool = False, progress: bool = True, workers: int = 1,
            on_shard: Callable[[str, Path], None] | None = None) -> Summary:
        return rewrite(
            self.ckpt, output, self.edits, self.fingerprint, compute=PRECISIONS[self.precision],
            overwrite=overwrite, progress=progress, workers=workers, on_shard=on_shard,
        )

    def describe(self) -> Iterable[str]:
        """What a dry run prints: per layer, per component, which measurement and scale."""
        yield f"architecture: {self.arch.name}; strategy: {self.strategy}; precision: {self.precision}"
        by_layer: dict[int, list[TensorEdit]] = {}
        for e in self.edits.values():
            by_layer.setdefault(e.layer, []).append(e)
        for layer in sorted(by_layer):
            for e in by_layer[layer]:
                yield f"  layer {layer:>3}  {e.component:<9}  measurement {e.measurement:>3}  scale {e.scale:<5g}  {e.name}"
        yield f"{len(self.edits)} tensors in {len(by_layer)} layers would be edited"


def prepare(
    source: str | Path,
    output: str | Path | None,
    directions: str | Path,
    plan: Plan,
    strategy: str,
    *,
    precision: str = "fp32",
    registry: Registry | None = None,
    download_dir: Path | None = None,
) -> RewriteJob:
    """Open and check everything a rewrite needs; raises AbliterateError on any problem.

    ``source`` is a checkpoint directory or a Hub ``ORG/NAME[@REVISION]``; for the latter,
    ``download_dir`` (--low-disk) holds one shard at a time instead of the HF cache.
    """
    registry = registry or Registry()
    spec = parse_spec(str(source))
    ckpt = open_hub_checkpoint(*spec, download_dir) if spec else Checkpoint.open(source)
    if output is not None:
        check_output_path(ckpt.root, Path(output))
    strat = registry.strategy(strategy)
    meas = Measurements.load(directions)
    arch = registry.architecture_for(ckpt.config, ckpt.names)
    edits = plan_edits(ckpt, arch, plan, meas, strat)
    fingerprint = {
        "strategy": strategy,
        "precision": precision,
        "plan": plan.as_dict(),
        "directions_sha256": file_sha256(Path(directions)),
        "source_headers": _header_digest(ckpt.shards),
        **({"origin": ckpt.origin} if ckpt.origin else {}),
    }
    return RewriteJob(ckpt, arch, strategy, plan, edits, precision, fingerprint)


def _header_digest(shards: Sequence[Shard]) -> dict[str, Any]:
    return {s.name: {"size": s.header.file_size, "header_sha256": hashlib.sha256(s.header.raw).hexdigest()} for s in shards}
