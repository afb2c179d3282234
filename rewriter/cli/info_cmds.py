"""``plugins`` and ``inspect``: what is registered, and what a checkpoint, output or direction file holds."""
from __future__ import annotations

import json
from pathlib import Path

import click

from typing import TYPE_CHECKING

from ..errors import AbliterateError
from ..io.manifest import load_manifest
from .base import command, plugin_option

if TYPE_CHECKING:  # the modules themselves load torch: imported where a command runs
    from ..io.checkpoint import Checkpoint
    from ..logical import LogicalTensors
    from ..registry import Registry


@command("plugins")
@plugin_option
def plugins_cmd(plugins: tuple[str, ...]) -> None:
    """List registered architectures and strategies, and which plugin provides each."""
    from ..registry import Registry, describe

    for line in describe(Registry(plugins)):
        click.echo(line)


@command("inspect")
@click.argument("path")
@click.option("--layer", type=int, default=0, show_default=True, help="Layer whose residual writers are listed.")
@plugin_option
def inspect_cmd(path: str, layer: int, plugins: tuple[str, ...]) -> None:
    """Describe a checkpoint directory, example model name or Hub repo ORG/NAME[@REVISION]
    (architecture, width, layers, components, shards, writers; for a rewrite's output, its
    record too; a Hub repo's shard headers are read by range requests, no weights
    downloaded) or a direction file (layers, width, prompt counts, metadata)."""
    from ..io.checkpoint import Checkpoint
    from ..io.hub import open_hub_checkpoint, parse_spec
    from ..lab.example_models import resolve_source
    from ..registry import Registry

    target = Path(resolve_source(path))
    spec = parse_spec(path)
    if spec is not None:
        _inspect_checkpoint(open_hub_checkpoint(*spec), layer, Registry(plugins))
    elif not target.exists():
        raise AbliterateError(f"not found: {path} (a checkpoint directory, an example model name, a Hub repo "
                              "ORG/NAME, or a direction file)")
    elif target.is_dir():
        _inspect_checkpoint(Checkpoint.open(target), layer, Registry(plugins))
    else:
        _inspect_directions(target)


def _inspect_checkpoint(ckpt: Checkpoint, layer: int, registry: Registry) -> None:
    from ..logical import LogicalTensors

    view = LogicalTensors.of(ckpt, registry)
    arch = registry.architecture_for(ckpt.config, view.names)
    n_layers = arch.num_layers(ckpt.config)
    if not 0 <= layer < n_layers:
        raise AbliterateError(f"--layer {layer} is out of range: the model has layers 0-{n_layers - 1}")
    dtypes: dict[str, int] = {}
    for s in ckpt.shards:
        for e in s.header.entries:
            dtypes[e.dtype_name] = dtypes.get(e.dtype_name, 0) + 1
    click.echo(f"checkpoint: {ckpt.root}")
    click.echo(f"architecture: {arch.name} (model_type {ckpt.config.get('model_type')})")
    click.echo(f"decoder layers: {n_layers}; width: {arch.hidden_size(ckpt.config)}")
    click.echo(f"components: {', '.join(arch.components)}")
    click.echo(f"shards: {len(ckpt.shards)}; tensors: {len(ckpt.names)}; bytes: {ckpt.data_bytes:,}")
    click.echo("dtypes: " + ", ".join(f"{k} x{v}" for k, v in sorted(dtypes.items())))
    if view.codec is not None:
        click.echo(f"quantized: {view.codec.name} ({len(view.packed)} weights stored as packed values and scales)")
    click.echo(f"residual writers of layer {layer}:")
    absent = 0
    for w in arch.residual_writers(layer, ckpt.config, view.names):
        if w.name not in view.names and not w.required:
            absent += 1  # optional writers (biases) this checkpoint does not have: counted, not listed
            continue
        state = _stored_as(ckpt, view, w.name) if w.name in view.names else "MISSING"
        click.echo(f"  {w.component:<9} {w.name}  {state}")
    if absent:
        click.echo(f"  ({absent} optional writer{'s' if absent > 1 else ''}, e.g. biases, not in this checkpoint)")
    manifest = load_manifest(ckpt.root)
    if manifest is not None:
        _echo_record(manifest)


def _stored_as(ckpt: Checkpoint, view: LogicalTensors, name: str) -> str:
    """'[shape] dtype', or for a quantized weight its logical shape and its parts."""
    packed = view.packed.get(name)
    if packed is None:
        entry = ckpt.entry(name)
        return f"{list(entry.shape)} {entry.dtype_name}"
    parts = ", ".join(f"{p.rsplit('.', 1)[-1]} {ckpt.entry(p).dtype_name}" for p in packed.parts)
    return f"{list(packed.shape)} quantized ({parts})"


def _echo_record(manifest: dict[str, object]) -> None:
    fp = manifest.get("fingerprint") if isinstance(manifest.get("fingerprint"), dict) else {}
    record = manifest.get("record") if isinstance(manifest.get("record"), dict) else {}
    click.echo(f"rewrite record ({'complete' if manifest.get('complete') else 'NOT complete'}):")
    click.echo(f"  strategy: {fp.get('strategy')}; precision: {fp.get('precision')}")
    click.echo(f"  source: {record.get('source')}; directions: {record.get('directions')}")
    plan = [e for e in fp.get("plan") or [] if isinstance(e, dict)]
    click.echo(f"  plan: {len(plan)} layers: {_compact(plan)}")
    click.echo(f"  tool: abliterate-rewriter {manifest.get('tool_version')}, torch {record.get('torch_version')}")


def _compact(plan: list[dict[str, object]]) -> str:
    """Runs of consecutive layers with the same measurement and scales: '6-23 from 22 at 1 (mlp 0.5)'."""
    runs: list[list[object]] = []
    for e in plan:
        key = (e.get("measurement"), e.get("scale"), json.dumps(e.get("components") or {}, sort_keys=True))
        if runs and runs[-1][2] == key and runs[-1][1] == e.get("layer", 0) - 1:  # type: ignore[operator]
            runs[-1][1] = e.get("layer")
        else:
            runs.append([e.get("layer"), e.get("layer"), key])
    parts = []
    for first, last, (measurement, scale, components) in runs:  # type: ignore[misc]
        span = f"{first}" if first == last else f"{first}-{last}"
        extra = "" if components == "{}" else f" {components}"
        parts.append(f"{span} from {measurement} at {scale:g}{extra}")
    return "; ".join(parts)


def _inspect_directions(path: Path) -> None:
    from ..directions import Measurements

    m = Measurements.load(path)
    click.echo(f"direction file: {path}")
    click.echo(f"model: {m.metadata.get('model', 'unknown')}")
    stored = m.reference.dtype if m.reference is not None else "float64"
    click.echo(f"layers: {len(m.layers)} ({m.layers[0]}-{m.layers[-1]}); width: {m.width}; means stored as {stored}")
    if m.reference is not None:
        click.echo(f"written by llm-abliteration's measure.py: harmful_N, harmless_N, refuse_N, refusenorm_N in "
                   f"{m.reference.dtype}; refusenorm_N: {m.metadata.get('refusenorm')}")
    else:
        click.echo(f"prompts: harmful {m.harmful_count}, harmless {m.harmless_count}")
    labels = {"dtype": "model run dtype"}
    for k in sorted(set(m.metadata) - {"model", "refusenorm"}):
        click.echo(f"  {labels.get(k, k)}: {m.metadata[k]}")
