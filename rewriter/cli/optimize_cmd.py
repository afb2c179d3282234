"""``optimize``: search the plan by measured refusals and KL, then evaluate the chosen one; the
search in several processes (``--jobs``) or on several machines (one ``--study``)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import click

from ..errors import AbliterateError
from ..io.files import write_atomic
from ..plan import Plan
from .base import command, plugin_option, quiet_option
from .options import judge_options, max_prompt_tokens_option


@command("optimize")
@click.argument("model")
@click.option("-d", "--directions", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="Direction file from 'measure'.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the chosen plan (YAML that 'rewrite --plan' takes unchanged).")
@click.option("--trials", type=click.IntRange(min=1), default=60, show_default=True, help="Trials in all (a resumed study counts its earlier ones).")
@click.option("--timeout", type=click.FloatRange(min=1), help="Stop starting trials after this many seconds.")
@click.option("--max-kl", type=float, default=0.05, show_default=True, help="The chosen plan is the lowest refusal score with first-token KL at most this.")
@click.option("--study", metavar="STORAGE",
              help="Where the study is kept: an SQLite file (study.db or sqlite:///PATH), a database URL "
                   "(postgresql://..., mysql+pymysql://...), a journal file (journal:PATH or PATH.log, for shared "
                   "file systems) or redis://...; rerunning resumes it, and optimize processes started with the "
                   "same one (here or on other machines) share its trials.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes on this machine, each with its share of the cores (without --study they "
                   "share a temporary journal).")
@click.option("--threads", type=click.IntRange(min=1), help="Torch threads of each process that runs trials "
                                                             "(default: all cores, or their share under --jobs).")
@click.option("--report", is_flag=True, help="Run no trial: write the plan, the Pareto table and the chart from "
                                             "the --study as it stands.")
@click.option("--no-prefix-cache", is_flag=True, help="Score every trial with full forward passes, not resumed "
                                                      "after its unedited layers (same scores; for comparison).")
@click.option("--worker", is_flag=True, hidden=True, help="Run trials only (what --jobs starts).")
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
@judge_options
@max_prompt_tokens_option
@quiet_option
@plugin_option
def optimize_cmd(model: str, directions: Path, output: Path, trials: int, timeout: float | None, max_kl: float,
                 study: str | None, jobs: int, threads: int | None, report: bool, no_prefix_cache: bool, worker: bool,
                 strategies: tuple[str, ...], search_prompts: int, max_new_tokens: int, no_final_eval: bool,
                 chart: Path | None, save: Path | None, seed: int, overwrite: bool, max_prompt_tokens: int,
                 judge: str | None, judge_label: str | None, judge_batch_size: int, quiet: bool,
                 plugins: tuple[str, ...]) -> None:
    """Choose a plan for MODEL by measurement: a multi-objective search (Optuna TPE) over the
    measurement layer, the edited range, a weight profile per component (peak, position,
    floor, width) and the strategy. Each trial edits the loaded model in memory and is
    scored, without generation, by the refusal score on the measurement half of the
    built-in harmful prompts and the first-token KL on the measurement half of the
    harmless ones. The chosen plan (lowest refusal score with KL <= --max-kl) is then
    evaluated by generation on the held-out evaluation halves, with both marker sets (and
    --judge). Processes with the same --study share its trials until it has --trials of them.
    MODEL: a checkpoint directory, an example name or a Hub repo ORG/NAME[@REVISION]."""
    import torch

    from ..lab.judge import check_judge
    from ..lab.optimize import STRATEGIES, Search, evaluate_plan, pareto_chart
    from ..lab.prompts import default_prompts
    from ..registry import Registry

    def log(line: str) -> None:
        click.echo(line, err=True)

    if report and study is None:
        raise AbliterateError("--report reads the study of --study; name one")
    if not worker:
        _check_replaceable(output, overwrite)
    spec = check_judge(judge, judge_label) if judge and not (worker or no_final_eval) else None
    if threads:
        torch.set_num_threads(threads)
    start = time.monotonic()
    harmful, harmless = default_prompts("harmful-measure")[:search_prompts], default_prompts("harmless-measure")[:search_prompts]
    with tempfile.TemporaryDirectory(prefix="abliterate-optimize-") if jobs > 1 else nullcontext("") as tmp:
        if jobs > 1 and study is None:
            study = f"journal:{tmp}/study.log"
        search = Search.open(model, directions, harmful, harmless, trials=trials, study=study, seed=seed,
                             strategies=strategies or STRATEGIES, registry=Registry(plugins),
                             max_prompt_tokens=max_prompt_tokens, create=not report)
        scorer_args: dict[str, Any] = dict(prefix_cache=not no_prefix_cache, max_prompt_tokens=max_prompt_tokens, log=log)
        scorer = None
        if jobs > 1 and not report:
            assert study is not None
            worker_args = [model, "-d", str(directions), "-o", str(output), "--study", study, "--trials", str(trials),
                           "--search-prompts", str(search_prompts), "--max-prompt-tokens", str(max_prompt_tokens),
                           *(["--timeout", str(timeout)] if timeout else []), *(["--no-prefix-cache"] * no_prefix_cache),
                           *[a for s in strategies for a in ("--strategy", s)],
                           *[a for p in plugins for a in ("--plugin", p)]]
            _run_workers(search.study, worker_args, jobs, threads, seed, trials, Path(tmp), progress=not quiet)
        elif not report:
            scorer = search.scorer(harmful, harmless, **scorer_args)
            search.run(scorer, trials, timeout, not quiet, max_kl)
        if worker:
            return
        outcome = search.outcome(max_kl, time.monotonic() - start)
    click.echo(f"{len(outcome.values)} trials in {outcome.seconds:.0f} s; Pareto front (refusal score vs KL):")
    click.echo(f"  {'trial':>5} {'score':>8} {'KL':>8}  strategy         measurement  layers")
    for f in outcome.front:
        click.echo(f"  {f['trial']:>5} {f['refusal_score']:>+8.3f} {f['kl']:>8.4f}  {f['strategy']:<16} "
                   f"{f['measurement']:>11}  {f['layers']}")
    if not outcome.feasible:
        click.echo(f"no trial reached KL <= {max_kl:g}; the plan with the lowest KL was chosen")
    plan = Plan(outcome.plan.entries, model=str(search.path), measurements=str(directions), strategy=outcome.strategy)
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
    scorer = scorer or search.scorer(harmful, harmless, **scorer_args)
    final = evaluate_plan(scorer, outcome.plan, outcome.strategy, default_prompts("harmful-eval"),
                          default_prompts("harmless-eval"), max_new_tokens=max_new_tokens, progress=not quiet,
                          max_prompt_tokens=max_prompt_tokens, log=log)
    if spec is not None:
        del scorer  # the judge loads once the model is released
        final.judge(spec, batch_size=judge_batch_size, progress=not quiet)
    counts = ", ".join(f"{n} {name if name == 'judge' else name + ' markers'}" for name, n in final.refusals.items())
    click.echo(f"held-out evaluation: refusals {counts} of {final.prompts} (answers up to {max_new_tokens} tokens); "
               f"KL {final.kl:.4f}")
    if save:
        write_atomic(save, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in final.answers).encode())
        click.echo(f"answers: {save}")


WRITTEN_BY = "written by abliterate optimize"
WORKER = "import sys; from rewriter.cli import main; sys.argv[0] = 'abliterate'; main()"  # python -c: this CLI


def _run_workers(study: Any, args: Sequence[str], jobs: int, threads: int | None, seed: int, trials: int, logs: Path,
                 progress: bool) -> None:
    """``jobs`` processes of ``optimize --worker`` on ``study``, with seeds seed, seed+1, ... (so
    that their samplers do not propose the same points) and ``threads`` torch threads each
    (default: the cores shared out); a progress bar counts the study's finished trials. One
    that fails ends the others, and its last line of error is this command's."""
    import optuna
    from tqdm import tqdm

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    each = threads or max(1, cores // jobs)
    env = {**os.environ, "OMP_NUM_THREADS": str(each), "MKL_NUM_THREADS": str(each)}
    procs = []
    for i in range(jobs):
        with open(logs / f"worker-{i}.err", "wb") as err:
            procs.append(subprocess.Popen([sys.executable, "-c", WORKER, "optimize", *args, "--seed", str(seed + i),
                                           "--threads", str(each), "--worker", "-q"], env=env,
                                          stdout=subprocess.DEVNULL, stderr=err))
    complete = optuna.trial.TrialState.COMPLETE
    try:
        with tqdm(total=trials, unit="trial", desc=f"optimize ({jobs} workers)", disable=not progress) as bar:
            while any(p.poll() is None for p in procs) and not any(p.returncode for p in procs):
                bar.update(min(len(study.get_trials(deepcopy=False, states=(complete,))), trials) - bar.n)
                time.sleep(1.0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()
    for i, p in enumerate(procs):
        if p.returncode:
            lines = (logs / f"worker-{i}.err").read_text(errors="replace").strip().splitlines()
            raise AbliterateError(f"optimize --jobs: worker {i} failed ({lines[-1] if lines else f'exit {p.returncode}'})")


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
