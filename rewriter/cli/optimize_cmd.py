"""``optimize``: search the plan by measured refusals and KL, then evaluate the chosen one."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ..errors import AbliterateError
from ..io.files import write_atomic
from ..plan import Plan
from .base import command, plugin_option, quiet_option
from .options import max_prompt_tokens_option


@command("optimize")
@click.argument("model")
@click.option("-d", "--directions", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Direction file from 'measure'.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the chosen plan (YAML that 'rewrite --plan' takes unchanged).")
@click.option("--trials", type=click.IntRange(min=1), default=60, show_default=True, help="Trials in all (a resumed study counts its earlier ones).")
@click.option("--timeout", type=click.FloatRange(min=1), help="Stop starting trials after this many seconds.")
@click.option("--max-kl", type=float, default=0.05, show_default=True, help="The chosen plan is the lowest refusal score with first-token KL at most this.")
@click.option("--study", type=click.Path(dir_okay=False, path_type=Path), help="SQLite file that keeps the study; rerunning with it resumes.")
@click.option("--strategy", "strategies", multiple=True, help="Strategies to search (repeatable; default: the four built-ins).")
@click.option("--search-prompts", type=click.IntRange(min=4), default=32, show_default=True,
              help="Prompts of each measurement half a trial is scored on (fewer: faster trials, noisier scores).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True, help="Answer length of the final evaluation.")
@click.option("--no-final-eval", is_flag=True, help="Skip the generation-based evaluation of the chosen plan.")
@click.option("--chart", type=click.Path(dir_okay=False, path_type=Path), help="PNG of the trials and the Pareto front (default: beside the plan).")
@click.option("--save", type=click.Path(dir_okay=False, path_type=Path), help="JSONL of the final evaluation's answers with their verdicts.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace a plan file at --output that optimize did not write "
                                               "(one it wrote is replaced anyway).")
@max_prompt_tokens_option
@quiet_option
@plugin_option
def optimize_cmd(model: str, directions: Path, output: Path, trials: int, timeout: float | None, max_kl: float,
                 study: Path | None, strategies: tuple[str, ...], search_prompts: int, max_new_tokens: int,
                 no_final_eval: bool, chart: Path | None, save: Path | None, seed: int, overwrite: bool,
                 max_prompt_tokens: int, quiet: bool, plugins: tuple[str, ...]) -> None:
    """Choose a plan for MODEL by measurement: a multi-objective search (Optuna TPE) over the
    measurement layer, the edited range, a weight profile per component (peak, position,
    floor, width) and the strategy. Each trial edits the loaded model in memory and is
    scored, without generation, by the refusal score on the measurement half of the
    built-in harmful prompts and the first-token KL on the measurement half of the
    harmless ones. The chosen plan (lowest refusal score with KL <= --max-kl) is then
    evaluated by generation on the held-out evaluation halves, with both marker sets.
    MODEL: a checkpoint directory, an example name or a Hub repo ORG/NAME[@REVISION]."""
    from ..lab.optimize import STRATEGIES, evaluate_plan, optimize, pareto_chart
    from ..lab.prompts import default_prompts
    from ..registry import Registry

    def log(line: str) -> None:
        click.echo(line, err=True)

    _check_replaceable(output, overwrite)

    harmful, harmless = default_prompts("harmful-measure")[:search_prompts], default_prompts("harmless-measure")[:search_prompts]
    outcome, scorer = optimize(model, directions, harmful, harmless, trials=trials, timeout=timeout, max_kl=max_kl,
                               study_path=study, seed=seed, strategies=strategies or STRATEGIES,
                               registry=Registry(plugins), progress=not quiet, max_prompt_tokens=max_prompt_tokens,
                               log=log)
    click.echo(f"{len(outcome.values)} trials in {outcome.seconds:.0f} s; Pareto front (refusal score vs KL):")
    click.echo(f"  {'trial':>5} {'score':>8} {'KL':>8}  strategy         measurement  layers")
    for f in outcome.front:
        click.echo(f"  {f['trial']:>5} {f['refusal_score']:>+8.3f} {f['kl']:>8.4f}  {f['strategy']:<16} "
                   f"{f['measurement']:>11}  {f['layers']}")
    if not outcome.feasible:
        click.echo(f"no trial reached KL <= {max_kl:g}; the plan with the lowest KL was chosen")
    plan = Plan(outcome.plan.entries, model=str(scorer.lm.path), measurements=str(directions))
    plan.save(output, WRITTEN_BY)
    layers = [e.layer for e in plan.entries]
    click.echo(f"chosen: trial {outcome.trial}, {outcome.strategy}, measurement {plan.entries[0].measurement}, "
               f"layers {min(layers)}-{max(layers)}; score {outcome.refusal_score:+.3f}, KL {outcome.kl:.4f} -> {output}")
    click.echo(f"rewrite with: abliterate rewrite {plan.model} OUTPUT --plan {output} --strategy {outcome.strategy}")
    chart = chart or output.with_suffix(".png")
    pareto_chart(outcome, chart, max_kl)
    click.echo(f"chart: {chart}")
    if no_final_eval:
        return
    final = evaluate_plan(scorer, outcome.plan, outcome.strategy, default_prompts("harmful-eval"),
                          default_prompts("harmless-eval"), max_new_tokens=max_new_tokens, progress=not quiet,
                          max_prompt_tokens=max_prompt_tokens, log=log)
    counts = ", ".join(f"{n} {name} markers" for name, n in final.refusals.items())
    click.echo(f"held-out evaluation: refusals {counts} of {final.prompts} (answers up to {max_new_tokens} tokens); "
               f"KL {final.kl:.4f}")
    if save:
        write_atomic(save, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in final.answers).encode())
        click.echo(f"answers: {save}")


WRITTEN_BY = "written by abliterate optimize"


def _check_replaceable(output: Path, overwrite: bool) -> None:
    """Before the search: a plan file optimize did not write (analyze's, a user's) is kept unless
    --overwrite says otherwise."""
    if overwrite or not output.exists():
        return
    try:
        ours = output.is_file() and not output.is_symlink() and output.read_bytes()[:64].startswith(f"# {WRITTEN_BY}".encode())
    except OSError:
        ours = False
    if not ours:
        raise AbliterateError(f"{output} exists and was not written by optimize; choose another --output "
                              "(e.g. beside analyze's heuristic.yml) or pass --overwrite")
