"""The end-to-end demo: ``abliterate run`` on the example model with the plan search (run.py does
every step), after an estimate of how long each step should take on this machine."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .recipe import Recipe
from .run import Run

DEMO_MODEL = "qwen2.5-coder-0.5b-instruct"
# Seconds each step took on 2 idle cores (README, 2026-12-03; the search at 24 trials, answers of
# up to 128 tokens, both models evaluated, capability measured): the estimate printed before the
# run scales them by the cores and the settings.
MEASURED = {"measure": 44, "plan": 354, "rewrite and verify": 3, "evaluate": 948}


def run_demo(out: Path, *, strategy: str = "norm-preserving", trials: int = 24, max_new_tokens: int = 128,
             batch_size: int = 16, progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """``run`` on the example into ``out`` with the search; returns (and writes to out/report.json) its report."""
    for line in estimate(trials, max_new_tokens):
        log(line)
    recipe = Recipe(model=DEMO_MODEL, strategy=strategy, search=True, trials=trials, max_new_tokens=max_new_tokens,
                    batch_size=batch_size)
    return Run(recipe, out, progress=progress, log=log).go()


def estimate(trials: int, max_new_tokens: int) -> list[str]:
    """What the run should take here, step by step, from the times measured on 2 idle cores, scaled
    by the cores this process may use and by the settings; load from other jobs comes on top."""
    from ..engine.threads import usable_cores

    cores = usable_cores()
    speed = min(cores, 16) / 2  # the steps use every core, with diminishing returns past a few
    scale = {"plan": trials / 24, "evaluate": max_new_tokens / 128}
    seconds = {step: t * scale.get(step, 1.0) / speed for step, t in MEASURED.items()}
    total = sum(seconds.values())
    parts = ", ".join(f"{step} {_minutes(t)}" for step, t in seconds.items())
    return [f"expected on {cores} core{'s' if cores > 1 else ''} with nothing else running: about {_minutes(total)} "
            f"({parts}); other jobs on the machine can make it 2-3 times longer"]


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"
