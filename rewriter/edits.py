"""Turn a plan into per-tensor edits, checking everything before a byte is written.

The result is a mapping from tensor name to a ready edit; the engine applies them and
knows nothing of plans, architectures or strategies.
"""
from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass

import torch

from .architecture import Architecture, Config, DeclaresLayer, ResidualWriter
from .directions import Measurements
from .dtypes import FLOAT_DTYPES
from .engine.edit import TensorEdit
from .errors import AbliterateError
from .io.checkpoint import Checkpoint
from .logical import LogicalTensors
from .plan import Plan, PlanEntry
from .strategy import Refine, Strategy


@dataclass(frozen=True)
class PlannedEdit(TensorEdit):
    """A tensor edit and where it came from in the plan."""

    layer: int = 0
    measurement: int = 0
    component: str = ""


def plan_edits(ckpt: Checkpoint, arch: Architecture, plan: Plan, meas: Measurements, strategy: Strategy,
               view: LogicalTensors | None = None, refines: Mapping[str, Refine] | None = None) -> dict[str, PlannedEdit]:
    """Every tensor edit the plan asks for, by logical tensor name, or the first problem as an AbliterateError.

    ``view`` folds a quantized checkpoint's parts (see ``rewriter.logical``); without one, the
    checkpoint must be a float one. ``refines`` holds, by strategy name, the direction
    refinements that plan entries name in ``direction``.
    """
    view = view or LogicalTensors.floats(ckpt)
    n_layers, width = arch.num_layers(ckpt.config), arch.hidden_size(ckpt.config)
    if meas.width != width:
        raise AbliterateError(f"direction width {meas.width} does not match the model width {width} ({arch.name})")
    plan.check(n_layers, arch.components)
    edits: dict[str, PlannedEdit] = {}
    for entry in sorted(plan.entries, key=lambda e: e.layer):
        refine = _refine(strategy, refines or {}, entry)
        refined = refine(meas.ensembled() if entry.ensemble else meas, entry.measurement, entry.layer)
        base = keep_largest(refined, entry.sparsity, entry.layer)
        for writer in _present_writers(ckpt, view.names, arch, entry.layer):
            shape = _check_tensor(ckpt, view, arch, writer, width)
            direction = _unit(_through_norm(ckpt, writer, base), entry.layer, entry.measurement)
            update = strategy.update_bias if writer.bias else strategy.update_weight
            edits[writer.name] = PlannedEdit(
                writer.name, writer.axis, entry.scale_for(writer.component), direction, update,
                stacked=len(shape) >= 3 and writer.axis != 0,
                layer=entry.layer, measurement=entry.measurement, component=writer.component,
            )
    return edits


def _refine(strategy: Strategy, refines: Mapping[str, Refine], entry: PlanEntry) -> Refine:
    if entry.direction is None:
        return strategy.refine
    if entry.direction not in refines:
        raise AbliterateError(f"layer {entry.layer}: direction '{entry.direction}' names no registered strategy")
    return refines[entry.direction]


def keep_largest(r: torch.Tensor, fraction: float, layer: int) -> torch.Tensor:
    """The plan's ``sparsity``: r with all but its ⌊fraction·d⌋ largest-magnitude components zeroed
    (ties at the threshold kept), as the reference tool's ``magnitude_sparsify``; 0 keeps r whole."""
    if fraction == 0:
        return r
    k = int(r.numel() * fraction)
    if k == 0:
        raise AbliterateError(f"layer {layer}: sparsity {fraction:g} keeps no component of a {r.numel()}-wide direction")
    threshold = torch.topk(r.abs(), k, sorted=False).values.min()
    return r * (r.abs() >= threshold)


def _present_writers(ckpt: Checkpoint, names: frozenset[str], arch: Architecture, layer: int) -> Iterator[ResidualWriter]:
    writers = arch.residual_writers(layer, ckpt.config, names)
    missing = [w.name for w in writers if w.required and w.name not in names]
    if missing:
        raise AbliterateError(
            f"layer {layer}: residual writer{'s' if len(missing) > 1 else ''} {_some(missing)} "
            f"not found in the checkpoint (architecture {arch.name})"
        )
    if not writers:
        raise AbliterateError(f"layer {layer}: architecture {arch.name} names no residual writers")
    _check_complete(ckpt.config, names, arch, layer, writers)
    return (w for w in writers if w.name in names)


