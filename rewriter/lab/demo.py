"""The end-to-end demo: example model -> measure -> analyze -> optimize -> rewrite -> verify ->
evaluate -> report, each step under its own heading, as a user would run them. The
heuristic plan of ``analyze --suggest-plan`` is scored beside the optimized one."""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..directions import Measurements
from ..io.files import write_atomic
from ..pipeline import prepare
from ..plan import Plan
from ..verify import verify
from .analyze import LayerMetrics, chart, layer_metrics, suggest_plan, table
from .evaluate import Evaluation, evaluate
from .example_models import example_model
from .measure import measure
from .optimize import optimize, pareto_chart
from .prompts import default_prompts
from .markers import MARKER_SETS

DEMO_MODEL = "qwen2.5-coder-0.5b-instruct"
MAX_KL = 0.05
# Seconds each step took on 2 idle cores (README, 2026-11-29; the search at 24 trials, answers of
# up to 128 tokens): the estimate printed before the run scales them by the cores and the settings.
MEASURED = {"measure": 64, "optimize": 815, "rewrite and verify": 2, "evaluate original": 138,
            "evaluate abliterated": 153}


def run_demo(out: Path, *, strategy: str = "norm-preserving", trials: int = 24, max_new_tokens: int = 128,
             batch_size: int = 16, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every step into ``out``; returns (and writes to out/report.json) the report."""
    for line in estimate(trials, max_new_tokens):
        log(line)
    demo = _Demo(out, strategy, batch_size, progress, log)
    directions, heuristic, metrics = demo.measure_and_analyze()
    plan, search = demo.search(directions, heuristic, trials, metrics)
    verified = demo.rewrite_and_verify(directions, plan)
    before, after = demo.evaluate(max_new_tokens)
    first, last = plan.entries[0].layer, plan.entries[-1].layer
    report = {
        "model": DEMO_MODEL, "strategy": strategy, "layers": [first, last], "measurement": plan.entries[0].measurement,
        "trials": trials, "search": search, "max_new_tokens": max_new_tokens,
        "refusals_before": before.refusals, "refusals_after": after.refusals,
        "refusal_score_before": before.refusal_score, "refusal_score_after": after.refusal_score,
        "prompts": after.prompts, "kl_before": 0.0, "kl_after": after.kl, "verified": verified,
        "seconds": demo.times, "output": str(out / "model"),
    }
    write_atomic(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    return report


class _Demo:
    """The demo's steps, each timed under its own heading."""

    def __init__(self, out: Path, strategy: str, batch_size: int, progress: bool, log: Callable[[str], None]) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.strategy, self.batch_size, self.progress, self.log = out, strategy, batch_size, progress, log
        self.times: dict[str, float] = {}
        self.source = self.step("example model", lambda: example_model(DEMO_MODEL, log=log))
        log(str(self.source))

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        self.log(f"\n== {name}")
        start = time.monotonic()
        result = fn()
        self.times[name] = round(time.monotonic() - start, 1)
        return result

    def measure_and_analyze(self) -> tuple[Path, Plan, list[LayerMetrics]]:
        """Directions from the measurement halves; the table and the heuristic plan."""
        directions = self.out / "directions.safetensors"
        m: Measurements = self.step("measure", lambda: measure(
            self.source, default_prompts("harmful-measure"), default_prompts("harmless-measure"),
            batch_size=self.batch_size, progress=self.progress, refused_only=True))
        m.save(directions)
        self.log(f"{directions}: {len(m.layers)} layers, width {m.width}")
        metrics = self.step("analyze", lambda: layer_metrics(m))
        for line in table(metrics):
            self.log(line)
        heuristic = Plan(suggest_plan(metrics, len(m.layers)).entries, model=str(self.source), measurements=str(directions))
        heuristic.save(self.out / "plan-heuristic.yml")
        self.log(f"heuristic plan (analyze --suggest-plan): {_layers(heuristic)} -> {self.out / 'plan-heuristic.yml'}")
        return directions, heuristic, metrics

    def chart(self, draw: Callable[[Path], None], name: str) -> None:
        """A chart is a nicety: say where it is, or why there is none."""
        try:
            draw(self.out / name)
            self.log(f"chart: {self.out / name}")
        except Exception as exc:
            self.log(f"(no chart {name}: {exc})")

    def search(self, directions: Path, heuristic: Plan, trials: int,
               metrics: list[LayerMetrics]) -> tuple[Plan, dict[str, Any]]:
        """optimize's plan, both plans' search scores side by side, the search chart, and the
        layer chart with the plan that is applied."""
        outcome, scorer = self.step("optimize", lambda: optimize(
            self.source, directions, default_prompts("harmful-measure")[:32], default_prompts("harmless-measure")[:32],
            trials=trials, timeout=None, max_kl=MAX_KL, strategies=(self.strategy,), batch_size=self.batch_size,
            progress=self.progress))
        score, kl = scorer.score(heuristic, self.strategy)
        del scorer  # the model it holds is not needed any more
        plan = Plan(outcome.plan.entries, model=str(self.source), measurements=str(directions), output=str(self.out / "model"))
        plan.save(self.out / "plan.yml")
        self.log(f"{'plan':<10} {'refusal score':>13} {'KL':>8}  (search prompts: measurement halves)")
        self.log(f"{'heuristic':<10} {score:>+13.3f} {kl:>8.4f}  {_layers(heuristic)}")
        self.log(f"{'optimized':<10} {outcome.refusal_score:>+13.3f} {outcome.kl:>8.4f}  {_layers(plan)}  -> {self.out / 'plan.yml'}")
        self.chart(lambda path: pareto_chart(outcome, path, MAX_KL), "plan.png")
        self.chart(lambda path: chart(metrics, path, title=DEMO_MODEL, plan=plan, plan_label="optimized plan, applied"),
                   "layers.png")
        return plan, {"heuristic": {"plan": _layers(heuristic), "refusal_score": score, "kl": kl},
                      "optimized": {"plan": _layers(plan), "refusal_score": outcome.refusal_score, "kl": outcome.kl}}

    def rewrite_and_verify(self, directions: Path, plan: Plan) -> bool:
        job = prepare(self.source, self.out / "model", directions, plan, self.strategy)
        summary = self.step("rewrite", lambda: job.run(self.out / "model", overwrite=True, progress=self.progress))
        for line in summary.lines():
            self.log(line)
        problems = self.step("verify", lambda: list(verify(job, self.out / "model", progress=self.progress)))
        self.log("\n".join(problems) if problems else f"verified: {len(job.edits)} edited tensors bit for bit, every other byte equal")
        return not problems

    def evaluate(self, max_new_tokens: int) -> tuple[Evaluation, Evaluation]:
        """Both models on the held-out halves; the original once (its logits cached on the way)."""
        harmful, harmless = default_prompts("harmful-eval"), default_prompts("harmless-eval")
        kw = dict(max_new_tokens=max_new_tokens, batch_size=self.batch_size, progress=self.progress)
        before = self.step("evaluate original", lambda: evaluate(self.source, harmful, harmless, cache_as_original=True, **kw))
        after = self.step("evaluate abliterated", lambda: evaluate(self.out / "model", harmful, harmless,
                                                                   original=self.source, **kw))
        for name, result in (("original", before), ("abliterated", after)):
            result.save_answers(self.out / f"answers-{name}.jsonl", dict(MARKER_SETS))
        return before, after


def estimate(trials: int, max_new_tokens: int) -> list[str]:
    """What the run should take here, step by step, from the times measured on 2 idle cores, scaled
    by the cores this process may use and by the settings; load from other jobs comes on top."""
    from ..engine.threads import usable_cores

    cores = usable_cores()
    speed = min(cores, 16) / 2  # the steps use every core, with diminishing returns past a few
    scale = {"optimize": trials / 24, "evaluate original": max_new_tokens / 128,
             "evaluate abliterated": max_new_tokens / 128}
    seconds = {step: t * scale.get(step, 1.0) / speed for step, t in MEASURED.items()}
    total = sum(seconds.values())
    parts = ", ".join(f"{step} {_minutes(t)}" for step, t in seconds.items())
    return [f"expected on {cores} core{'s' if cores > 1 else ''} with nothing else running: about {_minutes(total)} "
            f"({parts}); other jobs on the machine can make it 2-3 times longer"]


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def _layers(plan: Plan) -> str:
    layers = [e.layer for e in plan.entries]
    return f"layers {min(layers)}-{max(layers)}, measurement {plan.entries[0].measurement}"


def report_lines(r: dict[str, Any]) -> list[str]:
    drop = 1 - r["refusals_after"] / r["refusals_before"] if r["refusals_before"] else 0.0
    return [
        "",
        "== report",
        f"model: {r['model']}   strategy: {r['strategy']}   verified: {'yes' if r['verified'] else 'NO'}",
        f"plan: optimized over {r['trials']} trials, {r['search']['optimized']['plan']} "
        f"(heuristic: {r['search']['heuristic']['plan']}; search scores in report.json)",
        f"held-out prompts: {r['prompts']} harmful (answers up to {r['max_new_tokens']} tokens), harmless for KL",
        f"{'':>12} {'refusals':>10} {'KL':>8}",
        f"{'original':>12} {r['refusals_before']:>4}/{r['prompts']:<5} {r['kl_before']:>8.4f}",
        f"{'abliterated':>12} {r['refusals_after']:>4}/{r['prompts']:<5} {r['kl_after']:>8.4f}   ({drop:.0%} fewer refusals)",
        "time: " + ", ".join(f"{k} {v:.0f} s" for k, v in r["seconds"].items()),
        f"output: {r['output']} (answers in answers-*.jsonl beside it)",
    ]
