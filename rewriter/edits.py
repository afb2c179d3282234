"""Turn a plan into per-tensor edits, checking everything before a byte is written.

The result is a mapping from tensor name to a ready edit; the engine applies them and
knows nothing of plans, architectures or strategies.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .architecture import Architecture, ResidualWriter
from .directions import Measurements
from .engine.edit import TensorEdit
from .errors import AbliterateError
from .io.checkpoint import Checkpoint
from .io.safetensors_io import FLOAT_DTYPES
from .plan import Plan
from .strategy import Strategy


@dataclass(frozen=True)
class PlannedEdit(TensorEdit):
    """A tensor edit and where it came from in the plan."""

    layer: int = 0
    measurement: int = 0
    component: str = ""


def plan_edits(ckpt: Checkpoint, arch: Architecture, plan: Plan, meas: Measurements, strategy: Strategy) -> dict[str, PlannedEdit]:
    """Every tensor edit the plan asks for, or the first problem as an AbliterateError."""
    quant = ckpt.quantization()
    if quant:
        raise AbliterateError(f"{ckpt.root}: quantized checkpoint (quant_method '{quant}'); only float weights can be edited")
    n_layers, width = arch.num_layers(ckpt.config), arch.hidden_size(ckpt.config)
    if meas.width != width:
        raise AbliterateError(f"direction width {meas.width} does not match the model width {width} ({arch.name})")
    plan.check(n_layers, arch.components)
    edits: dict[str, PlannedEdit] = {}
    for entry in sorted(plan.entries, key=lambda e: e.layer):
        base = strategy.refine(meas, entry.measurement, entry.layer)
        for writer in _present_writers(ckpt, arch, entry.layer):
            _check_tensor(ckpt, arch, writer, width)
            direction = _unit(_through_norm(ckpt, writer, base), entry.layer, entry.measurement)
            update = strategy.update_bias if writer.bias else strategy.update_weight
            edits[writer.name] = PlannedEdit(
                writer.name, writer.axis, entry.scale_for(writer.component), direction, update,
                entry.layer, entry.measurement, writer.component,
            )
    return edits


def _present_writers(ckpt: Checkpoint, arch: Architecture, layer: int) -> Iterator[ResidualWriter]:
    writers = arch.residual_writers(layer, ckpt.config, ckpt.names)
    missing = [w.name for w in writers if w.required and w.name not in ckpt.names]
    if missing:
        raise AbliterateError(
            f"layer {layer}: residual writer{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"not found in the checkpoint (architecture {arch.name})"
        )
    if not writers:
        raise AbliterateError(f"layer {layer}: architecture {arch.name} names no residual writers")
    return (w for w in writers if w.name in ckpt.names)


def _through_norm(ckpt: Checkpoint, writer: ResidualWriter, r: torch.Tensor) -> torch.Tensor:
    """r * (offset + g) for a writer followed by a norm with gain g, else r."""
    if writer.output_norm is None:
        return r
    name = writer.output_norm.name
    if name not in ckpt.names:
        raise AbliterateError(f"norm {name} after {writer.name} not found in the checkpoint")
    gain = ckpt.tensor(name).to(torch.float64)
    if gain.shape != r.shape:
        raise AbliterateError(f"norm {name} has shape {tuple(gain.shape)}, expected ({r.shape[0]},)")
    return r * (writer.output_norm.offset + gain)


def _unit(r: torch.Tensor, layer: int, measurement: int) -> torch.Tensor:
    norm = torch.linalg.vector_norm(r)
    if not torch.isfinite(norm):
        raise AbliterateError(f"layer {layer}: direction from measurement {measurement} has NaN or inf values")
    if norm < 1e-12:
        raise AbliterateError(f"layer {layer}: direction from measurement {measurement} is zero")
    return r / norm


def _check_tensor(ckpt: Checkpoint, arch: Architecture, writer: ResidualWriter, width: int) -> None:
    entry = ckpt.entry(writer.name)
    if entry.dtype not in FLOAT_DTYPES:
        raise AbliterateError(
            f"{writer.name} has dtype {entry.dtype_name}; only float16, bfloat16, float32 and float64 tensors "
            "can be edited (quantized or integer weights are not supported)"
        )
    if writer.component not in arch.components:
        raise AbliterateError(f"{arch.name}: writer {writer.name} has component '{writer.component}', "
                              f"which the map does not declare ({', '.join(arch.components)})")
    if writer.axis >= len(entry.shape) or entry.shape[writer.axis] != width:
        raise AbliterateError(
            f"{writer.name} has shape {list(entry.shape)}; expected the model width {width} on axis {writer.axis}"
        )