def _check_complete(config: Config, names: frozenset[str], arch: Architecture, layer: int,
                    writers: list[ResidualWriter]) -> None:
    """Every tensor of a planned layer is a writer or declared not to be one; else nothing is written."""
    head = layer_prefix(arch, layer, config, names, writers) + "."
    declared = set(arch.non_writers(layer, config, names)) if isinstance(arch, DeclaresLayer) else set()
    known = declared | {w.name for w in writers}
    unknown = sorted(n for n in names if n.startswith(head) and n not in known)
    if unknown:
        raise AbliterateError(
            f"layer {layer}: architecture {arch.name} does not say whether {_some(unknown)} write into the "
            "residual stream; a map must name every tensor of a planned layer in residual_writers() or "
            "non_writers() (plugin hook abliterate_architectures; see rewriter.architecture)"
        )


def layer_prefix(arch: Architecture, layer: int, config: Config, names: Collection[str],
                 writers: list[ResidualWriter]) -> str:
    """The map's ``layer_prefix``, or else the one its writers' names share ('blocks.3' for
    writers all named 'blocks.3.<something>')."""
    if isinstance(arch, DeclaresLayer):
        return arch.layer_prefix(layer, config, names)
    mark = f".{layer}."
    heads = {w.name[: w.name.index(mark) + len(mark) - 1] for w in writers if mark in w.name}
    if len(heads) != 1 or any(mark not in w.name for w in writers):
        raise AbliterateError(f"architecture {arch.name}: its writers of layer {layer} share no '<prefix>{mark}' "
                              "name prefix; implement layer_prefix() and non_writers() (see rewriter.architecture)")
    return heads.pop()


def _some(names: list[str], shown: int = 6) -> str:
    """The first few names, and how many more: a message stays one readable line."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _through_norm(ckpt: Checkpoint, writer: ResidualWriter, r: torch.Tensor) -> torch.Tensor:
    """r * (offset + g) for a writer followed by a norm with gain g (a product over chained
    norms), else r."""
    if writer.output_norm is None:
        return r
    for norm in writer.output_norm.chain():
        if norm.name not in ckpt.names:
            raise AbliterateError(f"norm {norm.name} after {writer.name} not found in the checkpoint")
        gain = ckpt.tensor(norm.name).to(torch.float64)
        if gain.shape != r.shape:
            raise AbliterateError(f"norm {norm.name} has shape {tuple(gain.shape)}, expected ({r.shape[0]},)")
        r = r * (norm.offset + gain)
    return r


def _unit(r: torch.Tensor, layer: int, measurement: int) -> torch.Tensor:
    norm = torch.linalg.vector_norm(r)
    if not torch.isfinite(norm):
        raise AbliterateError(f"layer {layer}: direction from measurement {measurement} has NaN or inf values")
    if norm < 1e-12:
        raise AbliterateError(f"layer {layer}: direction from measurement {measurement} is zero")
    return r / norm


def _check_tensor(ckpt: Checkpoint, view: LogicalTensors, arch: Architecture, writer: ResidualWriter,
                  width: int) -> tuple[int, ...]:
    shape = view.shape(ckpt, writer.name)
    if writer.name not in view.packed and (entry := ckpt.entry(writer.name)).dtype not in FLOAT_DTYPES:
        raise AbliterateError(
            f"{writer.name} has dtype {entry.dtype_name}; only float16, bfloat16, float32 and float64 tensors, "
            "or the weights of a quantized format that a codec plugin reads, can be edited"
        )
    if writer.component not in arch.components:
        raise AbliterateError(f"{arch.name}: writer {writer.name} has component '{writer.component}', "
                              f"which the map does not declare ({', '.join(arch.components)})")
    if writer.axis >= len(shape) or shape[writer.axis] != width:
        raise AbliterateError(
            f"{writer.name} has shape {list(shape)}; expected the model width {width} on axis {writer.axis}"
        )
    if len(shape) == 3 and writer.axis != 0:
        _check_expert_width(ckpt.config, writer.name, shape, 3 - writer.axis)
    return shape


def _check_expert_width(config: Config, name: str, shape: tuple[int, ...], axis: int) -> None:
    """A fused-expert tensor's d_ff (``axis``: neither the expert nor the residual axis) must be an
    expert width the config declares (``moe_intermediate_size``, else ``intermediate_size``, at
    the top or in a sub-config): otherwise the config describes other weights, which transformers
    would refuse to load, and an edit along the right axis would hide the mismatch."""
    declared = [c.get("moe_intermediate_size") or c.get("intermediate_size")
                for c in (config, *(v for v in config.values() if isinstance(v, dict)))]
    widths = sorted({w for w in declared if isinstance(w, int) and not isinstance(w, bool)})  # (any JSON value)
    if widths and shape[axis] not in widths:
        raise AbliterateError(f"{name} has shape {list(shape)}: d_ff {shape[axis]} on axis {axis}, but config.json "
                              f"declares an expert width of {' or '.join(map(str, widths))}; the config does not "
                              "describe these weights")
