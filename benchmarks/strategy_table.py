"""Refusals and KL of all four strategies on the Qwen example, with the demo's plan.

    python benchmarks/strategy_table.py [--directions D] [--work /tmp/strategies]

Measures with the built-in measurement prompts (unless --directions), suggests a plan,
rewrites once per strategy and evaluates each on the built-in evaluation prompts.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from rewriter.lab.analyze import layer_metrics, suggest_plan
from rewriter.lab.demo import DEMO_MODEL
from rewriter.directions import Measurements
from rewriter.lab.evaluate import evaluate
from rewriter.lab.example_models import example_model
from rewriter.lab.measure import measure
from rewriter.pipeline import prepare
from rewriter.lab.prompts import default_prompts

STRATEGIES = ("standard", "projected", "biprojected", "norm-preserving")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--directions", type=Path)
    ap.add_argument("--work", type=Path, default=Path("/tmp/abliterate-strategies"))
    args = ap.parse_args()
    source = example_model(DEMO_MODEL)
    args.work.mkdir(parents=True, exist_ok=True)
    directions = args.directions or args.work / "directions.safetensors"
    if not args.directions:
        measure(source, default_prompts("harmful-measure"), default_prompts("harmless-measure"), progress=False).save(directions)
    m = Measurements.load(directions)
    plan = suggest_plan(layer_metrics(m), len(m.layers))
    harmful, harmless = default_prompts("harmful-eval"), default_prompts("harmless-eval")
    print(f"plan: layers {plan.entries[0].layer}-{plan.entries[-1].layer}, measurement {plan.entries[0].measurement}")
    base = evaluate(source, harmful, harmless, progress=False)
    print(f"{'strategy':<16} {'refusals':>9} {'KL':>8} {'rewrite s':>9}")
    print(f"{'original':<16} {base.refusals:>4}/{base.prompts:<4} {0.0:>8.4f} {'':>9}", flush=True)
    for name in STRATEGIES:
        out = args.work / name
        start = time.monotonic()
        prepare(source, out, directions, plan, name).run(out, overwrite=True, progress=False)
        seconds = time.monotonic() - start
        ev = evaluate(out, harmful, harmless, original=source, progress=False)
        print(f"{name:<16} {ev.refusals:>4}/{ev.prompts:<4} {ev.kl:>8.4f} {seconds:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
