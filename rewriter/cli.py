"""Command line: ``abliterate rewrite|plugins|inspect`` and the ``rewrite`` shortcut.

A user mistake becomes one line on stderr and exit status 1 (2 for bad usage), never a
traceback.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__
from .checkpoint import Checkpoint
from .directions import Measurements
from .errors import AbliterateError
from .plan import Plan, load_plan, parse_layer_specs
from .registry import Registry, describe


class Command(click.Command):
    """Turns AbliterateError (and a missing file) into a one-line error."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AbliterateError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:
            raise click.ClickException(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from None


class Group(click.Group):
    command_class = Command


def plugin_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "-p", "--plugin", "plugins", multiple=True, metavar="MODULE",
        help="Load a plugin module by import path (repeatable); '-p no:NAME' blocks a plugin, built-in ones too.",
    )(f)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="abliterate")
def main() -> None:
    """Directional ablation ("abliteration") of safetensors checkpoints, streamed tensor by
    tensor on a CPU, extended by plugins."""


@main.command("rewrite")
@click.argument("source", required=False)
@click.argument("output", required=False, type=click.Path(path_type=Path))
@click.option("-d", "--directions", type=click.Path(path_type=Path), help="Direction file from 'measure' (or the reference tool's measurement file).")
@click.option("--plan", "plan_file", type=click.Path(path_type=Path), help="Plan YAML: model, measurements, output, ablate: [{layer, measurement, scale}].")
@click.option("--layers", multiple=True, metavar="FIRST[-LAST]:MEASUREMENT", help="Edit these decoder layers with that measurement layer's direction; repeatable (e.g. --layers 11-23:23 --layers 24-41:29).")
@click.option("--scale", type=float, default=1.0, show_default=True, help="Strength alpha in [0, 1] for --layers.")
@click.option("--attn-scale", type=float, default=1.0, show_default=True, help="Extra factor for attention writers (o_proj) with --layers.")
@click.option("--mlp-scale", type=float, default=1.0, show_default=True, help="Extra factor for MLP writers (down_proj, experts) with --layers.")
@click.option("--strategy", default="norm-preserving", show_default=True, help="Edit strategy: standard, projected, biprojected, norm-preserving, or a plugin's.")
@click.option("--precision", type=click.Choice(["fp32", "fp64"]), default="fp32", show_default=True, help="Dtype of the edit arithmetic.")
@click.option("--dry-run", is_flag=True, help="Print what would be edited and write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace an output that holds a different rewrite.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Shards rewritten at once; each holds its own tensors in memory.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@plugin_option
@click.pass_context
def rewrite_cmd(ctx: click.Context, source: str | None, output: Path | None, directions: Path | None, plan_file: Path | None,
                layers: tuple[str, ...], scale: float, attn_scale: float, mlp_scale: float, strategy: str,
                precision: str, dry_run: bool, overwrite: bool, workers: int, quiet: bool, plugins: tuple[str, ...]) -> None:
    """Write an abliterated copy of the checkpoint SOURCE into OUTPUT.

    SOURCE is a directory with model.safetensors or an index and shards. Tensors are
    streamed one at a time: planned residual writers (o_proj, down_proj, their biases)
    are edited in fp32, all else is copied byte for byte. The source is never written;
    a rerun into the same OUTPUT resumes, skipping verified finished shards.

    \b
    Strategies (see method.md):
      standard         r = harmful mean - harmless mean;   W -= a r r^T W
      projected        r without its harmless part at the measurement layer
      biprojected      ... and at the target layer
      norm-preserving  biprojected r; column directions edited, norms kept
    """
    plan = _plan(ctx, plan_file, layers, scale, attn_scale, mlp_scale)
    source = source or plan.model
    output = output or (Path(plan.output) if plan.output else None)
    directions = directions or (Path(plan.measurements) if plan.measurements else None)
    if not source:
        raise AbliterateError("no SOURCE checkpoint given (argument or the plan's 'model')")
    if directions is None:
        raise AbliterateError("no direction file given (--directions or the plan's 'measurements')")
    if output is None and not dry_run:
        raise AbliterateError("no OUTPUT directory given (argument or the plan's 'output')")
    from .pipeline import prepare

    job = prepare(source, output, directions, plan, strategy, precision=precision, registry=Registry(plugins))
    if dry_run:
        for line in job.describe():
            click.echo(line)
        return
    assert output is not None
    summary = job.run(output, overwrite=overwrite, progress=not quiet, workers=workers)
    for line in summary.lines():
        click.echo(line)
    click.echo(f"output: {output}")


@main.command("verify")
@click.argument("source")
@click.argument("output", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-d", "--directions", type=click.Path(path_type=Path), help="The direction file the rewrite used.")
@click.option("--plan", "plan_file", type=click.Path(path_type=Path), help="The plan the rewrite used.")
@click.option("--layers", multiple=True, metavar="FIRST[-LAST]:MEASUREMENT", help="The --layers the rewrite used.")
@click.option("--scale", type=float, default=1.0, show_default=True)
@click.option("--attn-scale", type=float, default=1.0, show_default=True)
@click.option("--mlp-scale", type=float, default=1.0, show_default=True)
@click.option("--strategy", default="norm-preserving", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp64"]), default="fp32", show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@plugin_option
@click.pass_context
def verify_cmd(ctx: click.Context, source: str, output: Path, directions: Path | None, plan_file: Path | None,
               layers: tuple[str, ...], scale: float, attn_scale: float, mlp_scale: float, strategy: str,
               precision: str, quiet: bool, plugins: tuple[str, ...]) -> None:
    """Check, streaming, that OUTPUT is SOURCE rewritten by this plan: untouched tensors
    byte-identical, edited ones equal to a fresh edit and true to the strategy's
    invariants (r^T W' = 0 at scale 1; column norms kept by norm-preserving), index,
    other files and manifest complete. Run it before publishing. Exit 1 on any problem."""
    from .pipeline import prepare
    from .verify import verify

    plan = _plan(ctx, plan_file, layers, scale, attn_scale, mlp_scale)
    directions = directions or (Path(plan.measurements) if plan.measurements else None)
    if directions is None:
        raise AbliterateError("no direction file given (--directions or the plan's 'measurements')")
    registry = Registry(plugins)
    job = prepare(source, None, directions, plan, strategy, precision=precision, registry=registry)
    problems = list(verify(job, registry.strategy(strategy), output, progress=not quiet))
    for line in problems:
        click.echo(line)
    if problems:
        raise AbliterateError(f"verify: {len(problems)} problem{'s' if len(problems) > 1 else ''} in {output}")
    click.echo(f"verified: {len(job.edits)} edited tensors and every other byte of {output}")


def _plan(ctx: click.Context, plan_file: Path | None, layers: tuple[str, ...], scale: float,
          attn_scale: float, mlp_scale: float) -> Plan:
    if plan_file and layers:
        raise AbliterateError("give either --plan or --layers, not both")
    if plan_file:
        given = [f"--{n.replace('_', '-')}" for n in ("scale", "attn_scale", "mlp_scale")
                 if ctx.get_parameter_source(n) is click.core.ParameterSource.COMMANDLINE]
        if given:
            raise AbliterateError(f"{', '.join(given)} apply to --layers; put scales in the plan file")
        return load_plan(plan_file)
    return parse_layer_specs(layers, scale, {"attention": attn_scale, "mlp": mlp_scale})


@main.command("plugins")
@plugin_option
def plugins_cmd(plugins: tuple[str, ...]) -> None:
    """List registered architectures and strategies, and which plugin provides each."""
    for line in describe(Registry(plugins)):
        click.echo(line)


@main.command("inspect")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--layer", type=int, default=0, show_default=True, help="Layer whose residual writers are listed.")
@plugin_option
def inspect_cmd(path: Path, layer: int, plugins: tuple[str, ...]) -> None:
    """Describe a checkpoint directory (architecture, width, layers, shards, writers)
    or a direction file (layers, width, prompt counts, metadata)."""
    if path.is_dir():
        _inspect_checkpoint(path, layer, Registry(plugins))
    else:
        _inspect_directions(path)


def _inspect_checkpoint(path: Path, layer: int, registry: Registry) -> None:
    ckpt = Checkpoint.open(path)
    arch = registry.architecture_for(ckpt.config, ckpt.names)
    dtypes: dict[str, int] = {}
    for s in ckpt.shards:
        for e in s.header.entries:
            dtypes[e.dtype] = dtypes.get(e.dtype, 0) + 1
    click.echo(f"checkpoint: {ckpt.root}")
    click.echo(f"architecture: {arch.name} (model_type {ckpt.config.get('model_type')})")
    click.echo(f"decoder layers: {arch.num_layers(ckpt.config)}; width: {arch.hidden_size(ckpt.config)}")
    click.echo(f"shards: {len(ckpt.shards)}; tensors: {len(ckpt.names)}; bytes: {ckpt.data_bytes:,}")
    click.echo("dtypes: " + ", ".join(f"{k} x{v}" for k, v in sorted(dtypes.items())))
    click.echo(f"residual writers of layer {layer}:")
    for w in arch.residual_writers(layer, ckpt.config, ckpt.names):
        state = f"{list(ckpt.entry(w.name).shape)} {ckpt.entry(w.name).dtype}" if w.name in ckpt.names else (
            "MISSING" if w.required else "absent (optional)")
        click.echo(f"  {w.component:<9} {w.name}  {state}")


def _inspect_directions(path: Path) -> None:
    m = Measurements.load(path)
    click.echo(f"direction file: {path}")
    click.echo(f"layers: {len(m.layers)} ({m.layers[0]}-{m.layers[-1]}); width: {m.width}")
    click.echo(f"prompts: harmful {m.harmful_count}, harmless {m.harmless_count}")
    for k in sorted(m.metadata):
        click.echo(f"  {k}: {m.metadata[k]}")


def rewrite_main() -> None:
    """The ``rewrite`` console script: the same command as ``abliterate rewrite``."""
    rewrite_cmd.main(prog_name="rewrite")
