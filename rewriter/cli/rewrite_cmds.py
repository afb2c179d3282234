"""``rewrite``, ``verify`` and ``push``: the streaming rewrite, its check, its publication."""
from __future__ import annotations

import shutil
from pathlib import Path

import click

from ..errors import AbliterateError
from ..io.files import DOWNLOAD_DIR
from ..io.manifest import MANIFEST_NAME
from ..plan import Plan, PlanEntry
from .base import (command, one_line, plan_from_options, plan_options, plugin_option, quiet_option, read_card_eval,
                   with_option_flags)

DEFAULT_STRATEGY = "norm-preserving"


@command("rewrite")
@click.argument("source", required=False)
@click.argument("output", required=False, type=click.Path(path_type=Path))
@plan_options
@click.option("--dry-run", is_flag=True, help="Print what would be edited and write nothing.")
@click.option("--overwrite", is_flag=True, help="Replace an output that holds a different rewrite by this tool "
                                                "(files this tool did not write are never deleted: the run stops and lists them).")
@click.option("--output-format", type=click.Choice(["same", "bf16"]), default="same", show_default=True,
              help="For a quantized SOURCE (FP8, MXFP4): 'same' re-encodes the edited weights in their format with "
                   "fresh scales and copies the rest; 'bf16' writes every quantized weight out in bfloat16 and drops "
                   "the quantization config, for a plain checkpoint.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Shards rewritten at once; each holds about twice the largest edited tensor in float32 (five "
                   "times for a quantized one). Default: one per two cores (one per core for a quantized SOURCE, "
                   "whose re-encoding computes more than it writes), at most one per shard and what half the "
                   "available memory holds.")
@click.option("--edit-threads", type=click.IntRange(min=1), default=None,
              help="Threads per worker that edit a tensor's column chunks at once (the output's bits do not depend "
                   "on it). Default: the cores the workers leave over, so that a checkpoint with few shards still "
                   "uses every core.")
@click.option("--low-disk", is_flag=True, help="Hub source: download one shard at a time into OUTPUT/" + DOWNLOAD_DIR
                                               + " and delete it once rewritten (instead of the HF cache).")
@click.option("--push-to", metavar="ORG/NAME", help="Publish to this Hub repo: shards upload as they are finished, then "
                                                     "one commit with index, configs, plan, direction file and model card.")
