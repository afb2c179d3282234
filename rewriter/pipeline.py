"""The rewrite job as a user states it: source, directions, plan, strategy -> output."""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .architecture import Architecture
from .directions import Measurements
from .dtypes import DTYPES, PRECISIONS, dtype_name
from .dequantized import OUTPUT_FORMATS, dequantized
from .edits import PlannedEdit, plan_edits
from .engine.coded import CodedEdit
from .engine.edit import TensorEdit
from .engine.layout import Reshape
from .engine.rewrite import SAME, Summary, check_output_path, rewrite
from .errors import AbliterateError
from .io.checkpoint import Checkpoint, Shard
from .io.hub import open_hub_checkpoint, parse_spec
from .logical import LogicalTensors
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
    edits: Mapping[str, PlannedEdit]  # by logical tensor name
    precision: str
    fingerprint: dict[str, Any]
    record: dict[str, Any]
    view: LogicalTensors
    output_format: str = "same"
    notes: tuple[str, ...] = ()  # what a user should know before the run (printed by rewrite)

    @property
    def compute(self) -> torch.dtype:
        return DTYPES[self.precision]

    @cached_property
    def stored_edits(self) -> dict[str, TensorEdit | CodedEdit]:
        """The edits by stored tensor name, as the engine applies them: a quantized weight's
        edit under each of its parts, with its codec's functions bound to it. A quantized
        weight at scale 0 is left out (copied byte for byte, not re-encoded). Written out
        dequantized, a quantized weight is edited as it is decoded (``reshape``), not here."""
        out: dict[str, TensorEdit | CodedEdit] = {}
        for name, edit in self.edits.items():
            packed = self.view.packed.get(name)
            if packed is None:
                out[name] = edit
            elif edit.scale != 0 and self.output_format == "same":
                out.update(dict.fromkeys(packed.parts, self.view.coded(name, edit)))
        return out

    @cached_property
    def reshape(self) -> Reshape:
        """The output's layout: the source's, or for ``bf16`` the dequantized checkpoint's."""
        return dequantized(self.ckpt, self.view, self.edits) if self.output_format == "bf16" else SAME

    def run(self, output: Path, *, overwrite: bool = False, progress: bool = True, workers: int | None = None,
            edit_threads: int | None = None, on_shard: Callable[[str, Path], None] | None = None) -> Summary:
        return rewrite(
            self.ckpt, output, self.stored_edits, self.fingerprint, record=self.record, compute=self.compute,
            overwrite=overwrite, progress=progress, workers=workers, edit_threads=edit_threads, on_shard=on_shard,
            reshape=self.reshape,
        )

    def describe(self) -> Iterable[str]:
        """What a dry run prints: per layer, per component, which measurement and scale."""
        yield f"architecture: {self.arch.name}; strategy: {self.strategy.name}; precision: {self.precision}"
        yield from self.notes
        if self.view.codec is not None and self.output_format == "bf16":
            yield f"quantized: {self.view.codec.name}; every quantized weight is written out in bfloat16"
        elif self.view.codec is not None:
            yield f"quantized: {self.view.codec.name}; edited weights are decoded, edited and re-encoded with new scales"
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
    output_format: str = "same",
) -> RewriteJob:
    """Open and check everything a rewrite needs; raises AbliterateError on any problem.

    ``source`` is a checkpoint directory or a Hub ``ORG/NAME[@REVISION]``; for the latter,
    ``download_dir`` (--low-disk) holds one shard at a time instead of the HF cache.
    ``output_format`` ``bf16`` writes a quantized checkpoint out dequantized.
    """
    registry = registry or Registry()
    precision = dtype_name(precision, PRECISIONS)
    spec = parse_spec(str(source))
    ckpt = open_hub_checkpoint(*spec, download_dir) if spec else Checkpoint.open(source)
    if output is not None:
        check_output_path(ckpt.root, Path(output))
    strat = registry.strategy(strategy)
    meas = Measurements.load(directions)
    view = LogicalTensors.of(ckpt, registry)
    if output_format not in OUTPUT_FORMATS:
        raise AbliterateError(f"output format '{output_format}' is not one of {', '.join(OUTPUT_FORMATS)}")
    if output_format == "bf16" and view.codec is None:
        raise AbliterateError(f"{ckpt.root} is not quantized; --output-format bf16 writes a quantized checkpoint "
                              "out dequantized")
    arch = registry.architecture_for(ckpt.config, view.names)
    refines = {e.direction: registry.strategy(e.direction).refine for e in plan.entries if e.direction}
    edits = plan_edits(ckpt, arch, plan, meas, strat, view, refines)
    fingerprint = {
        "strategy": strat.name,
        "precision": precision,
        "plan": plan.as_dict(),
        "directions_sha256": meas.sha256,
        "source_headers": _header_digest(ckpt.shards),
        **({"output_format": output_format} if output_format != "same" else {}),
        **({"origin": ckpt.origin} if ckpt.origin else {}),
    }
    record = {
        "source": str(source) if spec else str(Path(source).resolve()),
        "directions": str(Path(directions).resolve()),
        "architecture": arch.name,
        "strategy_summary": strat.summary,
        **({"codec": view.codec.name} if view.codec else {}),
        "torch_version": torch.__version__,
        "tool_version": __version__,
    }
    return RewriteJob(ckpt, arch, strat, plan, edits, precision, fingerprint, record, view, output_format,
                      _notes(meas))


def _notes(meas: Measurements) -> tuple[str, ...]:
    if meas.reference is None:
        return ()
    return (f"direction file from llm-abliteration's measure.py (refusenorm_N {meas.metadata.get('refusenorm')}): "
            "each measurement's direction is its refusenorm_N as stored, as that tool's sharded_ablate.py uses it; "
            "standard and projected are the same on it (docs/method.md)",)


def _header_digest(shards: Sequence[Shard]) -> dict[str, Any]:
    return {s.name: {"size": s.header.file_size, "header_sha256": hashlib.sha256(s.header.raw).hexdigest()} for s in shards}
