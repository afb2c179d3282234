"""optimize: the plan chosen by measurement, not by a heuristic.

A multi-objective Optuna (TPE) search over the measurement layer, the edited range, a
weight profile per component over the layers (peak, position, floor, width) and the
strategy. Each trial edits the loaded model in memory (only the planned tensors, undone
after) and scores it with two forward passes, no generation: the refusal score (mean
log-odds of a refusal-opening first token) on the measurement half of the harmful
prompts, and the first-token KL from the original on harmless prompts (the original's
logits computed once). The chosen plan (lowest refusal score with KL <= max_kl) is then
evaluated by generation on the held-out evaluation halves.
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..architecture import Architecture
from ..directions import Measurements
from ..edits import plan_edits
from ..errors import AbliterateError
from ..io.checkpoint import Checkpoint
from ..plan import Plan, PlanEntry
from ..registry import Registry
from .analyze import layer_metrics, suggest_plan
from .evaluate import first_token_logits, generate, kl_divergence
from .inmemory import InMemoryEditor
from .chat import MAX_PROMPT_TOKENS, cap_prompts
from .models import LoadedModel, load_model, resolve_model
from .markers import MARKER_SETS, markers_in
from .refusals import opener_ids, refusal_log_odds
from .study import open_study

STRATEGIES = ("norm-preserving", "biprojected", "projected", "standard")


@dataclass
class Space:
    """What a trial may choose: layers 0..num_layers-1, measured layers, components, strategies."""

    num_layers: int
    measured: list[int]
    components: tuple[str, ...]
    strategies: tuple[str, ...]

    @classmethod
    def of(cls, ckpt: Checkpoint, arch: Architecture, meas: Measurements, strategies: Sequence[str]) -> Space:
        """The space of a model (its layers, its map's components) and a direction file (the
        measurement layers, those with a direction, besides the embedding output)."""
        num_layers = arch.num_layers(ckpt.config)
        measured = [n for n in meas.layers if 0 < n < num_layers and meas.direction(n).any()]
        return cls(num_layers, measured, tuple(arch.components), tuple(strategies))

    def record(self, model: Path, meas: Measurements) -> dict[str, str]:
        """What a study file keeps of this search, to refuse resuming another (study.py)."""
        return {"model": str(model.resolve()), "directions_sha256": meas.sha256, "space": json.dumps(asdict(self))}


def plan_from_params(p: dict[str, Any], space: Space) -> tuple[Plan, str]:
    """The plan and strategy a trial's parameters describe (a pure function: a study file
    alone reproduces every plan)."""
    last_layer = space.num_layers - 1
    first = max(0, round(p["center"] - p["half_width"]))
    last = min(last_layer, round(p["center"] + p["half_width"]))
    entries = []
    for layer in range(first, last + 1):
        scales = {c: _profile(layer, first, last, p[f"{c}_peak"], p[f"{c}_position"], p[f"{c}_floor"], p[f"{c}_width"])
                  for c in space.components}
        if any(s > 0 for s in scales.values()):
            entries.append(PlanEntry(layer, p["measurement"], 1.0, {c: round(s, 4) for c, s in scales.items()}))
    if not entries:
        entries = [PlanEntry(first, p["measurement"], 0.0)]
    return Plan(tuple(entries)), p["strategy"]


def _profile(layer: int, first: int, last: int, peak: float, position: float, floor: float, width: float) -> float:
    """peak at ``position`` (a fraction of the range), falling linearly to floor x peak at ``width`` layers."""
    centre = first + position * (last - first)
    distance = abs(layer - centre) / max(width, 1e-9)
    return max(0.0, min(1.0, peak * (1.0 - (1.0 - floor) * min(1.0, distance))))


SEED_PEAKS = (1.0, 0.85, 0.7)  # the heuristic plan, and softer copies in case it exceeds the KL cap


def heuristic_params(plan: Plan, strategy: str, space: Space, peak: float = 1.0) -> dict[str, Any]:
    """Parameters that reproduce a flat plan (one measurement, one scale over a range), e.g.
    the heuristic of ``analyze --suggest-plan`` at scale ``peak``: the search starts from
    it, so it ends at least as good, by its own measure, as the heuristic it replaces."""
    layers = [e.layer for e in plan.entries]
    p: dict[str, Any] = {"measurement": plan.entries[0].measurement, "center": (min(layers) + max(layers)) / 2,
                         "half_width": max(0.5, (max(layers) - min(layers)) / 2), "strategy": strategy}
    for c in space.components:
        p.update({f"{c}_peak": peak, f"{c}_position": 0.5, f"{c}_floor": 1.0, f"{c}_width": float(space.num_layers)})
    return p


def suggest(trial: Any, space: Space) -> dict[str, Any]:
    p: dict[str, Any] = {
        "measurement": trial.suggest_categorical("measurement", space.measured),
        "center": trial.suggest_float("center", 0, space.num_layers - 1),
        "half_width": trial.suggest_float("half_width", 0.5, space.num_layers / 2),
        "strategy": trial.suggest_categorical("strategy", list(space.strategies)),
    }
    for c in space.components:
        p[f"{c}_peak"] = trial.suggest_float(f"{c}_peak", 0.0, 1.0)
        p[f"{c}_position"] = trial.suggest_float(f"{c}_position", 0.0, 1.0)
        p[f"{c}_floor"] = trial.suggest_float(f"{c}_floor", 0.0, 1.0)
        p[f"{c}_width"] = trial.suggest_float(f"{c}_width", 1.0, float(space.num_layers))
    return p


class _Bounds:
    """Stands in for an Optuna trial to read the search space off ``suggest``: the range of each
    float parameter and the choices of each categorical one."""

    def __init__(self) -> None:
        self.floats: dict[str, tuple[float, float]] = {}
        self.choices: dict[str, list[Any]] = {}

    def suggest_float(self, name: str, low: float, high: float) -> float:
        self.floats[name] = (low, high)
        return low

    def suggest_categorical(self, name: str, choices: Sequence[Any]) -> Any:
        self.choices[name] = list(choices)
        return choices[0] if choices else None


def param_problem(params: Mapping[str, Any], space: Space) -> str | None:
    """What makes ``params`` (a stored trial's, read from a study file) not a point of ``space``, or None."""
    bounds = _Bounds()
    suggest(bounds, space)
    expected = {*bounds.floats, *bounds.choices}
    if set(params) != expected:
        missing, extra = sorted(expected - set(params)), sorted(set(params) - expected)
        return f"has parameters other than this search's (missing {missing[:4]}, unknown {extra[:4]})"
    for name, choices in bounds.choices.items():
        if params[name] not in choices:
            return f"has {name} {params[name]!r}, not one of this search's {choices}"
    for name, (low, high) in bounds.floats.items():
        value = params[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            return f"has {name} {value!r}, outside this search's range [{low:g}, {high:g}]"
    return None


@dataclass
class Scorer:
    """A loaded model, its edits undone between trials, and the prompts a trial is scored on."""

    lm: LoadedModel
    ckpt: Checkpoint
    meas: Measurements
    registry: Registry
    harmful: Sequence[str]
    harmless: Sequence[str]
    batch_size: int = 16
    editor: InMemoryEditor = field(init=False)
    reference: torch.Tensor = field(init=False)
    openers: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.editor = InMemoryEditor(self.lm, self.ckpt)
        self.reference = first_token_logits(self.lm, self.harmless, batch_size=self.batch_size, progress=False)
        self.openers = opener_ids(self.lm.tokenizer)
        self.arch = self.registry.architecture_for(self.ckpt.config, self.ckpt.names)

    def apply(self, plan: Plan, strategy: str) -> None:
        self.editor.apply(plan_edits(self.ckpt, self.arch, plan, self.meas, self.registry.strategy(strategy)))

    def score(self, plan: Plan, strategy: str) -> tuple[float, float]:
        """(refusal score, KL) of ``plan``; the model is restored afterwards."""
        self.apply(plan, strategy)
        try:
            logits = first_token_logits(self.lm, self.harmful, batch_size=self.batch_size, progress=False)
            edited = first_token_logits(self.lm, self.harmless, batch_size=self.batch_size, progress=False)
        finally:
            self.editor.restore()
        return float(refusal_log_odds(logits, self.openers).mean()), float(kl_divergence(self.reference, edited).mean())


@dataclass
class Outcome:
    plan: Plan
    strategy: str
    refusal_score: float
    kl: float
    trial: int
    feasible: bool
    front: list[dict[str, Any]]
    values: list[tuple[float, float]]  # (refusal score, KL) of every completed trial
    seconds: float


def optimize(model: str | Path, directions: Path, harmful: Sequence[str], harmless: Sequence[str], *, trials: int,
             timeout: float | None, max_kl: float, study_path: Path | None = None, seed: int = 0,
             strategies: Sequence[str] = STRATEGIES, batch_size: int = 16, dtype: str = "float32",
             registry: Registry | None = None, lm: LoadedModel | None = None, progress: bool = True,
             max_prompt_tokens: int = MAX_PROMPT_TOKENS, log: Callable[[str], None] = lambda s: None,
             ) -> tuple[Outcome, Scorer]:
    """Search plans for ``model``; returns the chosen plan with the Pareto front, and the scorer
    (model still loaded) for a final evaluation. A study file is checked before the model is
    loaded (study.py); prompts longer than ``max_prompt_tokens`` are cut (``cap_prompts``)."""
    optuna = _optuna()
    start = time.monotonic()
    path = resolve_model(model)
    registry = registry or Registry()
    meas = Measurements.load(directions)
    ckpt = Checkpoint.open(path)
    known = registry.strategies()
    unknown = [s for s in strategies if s not in known]
    if unknown:
        raise AbliterateError(f"unknown strategy {', '.join(unknown)}; registered: {', '.join(sorted(known))}")
    space = Space.of(ckpt, registry.architecture_for(ckpt.config, ckpt.names), meas, strategies)
    sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=min(10, max(trials // 4, 1)))
    study = open_study(optuna, study_path, sampler, space.record(path, meas), lambda p: param_problem(p, space))
    lm = lm or load_model(path, dtype)
    harmful = cap_prompts(lm.tokenizer, harmful, max_prompt_tokens, "harmful", log)
    harmless = cap_prompts(lm.tokenizer, harmless, max_prompt_tokens, "harmless", log)
    scorer = Scorer(lm, ckpt, meas, registry, harmful, harmless, batch_size)
    if not study.trials and space.measured:
        heuristic = suggest_plan(layer_metrics(meas), space.num_layers)
        if heuristic.entries[0].measurement in space.measured:
            for peak in SEED_PEAKS:
                for strategy in space.strategies:
                    study.enqueue_trial(heuristic_params(heuristic, strategy, space, peak))
    done = len([t for t in study.trials if t.state.name == "COMPLETE"])
    with tqdm(total=trials, initial=min(done, trials), unit="trial", desc="optimize", disable=not progress) as bar:
        def objective(trial: Any) -> tuple[float, float]:
            plan, strategy = plan_from_params(suggest(trial, space), space)
            return scorer.score(plan, strategy)

        def report(study: Any, trial: Any) -> None:
            bar.update(1)
            best = choose(study, max_kl)
            if best is not None:
                bar.set_postfix_str(f"best: score {best.values[0]:+.2f}, KL {best.values[1]:.3f} (trial {best.number})")

        if trials > done:
            study.optimize(objective, n_trials=trials - done, timeout=timeout, callbacks=[report])
    best = choose(study, max_kl) or min(_complete(study), key=lambda t: t.values[1])
    plan, strategy = plan_from_params(dict(best.params), space)
    front = [{"trial": t.number, "refusal_score": t.values[0], "kl": t.values[1], **_describe(t.params, space)}
             for t in sorted(study.best_trials, key=lambda t: t.values[1])]
    values = [(t.values[0], t.values[1]) for t in _complete(study)]
    return Outcome(plan, strategy, best.values[0], best.values[1], best.number, best.values[1] <= max_kl, front,
                   values, time.monotonic() - start), scorer


def _complete(study: Any) -> list[Any]:
    trials = [t for t in study.trials if t.state.name == "COMPLETE" and t.values and all(map(math.isfinite, t.values))]
    if not trials:
        raise AbliterateError("no trial completed; give more --trials or a longer --timeout")
    return trials


def choose(study: Any, max_kl: float, strategy: str | None = None) -> Any:
    """The trial of lowest refusal score with KL <= max_kl (of ``strategy`` only, if given), or None."""
    feasible = [t for t in study.trials if t.state.name == "COMPLETE" and t.values and t.values[1] <= max_kl
                and strategy in (None, t.params.get("strategy"))]
    return min(feasible, key=lambda t: (t.values[0], t.values[1])) if feasible else None


def _describe(params: dict[str, Any], space: Space) -> dict[str, Any]:
    plan, strategy = plan_from_params(dict(params), space)
    layers = [e.layer for e in plan.entries]
    return {"strategy": strategy, "measurement": params["measurement"], "layers": f"{min(layers)}-{max(layers)}"}


@dataclass
class FinalEvaluation:
    refusals: dict[str, int]
    prompts: int
    kl: float
    answers: list[dict[str, Any]]


def evaluate_plan(scorer: Scorer, plan: Plan, strategy: str, harmful: Sequence[str], harmless: Sequence[str], *,
                  max_new_tokens: int = 128, reference: torch.Tensor | None = None, progress: bool = True,
                  max_prompt_tokens: int = MAX_PROMPT_TOKENS,
                  log: Callable[[str], None] = lambda s: None) -> FinalEvaluation:
    """Generation-based evaluation of ``plan`` on held-out prompts (both marker sets), and KL
    (``reference``: the original's logits on ``harmless``, when already computed, on the
    prompts as cut to ``max_prompt_tokens``)."""
    harmful = cap_prompts(scorer.lm.tokenizer, harmful, max_prompt_tokens, "harmful", log)
    harmless = cap_prompts(scorer.lm.tokenizer, harmless, max_prompt_tokens, "harmless", log)
    if reference is None:
        reference = first_token_logits(scorer.lm, harmless, batch_size=scorer.batch_size, progress=False)
    scorer.apply(plan, strategy)
    try:
        answers = generate(scorer.lm, harmful, max_new_tokens=max_new_tokens, batch_size=scorer.batch_size,
                           progress=progress)
        kl = float(kl_divergence(reference, first_token_logits(scorer.lm, harmless, batch_size=scorer.batch_size,
                                                                progress=False)).mean())
    finally:
        scorer.editor.restore()
    hits = [{name: markers_in(a, markers) for name, markers in MARKER_SETS.items()} for a in answers]
    refusals = {name: sum(bool(h[name]) for h in hits) for name in MARKER_SETS}
    rows = [{"prompt": p, "answer": a, "refused": bool(h["project"]), "markers": h}
            for p, a, h in zip(harmful, answers, hits)]
    return FinalEvaluation(refusals, len(harmful), kl, rows)


def pareto_chart(outcome: Outcome, path: Path, max_kl: float) -> None:
    """Every trial's (KL, refusal score), the Pareto front, the KL cap and the chosen plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    ax.scatter([v[1] for v in outcome.values], [v[0] for v in outcome.values], s=12, alpha=0.4, label="trials")
    front = sorted((f["kl"], f["refusal_score"]) for f in outcome.front)
    ax.plot([f[0] for f in front], [f[1] for f in front], "o-", color="tab:orange", label="Pareto front")
    ax.axvline(max_kl, color="tab:red", linestyle="--", label=f"--max-kl {max_kl:g}")
    ax.scatter([outcome.kl], [outcome.refusal_score], s=120, marker="*", color="tab:green", zorder=3,
               label=f"chosen (trial {outcome.trial})")
    ax.set_xscale("symlog", linthresh=1e-3)
    low, high = ax.get_xlim()  # symlog leaves most of this range unlabelled: label it in steps of ~3x
    ticks = [t for t in (0, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100) if low <= t <= high]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlabel("first-token KL from the original (harmless prompts)")
    ax.set_ylabel("refusal score (log-odds of a refusal opener)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise AbliterateError("optimize needs optuna: pip install -e '.[optimize]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna
