"""The end-to-end demo: example model -> measure -> analyze -> plan -> rewrite -> evaluate -> report."""
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
from .analyze import chart, layer_metrics, suggest_plan, table
from .evaluate import evaluate
from .example_models import example_model
from .measure import measure
from .prompts import default_prompts

DEMO_MODEL = "qwen2.5-coder-0.5b-instruct"


def run_demo(out: Path, *, strategy: str = "norm-preserving", max_new_tokens: int = 24, batch_size: int = 16,
             progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every step into ``out``; returns (and writes to out/report.json) the report."""
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}

    def step(name: str, fn: Callable[[], Any]) -> Any:
        log(f"== {name}")
        start = time.monotonic()
        result = fn()
        times[name] = round(time.monotonic() - start, 1)
        return result

    source = step("example model", lambda: example_model(DEMO_MODEL, log=log))
    directions = out / "directions.safetensors"
    m: Measurements = step("measure", lambda: measure(
        source, default_prompts("harmful-measure"), default_prompts("harmless-measure"),
        batch_size=batch_size, progress=progress))
    m.save(directions)
    metrics = layer_metrics(m)
    for line in table(metrics):
        log(line)
    try:
        chart(metrics, out / "layers.png", title=DEMO_MODEL)
    except Exception as exc:  # the chart is a nicety (matplotlib is optional)
        log(f"(no chart: {exc})")
    plan = suggest_plan(metrics, len(m.layers))
    plan = Plan(plan.entries, model=str(source), measurements=str(directions), output=str(out / "model"))
    plan.save(out / "plan.yml")
    job = prepare(source, out / "model", directions, plan, strategy)
    step("rewrite", lambda: job.run(out / "model", overwrite=True, progress=progress))
    harmful, harmless = default_prompts("harmful-eval"), default_prompts("harmless-eval")
    kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    before = step("evaluate original", lambda: evaluate(source, harmful, harmless, **kw))
    after = step("evaluate abliterated", lambda: evaluate(out / "model", harmful, harmless, original=source, **kw))
    report = {
        "model": DEMO_MODEL,
        "strategy": strategy,
        "layers": [plan.entries[0].layer, plan.entries[-1].layer],
        "measurement": plan.entries[0].measurement,
        "refusals_before": before.refusals,
        "refusals_after": after.refusals,
        "prompts": after.prompts,
        "kl_before": 0.0,
        "kl_after": after.kl,
        "seconds": times,
        "output": str(out / "model"),
    }
    write_atomic(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    return report


def report_lines(r: dict[str, Any]) -> list[str]:
    drop = 1 - r["refusals_after"] / r["refusals_before"] if r["refusals_before"] else 0.0
    return [
        f"model: {r['model']}   strategy: {r['strategy']}",
        f"plan: layers {r['layers'][0]}-{r['layers'][1]} with the direction of measurement layer {r['measurement']}",
        f"{'':>12} {'refusals':>10} {'KL':>8}",
        f"{'original':>12} {r['refusals_before']:>4}/{r['prompts']:<5} {r['kl_before']:>8.4f}",
        f"{'abliterated':>12} {r['refusals_after']:>4}/{r['prompts']:<5} {r['kl_after']:>8.4f}   ({drop:.0%} fewer refusals)",
        "time: " + ", ".join(f"{k} {v:.0f} s" for k, v in r["seconds"].items()),
        f"output: {r['output']}",
    ]
