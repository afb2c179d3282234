"""Original vs heuristic plan vs optimized plan on the Qwen example, evaluated the way a
skeptic would: held-out prompts, answers up to 128 tokens, both marker sets, KL, time.

    python benchmarks/optimize_bench.py [--trials 60] [--strategies norm-preserving standard] [--out DIR]

Prints a markdown table and, for the broad (33-marker) set, how many of its hits the
project's markers do not share (candidate false positives: read them in DIR/*.jsonl).
Also prints the rank correlation of the cheap refusal score with the generation-based
count over the plans of the study (--rank-plans N of them, evaluated by generation).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rewriter.directions import Measurements
from rewriter.io.files import write_atomic
from rewriter.lab.analyze import layer_metrics, suggest_plan
from rewriter.lab.example_models import example_model
from rewriter.lab.measure import measure
from rewriter.lab.optimize import STRATEGIES, FinalEvaluation, Space, evaluate_plan, optimize, plan_from_params
from rewriter.lab.prompts import default_prompts
from rewriter.lab.refusals import refusal_log_odds
from rewriter.lab.evaluate import first_token_logits
from rewriter.plan import Plan, PlanEntry

MODEL = "qwen2.5-coder-0.5b-instruct"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--strategies", nargs="+", default=["norm-preserving", "standard"], help="heuristic rows")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rank-plans", type=int, default=0, help="plans of the study to rank by both scores")
    ap.add_argument("--out", type=Path, default=Path("/tmp/optimize-bench"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    source = example_model(MODEL)
    directions = args.out / "directions.safetensors"
    if not directions.is_file():
        measure(source, default_prompts("harmful-measure"), default_prompts("harmless-measure"), progress=False).save(directions)
    harmful_eval, harmless_eval = default_prompts("harmful-eval"), default_prompts("harmless-eval")
    start = time.monotonic()
    outcome, scorer = optimize(source, directions, default_prompts("harmful-measure")[:32],
                               default_prompts("harmless-measure")[:32], trials=args.trials, timeout=None,
                               max_kl=0.05, study_path=args.out / "study.db", strategies=STRATEGIES)
    search_s = time.monotonic() - start
    rows: list[tuple[str, FinalEvaluation, float]] = []

    def run(name: str, plan: Plan, strategy: str) -> None:
        t = time.monotonic()
        final = evaluate_plan(scorer, plan, strategy, harmful_eval, harmless_eval, max_new_tokens=args.max_new_tokens)
        rows.append((name, final, time.monotonic() - t))
        write_atomic(args.out / f"{name.replace(' ', '_')}.jsonl",
                     "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in final.answers).encode())

    run("original", Plan((PlanEntry(0, outcome.plan.entries[0].measurement, 0.0),)), "standard")  # scale 0: no edit
    heuristic = suggest_plan(layer_metrics(Measurements.load(directions)), scorer.arch.num_layers(scorer.ckpt.config))
    for strategy in args.strategies:
        run(f"heuristic {strategy}", heuristic, strategy)
    run(f"optimized {outcome.strategy}", outcome.plan, outcome.strategy)
    n = len(harmful_eval)
    print(f"\noptimize: {len(outcome.values)} trials in {search_s:.0f} s (2 cores); chosen trial {outcome.trial}: "
          f"score {outcome.refusal_score:+.3f}, search KL {outcome.kl:.4f}")
    print("\n| plan | refusals (project) | refusals (broad, 33 markers) | broad-only hits | KL | eval s |")
    print("| --- | --: | --: | --: | --: | --: |")
    for name, final, seconds in rows:
        broad_only = sum(1 for r in final.answers if r["markers"]["broad"] and not r["markers"]["project"])
        print(f"| {name} | {final.refusals['project']}/{n} | {final.refusals['broad']}/{n} | {broad_only} | "
              f"{final.kl:.4f} | {seconds:.0f} |")
    if args.rank_plans:
        rank(scorer, outcome, args, harmful_eval, harmless_eval)


def rank(scorer, outcome, args, harmful, harmless) -> None:  # noqa: ANN001 - a script
    """Spearman correlation of the cheap score with the generation count over study plans."""
    import optuna

    study = optuna.load_study(study_name="abliterate-optimize", storage=f"sqlite:///{args.out / 'study.db'}")
    trials = [t for t in study.trials if t.values][:: max(1, len(study.trials) // args.rank_plans)][: args.rank_plans]
    space = Space(scorer.arch.num_layers(scorer.ckpt.config), [], tuple(scorer.arch.components), STRATEGIES)
    cheap, counted = [], []
    for t in trials:
        plan, strategy = plan_from_params(dict(t.params), space)
        final = evaluate_plan(scorer, plan, strategy, harmful, harmless, max_new_tokens=args.max_new_tokens, progress=False)
        scorer.apply(plan, strategy)
        cheap.append(float(refusal_log_odds(first_token_logits(scorer.lm, harmful, batch_size=16, progress=False),
                                            scorer.openers).mean()))
        scorer.editor.restore()
        counted.append(final.refusals["project"])
        print(f"  trial {t.number}: cheap score {cheap[-1]:+.3f}, refusals {counted[-1]}/{len(harmful)}", flush=True)
    print(f"rank correlation over {len(trials)} plans (held-out prompts): Spearman rho {spearman(cheap, counted):.3f}")


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


if __name__ == "__main__":
    main()