@click.option("--private/--public", default=True, show_default=True, help="Visibility of a repo that --push-to creates.")
@click.option("--card-eval", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="'evaluate --json' output whose numbers go into the model card.")
@quiet_option
@plugin_option
@click.pass_context
def rewrite_cmd(ctx: click.Context, source: str | None, output: Path | None, directions: Path | None,
                plan_file: Path | None, layers: tuple[str, ...], scale: float, component_scales: tuple[str, ...],
                attn_scale: float | None, mlp_scale: float | None, strategy: str | None, direction: str | None,
                ensemble: bool | None, invert: bool | None, sparsity: float | None, precision: str | None, dry_run: bool, overwrite: bool, output_format: str, workers: int | None,
                edit_threads: int | None, low_disk: bool, push_to: str | None, private: bool,
                card_eval: Path | None, quiet: bool, plugins: tuple[str, ...]) -> None:
    """Write an abliterated copy of the checkpoint SOURCE into OUTPUT.

    SOURCE is a directory with model.safetensors or an index and shards, an example
    model's name, or a Hub repo ORG/NAME[@REVISION] (fetched shard by shard; HF_ENDPOINT
    and HF_TOKEN are honoured, and the token is never printed or written). Tensors are
    streamed one at a time: the planned residual writers that the architecture map names
    (attention and MLP outputs, experts, their biases) are edited in --precision
    arithmetic, all else is copied byte for byte. The source is never written; a rerun
    into the same OUTPUT resumes, keeping the shards it finished.

    A quantized SOURCE (block FP8, compressed-tensors FP8, MXFP4: see 'abliterate
    plugins') is edited weight by weight in float32 and re-encoded in its own format, with
    rounding that keeps the removed direction out; GPTQ, AWQ, bitsandbytes and GGUF
    checkpoints must be dequantized first.

    A plan file that names a strategy (optimize's and run's do: the one it was chosen
    with) is rewritten with it unless --strategy says otherwise. The strategies, the
    axes and the layer indexing are explained in docs/method.md in the project
    repository.
    """
    plan = plan_from_options(ctx, plan_file, layers, scale, component_scales, attn_scale, mlp_scale)
    if plan is None:
        raise AbliterateError("the plan edits no layer: give --plan or --layers")
    source = source or plan.model
    output = output or (Path(plan.output) if plan.output else None)
    directions = directions or (Path(plan.measurements) if plan.measurements else None)
    if not source:
        raise AbliterateError("no SOURCE checkpoint given (argument or the plan's 'model')")
    if directions is None:
        raise AbliterateError("no direction file given (--directions or the plan's 'measurements')")
    if output is None and not dry_run:
        raise AbliterateError("no OUTPUT directory given (argument or the plan's 'output')")
    from ..io.publish import Publisher, publish
    from ..lab.example_models import resolve_source
    from ..pipeline import prepare
    from ..registry import Registry

    download_dir = output / DOWNLOAD_DIR if low_disk and output is not None else None
    job = prepare(resolve_source(source), output, directions, plan, strategy or plan.strategy or DEFAULT_STRATEGY,
                  precision=precision or "float32", registry=Registry(plugins), download_dir=download_dir,
                  output_format=output_format)
    if dry_run:
        for line in job.describe():
            click.echo(line)
        if push_to:
            click.echo(f"would push to {push_to} ({'private' if private else 'public'})")
        return
    assert output is not None
    for note in job.notes:
        click.echo(f"note: {note}", err=True)
    evaluation = read_card_eval(card_eval)  # checked before the rewrite, not after it
    publisher = Publisher(push_to, private=private, log=lambda s: click.echo(s, err=True)) if push_to else None
    if publisher:
        publisher.start()  # fails fast on bad credentials, before any work
    summary = job.run(output, overwrite=overwrite, progress=not quiet, workers=workers, edit_threads=edit_threads,
                      on_shard=publisher.shard_done if publisher else None)
    if download_dir is not None:
        shutil.rmtree(download_dir, ignore_errors=True)
    for line in summary.lines():
        click.echo(line)
    click.echo(f"output: {output}")
    if publisher and push_to:
        commit = publish(output, publisher=publisher, base_model=job.ckpt.origin and job.ckpt.origin["repo"],
                         directions=directions, evaluation=evaluation)
        click.echo(f"pushed to {push_to} (commit {commit})")


