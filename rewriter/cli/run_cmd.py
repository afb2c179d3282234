"""``run``: the whole pipeline in one resumable command."""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import click

from ..lab.recipe import Recipe
from .base import command, quiet_option
from .lab_cmds import MemorySize
from .options import judge_options


@command("run")
@click.argument("model", required=False)
@click.option("-w", "--work", type=click.Path(path_type=Path),
              help="Work folder for every step's artifact (default: ./abliterate-NAME, NAME from MODEL). A rerun "
                   "with it resumes.")
@click.option("--recipe", "recipe_file", type=click.Path(dir_okay=False, path_type=Path),
              help="Take every choice from this recipe (the run.yml a run writes into its work folder); options "
                   "given on the command line, and MODEL, replace the recipe's.")
@click.option("--push-to", metavar="ORG/NAME", help="Publish the result to this Hub repo, with a model card that carries "
                                                     "the evaluation, the plan, the method, the provenance and how to verify it.")
@click.option("--private/--public", default=True, show_default=True, help="Visibility of a repo that --push-to creates.")
@click.option("--search/--no-search", default=False, show_default=True,
              help="Choose the plan by optimize's search where the model fits in memory (else, and by default, "
                   "analyze's heuristic plan).")
@click.option("--trials", type=click.IntRange(min=1), default=24, show_default=True, help="Trials of the search.")
@click.option("--max-kl", type=click.FloatRange(min=0, min_open=True), default=0.05, show_default=True,
              help="The search's cap on the KL divergence (on its own prompts).")
@click.option("--strategy", help="Edit strategy (default: a given plan's own, else norm-preserving); the search "
                                 "searches plans for it.")
@click.option("--directions", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Use this direction file instead of measuring.")
@click.option("--plan", "plan_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Use this plan instead of choosing one (its strategy too, unless --strategy).")
@click.option("--all-harmful", "refused_only", flag_value=False, default=True,
              help="Measure the harmful mean over every harmful prompt, not only those the model refuses.")
@click.option("--max-prompts", type=click.IntRange(min=1), help="At most this many prompts of each built-in set.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Longest answer generated per held-out harmful prompt in the evaluation.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--capability/--no-capability", default=True, show_default=True,
              help="The evaluation measures capability too: the KL over whole answers (teacher-forced on the "
                   "original's own greedy answers to the harmless prompts) and known-answer accuracy, both models.")
@judge_options
@click.option("--max-memory", type=MemorySize(),
              help="Memory the model may take (512MB, 1GB, 1GiB). One that does not fit is streamed layer by layer: "
                   "measured the same, the heuristic plan instead of a search, and evaluated by the refusal score "
                   "and KL without generation. Default: the memory available.")
@click.option("--low-disk", is_flag=True,
              help="A Hub model's shards are downloaded into the work folder one at a time for the rewrite and "
                   "verify, each deleted once used.")
@quiet_option
@click.pass_context
def run_cmd(ctx: click.Context, model: str | None, work: Path | None, recipe_file: Path | None, quiet: bool,
            **choices: Any) -> None:
    """From MODEL to a verified, evaluated (and with --push-to, published) abliteration,
    in one command; rerun it to resume.

    MODEL is a checkpoint folder, a Hub repo ORG/NAME[@REVISION] (pinned to the commit it
    resolves to), or an example model's name. The steps, each under its own heading with
    its time and what it wrote into the work folder:

    \b
      measure   directions.safetensors (measure --refused-only; streamed when the
                model does not fit; quantized checkpoints too)
      analyze   analysis.txt, layers.png, plan-heuristic.yml (analyze --suggest-plan)
      plan      plan.yml: optimize's with --search where the model fits, else the
                heuristic one; the file names the strategy it was chosen with
      rewrite   model/ (rewrite --plan plan.yml)
      verify    verify.txt (verify, bit for bit)
      evaluate  evaluation.json, answers-*.jsonl (refusals by both marker sets and
                --judge, KL, capability; both models)
      card      card.md (the model card)
      push      pushed.json (with --push-to; push)

    A step whose inputs (the choices that matter to it, the artifacts it reads) have not
    changed since it finished is skipped and says so; a changed input redoes it and every
    step after it. Every choice is written to run.yml in the work folder: --recipe run.yml
    runs a second model with the same settings, or repeats the run. A summary table ends
    the run; report.json holds it.
    """
    from ..lab.run import Run, summary_lines

    recipe = Recipe.load(recipe_file) if recipe_file else Recipe()
    given = {k: v for k, v in choices.items()
             if ctx.get_parameter_source(k) is click.core.ParameterSource.COMMANDLINE or not recipe_file}
    for key in ("directions", "plan_file"):
        if given.get(key) is not None:
            given[key] = str(given[key])
    given["plan"] = given.pop("plan_file", recipe.plan)
    recipe = dataclasses.replace(recipe, **given, model=model or recipe.model)
    if work is None and recipe.model is not None:
        work = Path("abliterate-" + (re.sub(r"[^\w.-]+", "-", recipe.model.split("@")[0].rstrip("/").split("/")[-1])
                                     .strip(".-") or "model"))
    report = Run(recipe, work or Path("abliterate-model"), progress=not quiet,
                 log=lambda s: click.echo(s, err=True)).go()
    for line in summary_lines(report):
        click.echo(line)
