"""Turn a plan into per-tensor edits, checking everything before a byte is written.

The result is a mapping from tensor name to a ready edit; the engine applies them and
knows nothing of plans, architectures or strategies.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .architecture import Architecture, ResidualWriter
from .checkpoint import Checkpoint
from .directions import Measurements
from .errors import AbliterateError
from .plan import Plan
from .safetensors_io import FLOAT_DTYPES
from .strategy import Strategy, Update


@dataclass(frozen=True)
class TensorEdit:
    """One planned edit: remove ``direction`` (unit, float64) along ``axis`` at ``scale``."""

    name: str
    layer: int
    measurement: int
    component: str
    axis: int
    scale: float
    direction: torch.Tensor
    update: Update

    def apply(self, tensor: torch.Tensor, compute: torch.dtype = torch.float32, *, in_place: bool = False,
              workspace: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """The edited tensor in its stored dtype, and how many columns had to be zeroed.

        ``in_place`` writes the result into ``tensor`` itself (the engine owns that buffer,
        which saves a stored-size copy). ``workspace`` (1-D, ``compute`` dtype, at least
        ``tensor.numel()`` long) holds the working copy: reused across edits it saves
        allocating, and page-faulting, a tensor-sized buffer each time, which costs more
        than the edit math (180 ms against 22 ms for the conversion of a [3840, 15360]
        bf16 tensor into float32 here).
        """
        if self.scale == 0:
            return tensor, 0
        moved = tensor.movedim(self.axis, 0)
        room = workspace if workspace is not None else torch.empty(tensor.numel(), dtype=compute)
        work = room[: tensor.numel()].view(moved.shape).copy_(moved)
        edited, zeroed = self.update(work.reshape(moved.shape[0], -1), self.direction.to(compute), self.scale)
        result = edited.reshape(moved.shape).movedim(0, self.axis)
        if in_place:
            tensor.copy_(result)
            return tensor, zeroed
        return result.to(tensor.dtype).contiguous(), zeroed


def plan_edits(ckpt: Checkpoint, arch: Architecture, plan: Plan, meas: Measurements, strategy: Strategy) -> dict[str, TensorEdit]:
    """Every tensor edit the plan asks for, or the first problem as an AbliterateError."""
    quant = ckpt.config.get("quantization_config") or (ckpt.config.get("text_config") or {}).get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else "unknown"
        raise AbliterateError(f"{ckpt.root}: quantized checkpoint (quant_method '{method}'); only float weights can be edited")
    n_layers, width = arch.num_layers(ckpt.config), arch.hidden_size(ckpt.config)
    if meas.width != width:
        raise AbliterateError(f"direction width {meas.width} does not match the model width {width} ({arch.name})")
    edits: dict[str, TensorEdit] = {}
    for entry in sorted(plan.entries, key=lambda e: e.layer):
        if not 0 <= entry.layer < n_layers:
            raise AbliterateError(f"plan layer {entry.layer} is out of range: the model has layers 0-{n_layers - 1}")
        base = strategy.refine(meas, entry.measurement, entry.layer)
        for writer in _present_writers(ckpt, arch, entry.layer):
            _check_tensor(ckpt, writer, width)
            direction = _unit(_through_norm(ckpt, writer, base), entry.layer, entry.measurement)
            update = strategy.update_bias if writer.bias else strategy.update_weight
            edits[writer.name] = TensorEdit(
                writer.name, entry.layer, entry.measurement, writer.component, writer.axis,
                entry.scale_for(writer.component), direction, update,
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


def _check_tensor(ckpt: Checkpoint, writer: ResidualWriter, width: int) -> None:
    entry = ckpt.entry(writer.name)
    if entry.dtype not in FLOAT_DTYPES:
        raise AbliterateError(
            f"{writer.name} has dtype {entry.dtype}; only {', '.join(FLOAT_DTYPES)} tensors can be edited "
            "(quantized or integer weights are not supported)"
        )
    if writer.axis >= len(entry.shape) or entry.shape[writer.axis] != width:
        raise AbliterateError(
            f"{writer.name} has shape {list(entry.shape)}; expected the model width {width} on axis {writer.axis}"
        )