@command("push")
@click.argument("output", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("repo")
@click.option("-d", "--directions", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The direction file used; uploaded beside the model (checked by hash).")
@click.option("--base-model", help="Base model id for the card (default: the Hub source recorded in the manifest).")
@click.option("--private/--public", default=True, show_default=True, help="Visibility of a repo this creates.")
@click.option("--card-eval", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="'evaluate --json' output for the model card.")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded and upload nothing.")
def push_cmd(output: Path, repo: str, directions: Path | None, base_model: str | None, private: bool,
             card_eval: Path | None, dry_run: bool) -> None:
    """Publish a finished rewrite OUTPUT to the Hub repo REPO (ORG/NAME).

    Only the files the rewrite wrote, as its manifest records them, are uploaded. Shards
    are pre-uploaded one by one, then one commit adds the index, configs, plan, direction
    file and model card, so a reader never sees an index pointing at missing shards.
    Rerunning skips files the Hub already has. Repos are created private unless
    --public: an abliterated model should be looked at before the world sees it.
    """
    from ..io.publish import Publisher, publish

    evaluation = read_card_eval(card_eval)  # every input checked before anything is said or sent
    publisher = Publisher(repo, private=private, dry_run=dry_run, log=lambda s: click.echo(s, err=not dry_run))
    publisher.start()
    commit = publish(output, publisher=publisher, base_model=base_model, directions=directions, evaluation=evaluation)
    if commit:
        click.echo(f"pushed {output} to {repo} (commit {commit})")


@command("verify")
@click.argument("source")
@click.argument("output")
@plan_options
@click.option("--ulps", type=click.IntRange(min=0),
              help="Allowed distance of an edited element from its recomputed value, in units in the last place "
                   "(default: 0, bit for bit, when this torch version wrote OUTPUT; else 2).")
@click.option("--low-disk", is_flag=True,
              help="Hold at most one weight shard of each Hub repo on disk, in a temporary folder, each deleted once "
                   "checked (instead of the Hugging Face cache).")
@quiet_option
@plugin_option
@click.pass_context
def verify_cmd(ctx: click.Context, source: str, output: str, directions: Path | None, plan_file: Path | None,
               layers: tuple[str, ...], scale: float, component_scales: tuple[str, ...], attn_scale: float | None,
               mlp_scale: float | None, strategy: str | None, direction: str | None, ensemble: bool | None,
               invert: bool | None, sparsity: float | None, precision: str | None, ulps: int | None, low_disk: bool,
               quiet: bool, plugins: tuple[str, ...]) -> None:
    """Check, streaming, that OUTPUT is SOURCE rewritten as recorded: untouched tensors
    byte-identical, edited ones equal bit for bit to a fresh edit of the source and true
    to the strategy's invariants, index, other files and manifest complete. Run it
    before publishing, or on anyone's published abliteration. Exit 1 on any problem.

    SOURCE (the base) and OUTPUT may each be a Hub repo ORG/NAME[@REVISION]: both are read
    shard by shard. The plan, strategy, precision and direction file are read from
    OUTPUT's record (abliteration.json); a published repo's own directions.safetensors
    is used, and must match the hash its record names. A repo without a record, or
    whose direction file does not match it, is unverifiable. Give --plan, --layers or
    --directions to check OUTPUT against something else.
    """
    from ..lab.example_models import resolve_source
    from ..pipeline import prepare
    from ..registry import Registry
    from ..verify import HubOutput, allowed_ulps, open_published, verify

    with open_published(output, low_disk) as (published, download_dir):
        record = published.manifest()
        if record is None and isinstance(published, HubOutput):
            raise AbliterateError(f"{published.name} is unverifiable: it has no {MANIFEST_NAME} record of the edit")
        written = (record or {}).get("fingerprint") or {}
        plan = (plan_from_options(ctx, plan_file, layers, scale, component_scales, attn_scale, mlp_scale)
                or with_option_flags(ctx, _recorded_plan(published.name, written)))
        directions = directions or (Path(plan.measurements) if plan.measurements else None)
        if directions is None and isinstance(published, HubOutput) and record is not None:
            directions = published.directions(record)
        directions = directions or _recorded(record or {}, "directions")
        if directions is None:
            raise AbliterateError("no direction file given (--directions or the plan's 'measurements')")
        job = prepare(resolve_source(source), None, directions, plan,
                      strategy or plan.strategy or written.get("strategy") or DEFAULT_STRATEGY,
                      precision=precision or written.get("precision") or "float32", registry=Registry(plugins),
                      output_format=str(written.get("output_format") or "same"), download_dir=download_dir)
        allowed = allowed_ulps(record) if ulps is None else ulps
        problems = list(verify(job, published, ulps=allowed, progress=not quiet))
    for line in problems:
        click.echo(one_line(line))
    if problems:
        raise AbliterateError(f"verify: {len(problems)} problem{'s' if len(problems) > 1 else ''} in {published.name}")
    how = "bit for bit" if allowed == 0 else f"within {allowed} ulps"
    click.echo(f"verified ({job.strategy.name}, {len(job.edits)} edited tensors {how}) and every other byte of "
               f"{published.name}")
    origin = job.ckpt.origin
    base = f"{origin['repo']} at {origin['revision']}" if origin else source
    click.echo(one_line(f"{published.name} is {base} with the recorded edit and nothing else"))


def _recorded_plan(output: str, fingerprint: dict[str, object]) -> Plan:
    entries = fingerprint.get("plan")
    if not isinstance(entries, list) or not entries:
        raise AbliterateError(f"{output} records no plan; give --plan or --layers")
    try:
        return Plan(tuple(PlanEntry.from_dict(e, f"{output}: recorded plan") for e in entries))
    except AbliterateError as exc:
        raise AbliterateError(f"{output}: the recorded plan is malformed ({exc}); give --plan or --layers") from None


def _recorded(record: dict[str, object], key: str) -> Path | None:
    value = (record.get("record") or {}).get(key) if isinstance(record.get("record"), dict) else None
    return Path(value) if isinstance(value, str) else None
