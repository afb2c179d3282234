"""Original vs heuristic plan vs optimized plan on the Qwen example, evaluated the way a
skeptic would: held-out prompts, answers up to 128 tokens, both marker sets, KL, time.

    python benchmarks/optimize_bench.py [--trials 60] [--study S] [--directions D] [--heuristic S ...]
        [--optimized [S ...]] [--no-original] [--rank-plans 20 --rank-prompts 32] [--no-table]
        [--threads 2] [--out DIR]
    python benchmarks/optimize_bench.py --workers 1x2 2x1 [--trials 60] [--search-prompts 32] [--directions D]
        [--all-harmful]

Table: the original; the heuristic plan (``analyze --suggest-plan``) with each --heuristic
strategy; the plan the study chose or, with --optimized S..., the best plan of each strategy
S in the study (KL <= 0.05). An existing --study is reused (searched on up to --trials trials).
Answers are kept in DIR/*.jsonl; "broad-only hits" are answers only the 33-marker set
counts as refusals (candidate false positives: read them there).

--rank-plans N: N plans of the study, evenly spaced by search score (plus the original),
each evaluated by generation and by the cheap scores of one forward pass (the refusal
log-odds of the first token; the projection of the last prompt token's residual on the
refusal direction, at the plan's measurement layer and at the heuristic's); prints the
Spearman and Kendall correlations of each cheap score with the refusal count.

--workers PxT ...: the search alone (``abliterate optimize --no-final-eval``, a fresh
journal each) with P processes of T torch threads, each with the prefix cache on and off:
wall time, and the chosen plan with its scores (the same plan and scores with the cache on
and off show that it changes nothing but the time).
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from rewriter.io.files import write_atomic
from rewriter.lab.analyze import layer_metrics, suggest_plan
from rewriter.lab.evaluate import first_token_logits
from rewriter.lab.example_models import example_model
from rewriter.lab.measure import measure
from rewriter.lab.optimize import (STRATEGIES, FinalEvaluation, Scorer, Space, choose, evaluate_plan, optimize,
                                   plan_from_params)
from rewriter.lab.prompts import default_prompts
from rewriter.lab.refusals import first_token_scores
from rewriter.plan import Plan, PlanEntry

MODEL = "qwen2.5-coder-0.5b-instruct"
MAX_KL = 0.05


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--study", type=Path, help="study file (default: DIR/study.db); an existing one is reused")
    ap.add_argument("--directions", type=Path, help="direction file (default: measured into DIR, as measure "
                                                   "--refused-only does)")
    ap.add_argument("--all-harmful", action="store_true", help="measure the harmful mean over every harmful prompt")
    ap.add_argument("--heuristic", nargs="*", default=list(reversed(STRATEGIES)), help="strategies of heuristic rows")
    ap.add_argument("--optimized", nargs="*", help="strategies of optimized rows (default: the study's choice)")
    ap.add_argument("--no-original", action="store_true", help="no row for the original")
    ap.add_argument("--no-table", action="store_true")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rank-plans", type=int, default=0, help="plans of the study to rank by both scores")
    ap.add_argument("--rank-prompts", type=int, default=0, help="first K held-out harmful prompts (default: all)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path, default=Path("/tmp/optimize-bench"))
    ap.add_argument("--workers", nargs="*", help="PxT: P processes of T threads (a table of search times)")
    ap.add_argument("--search-prompts", type=int, default=32, help="with --workers: optimize's --search-prompts")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    source = example_model(MODEL)
    directions = args.directions or args.out / "directions.safetensors"
    if not directions.is_file():
        measure(source, default_prompts("harmful-measure"), default_prompts("harmless-measure"), progress=False,
                refused_only=not args.all_harmful).save(directions)
    if args.workers:
        workers_table(source, directions, args)
        return
    study_path = args.study or args.out / "study.db"
    start = time.monotonic()
    outcome, scorer = optimize(source, directions, default_prompts("harmful-measure")[:32],
                               default_prompts("harmless-measure")[:32], trials=args.trials, timeout=None,
                               max_kl=MAX_KL, study=study_path, strategies=STRATEGIES)
    print(f"optimize: {len(outcome.values)} trials, {time.monotonic() - start:.0f} s in this run "
          f"({args.threads} torch threads); chosen trial {outcome.trial} ({outcome.strategy}): "
          f"score {outcome.refusal_score:+.3f}, search KL {outcome.kl:.4f}", flush=True)
    study = _load_study(study_path)
    space = Space(scorer.arch.num_layers(scorer.ckpt.config), [], tuple(scorer.arch.components), STRATEGIES)
    heuristic = suggest_plan(layer_metrics(scorer.meas), space.num_layers)
    harmful, harmless = default_prompts("harmful-eval"), default_prompts("harmless-eval")
    reference = first_token_logits(scorer.lm, harmless, batch_size=scorer.batch_size, progress=False)
    if not args.no_table:
        table(scorer, study, space, heuristic, args, harmful, harmless, reference)
    if args.rank_plans:
        rank(scorer, study, space, heuristic, args, harmful[: args.rank_prompts or None], harmless, reference)


def table(scorer: Scorer, study: Any, space: Space, heuristic: Plan, args: argparse.Namespace,
          harmful: list[str], harmless: list[str], reference: torch.Tensor) -> None:
    """Original, heuristic and optimized rows: refusals (both marker sets), KL, time."""
    original = [] if args.no_original else [("original", no_edit(heuristic), "standard", "-")]
    plans: list[tuple[str, Plan, str, str]] = original + [(f"heuristic {s}", heuristic, s, "-") for s in args.heuristic]
    searched = f"{search_seconds(study):.0f} (all {len(study.trials)} trials)"
    for s in args.optimized or [None]:
        best = choose(study, MAX_KL, s)
        if best is not None:
            plan, strategy = plan_from_params(dict(best.params), space)
            plans.append((f"optimized {strategy} (trial {best.number})", plan, strategy, searched))
    print("\n| plan | layers | refusals (project) | refusals (broad, 33 markers) | broad-only hits | KL | eval s | "
          "search s |")
    print("| --- | --- | --: | --: | --: | --: | --: | --: |", flush=True)
    for name, plan, strategy, search_s in plans:
        t = time.monotonic()
        final = evaluate_plan(scorer, plan, strategy, harmful, harmless, max_new_tokens=args.max_new_tokens,
                              reference=reference, progress=False)
        seconds = time.monotonic() - t
        save_answers(args.out / f"{name.split(' (')[0].replace(' ', '_')}.jsonl", final)
        broad_only = sum(1 for r in final.answers if r["markers"]["broad"] and not r["markers"]["project"])
        n = len(harmful)
        print(f"| {name} | {describe(plan)} | {final.refusals['project']}/{n} | {final.refusals['broad']}/{n} | "
              f"{broad_only} | {final.kl:.4f} | {seconds:.0f} | {search_s} |", flush=True)


def rank(scorer: Scorer, study: Any, space: Space, heuristic: Plan, args: argparse.Namespace,
         harmful: list[str], harmless: list[str], reference: torch.Tensor) -> None:
    """Rank correlation of the cheap scores with the generation count over plans spanning the study."""
    done = sorted((t for t in study.trials if t.values), key=lambda t: t.values[0])
    n = min(args.rank_plans, len(done))
    picked = [done[round(i * (len(done) - 1) / max(n - 1, 1))] for i in range(n)]
    fixed = heuristic.entries[0].measurement
    plans: list[tuple[str, Plan, str, float | None]] = [("original", no_edit(heuristic), "standard", None)]
    plans += [(f"trial {t.number}", *plan_from_params(dict(t.params), space), t.values[0]) for t in picked]
    print(f"\nrank: {len(plans)} plans on the first {len(harmful)} held-out harmful prompts, "
          f"{args.max_new_tokens} new tokens; projection at the plan's measurement layer and at layer {fixed}")
    print("\n| plan | strategy | m | layers | search score | cheap log-odds | P(refusal opener) | proj (own m) | "
          "proj (m=%d) | KL | refusals (project) | refusals (broad) | s |" % fixed)
    print("| --- | --- | --: | --- | --: | --: | --: | --: | --: | --: | --: | --: | --: |", flush=True)
    (args.out / "rank").mkdir(exist_ok=True)
    saved = args.out / "rank.json"
    rows = json.loads(saved.read_text()) if saved.is_file() else []  # a rerun resumes
    for row in rows:
        print(row_line(row))
    for name, plan, strategy, search in plans:
        if any(r["plan"] == name for r in rows):
            continue
        t = time.monotonic()
        final = evaluate_plan(scorer, plan, strategy, harmful, harmless, max_new_tokens=args.max_new_tokens,
                              reference=reference, progress=False)
        own = plan.entries[0].measurement
        scorer.apply(plan, strategy)
        try:
            odds, proj = first_token_scores(scorer.lm, harmful, scorer.openers,
                                            {m: scorer.meas.direction(m) for m in {own, fixed}},
                                            batch_size=scorer.batch_size)
        finally:
            scorer.editor.restore()
        row = {"plan": name, "strategy": strategy, "measurement": own, "layers": describe(plan), "search": search,
               "log_odds": float(odds.mean()), "p_refusal": float(torch.sigmoid(odds).mean()),
               "proj_own": float(proj[own].mean()), "proj_fixed": float(proj[fixed].mean()), "kl": final.kl,
               "project": final.refusals["project"], "broad": final.refusals["broad"],
               "seconds": time.monotonic() - t, "odds": odds.tolist()}
        rows.append(row)
        save_answers(args.out / "rank" / f"{name.replace(' ', '_')}.jsonl", final)
        write_atomic(saved, json.dumps(rows, indent=1).encode())
        print(row_line(row), flush=True)
    print("\n| cheap score | vs | plans | Spearman rho | Kendall tau-b |\n| --- | --- | --: | --: | --: |")
    for score in ("log_odds", "p_refusal", "proj_own", "proj_fixed", "search"):
        for count in ("project", "broad"):
            pairs = [(r[score], r[count]) for r in rows if r[score] is not None]
            a, b = [p[0] for p in pairs], [p[1] for p in pairs]
            print(f"| {score} | {count} | {len(pairs)} | {spearman(a, b):+.3f} | {kendall(a, b):+.3f} |")


def workers_table(source: Path, directions: Path, args: argparse.Namespace) -> None:
    """Search wall time by processes x threads, prefix cache on and off; the chosen plan of each."""
    print(f"\n{args.trials} trials, {args.search_prompts} search prompts of each kind, {MODEL}\n")
    print("| processes x threads | prefix cache | wall s | trials' span s | s per trial (mean) | chosen trial | strategy "
          "| layers | score | KL |")
    print("| --- | --- | --: | --: | --: | --: | --- | --- | --: | --: |", flush=True)
    for spec in args.workers:
        procs, threads = (int(n) for n in spec.split("x"))
        for cache in (True, False):
            name = f"{procs}x{threads}-{'cache' if cache else 'nocache'}"
            journal = args.out / f"{name}.log"
            for stale in (journal, journal.with_name(journal.name + ".lock")):
                stale.unlink(missing_ok=True)
            cmd = ["abliterate", "optimize", str(source), "-d", str(directions), "-o", str(args.out / f"{name}.yml"),
                   "--study", f"journal:{journal}", "--trials", str(args.trials), "--search-prompts",
                   str(args.search_prompts), "--jobs", str(procs), "--threads", str(threads), "--no-final-eval",
                   "--overwrite", "-q", *([] if cache else ["--no-prefix-cache"])]
            start = time.monotonic()
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            seconds = time.monotonic() - start
            m = re.search(r"chosen: trial (\d+), (\S+), measurement (\d+), layers (\S+); score (\S+), KL (\S+) ->", out)
            assert m, out
            span, mean = trial_times(journal)
            print(f"| {procs} x {threads} | {'on' if cache else 'off'} | {seconds:.0f} | {span:.0f} | {mean:.1f} | {m[1]} | {m[2]} | "
                  f"m={m[3]}, {m[4]} | {m[5]} | {m[6]} |", flush=True)


def trial_times(journal: Path) -> tuple[float, float]:
    """(first trial's start to last one's end, mean seconds a trial took) of a journal's study:
    the search without the start-up (loading the model, the prefix cache)."""
    import optuna

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    done = [t for t in optuna.load_study(study_name="abliterate-optimize", storage=storage).trials
            if t.state == optuna.trial.TrialState.COMPLETE]
    span = max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)
    return span.total_seconds(), sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done) / len(done)


def row_line(r: dict[str, Any]) -> str:
    search = "-" if r["search"] is None else f"{r['search']:+.3f}"
    return (f"| {r['plan']} | {r['strategy']} | {r['measurement']} | {r['layers']} | {search} | {r['log_odds']:+.3f} | "
            f"{r['p_refusal']:.3f} | {r['proj_own']:+.2f} | {r['proj_fixed']:+.2f} | {r['kl']:.4f} | {r['project']} | "
            f"{r['broad']} | {r['seconds']:.0f} |")


def no_edit(plan: Plan) -> Plan:
    """A plan of scale 0: the original model, through the same code path as the others."""
    return Plan((PlanEntry(0, plan.entries[0].measurement, 0.0),))


def describe(plan: Plan) -> str:
    layers = [e.layer for e in plan.entries if e.scale > 0]
    return f"{min(layers)}-{max(layers)}" if layers else "none"


def save_answers(path: Path, final: FinalEvaluation) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in final.answers).encode())


def search_seconds(study: Any) -> float:
    """Wall time the study's trials took (all runs that added to it)."""
    return sum((t.datetime_complete - t.datetime_start).total_seconds() for t in study.trials if t.datetime_complete)


def _load_study(path: Path) -> Any:
    import optuna

    return optuna.load_study(study_name="abliterate-optimize", storage=f"sqlite:///{path}")


def spearman(a: list[float], b: list[float]) -> float:
    """Pearson correlation of the ranks (ties get their mean rank)."""
    def ranks(xs: list[float]) -> list[float]:
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        out = [0.0] * len(xs)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def kendall(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b (ties in either list counted as neither agreeing nor disagreeing)."""
    agree = disagree = only_a = only_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = (a[i] > a[j]) - (a[i] < a[j]), (b[i] > b[j]) - (b[i] < b[j])
            if da and db:
                agree, disagree = agree + (da == db), disagree + (da != db)
            elif da:
                only_a += 1
            elif db:
                only_b += 1
    denom = math.sqrt((agree + disagree + only_a) * (agree + disagree + only_b))
    return (agree - disagree) / denom if denom else float("nan")


if __name__ == "__main__":
    main()
