"""optimize: the plan chosen by measurement, not by a heuristic.

A multi-objective Optuna (TPE) search over the measurement layer, the edited range, a
weight profile per component over the layers (peak, position, floor, width) and the
strategy. Each trial edits the loaded model in memory (only the planned tensors, undone
after) and scores it with two forward passes, no generation: the refusal score (mean
log-odds of a refusal-opening first token) on the measurement half of the harmful
prompts, and the first-token KL from the original on harmless prompts (the original's
logits computed once). The chosen plan (lowest refusal score with KL <= max_kl) is then
evaluated by generation on the held-out evaluation halves.

Several processes (``--jobs``, or ``optimize`` on several machines with one ``--study``)
share one study: each starts trials until the study has ``trials`` of them finished or
running, then waits for the others' to finish, so that whichever reports chooses from the
whole study. A trial resumes the forward pass at its first edited layer from the original
model's hidden states, computed once (``PrefixCache``): the layers before it are unedited.
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import importlib
import json
import math
import os
import socket
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
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
from ..io.hub import parse_spec
from ..plan import Plan, PlanEntry
from ..registry import Registry
from .analyze import layer_metrics, suggest_plan
from .evaluate import first_token_logits, generate, kl_divergence
from .example_models import EXAMPLES
from .inmemory import InMemoryEditor
from .judge import THRESHOLD, JudgeSpec, judge_answers, verdict
from .chat import MAX_PROMPT_TOKENS, cap_prompts
from .models import LoadedModel, batches, format_prompts, load_model, resolve_model
from .streamed import logical_view, require_whole
from .markers import MARKER_SETS, markers_in
from .prompts import prompts_sha256
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

    def record(self, model: str | Path, meas: Measurements) -> dict[str, str]:
        """What a study keeps of this search, to refuse resuming another (study.py): ``model``
        as ``model_name`` says, a local checkpoint by its resolved path."""
        name = model if isinstance(model, str) else str(model.resolve())
        return {"model": name, "directions_sha256": meas.sha256, "space": json.dumps(asdict(self))}


def model_name(given: str | Path, path: Path) -> str | Path:
    """How a study names the model, alike on every machine that shares it: an example by its
    name, a Hub repo as ORG/NAME@COMMIT (the snapshot folder is the commit), else the path."""
    if str(given) in EXAMPLES and not Path(given).exists():
        return str(given)
    spec = parse_spec(str(given))
    return f"{spec[0]}@{path.name}" if spec is not None else path


def header_sha256(ckpt: Checkpoint) -> str:
    """The config and every tensor's name, dtype, shape and place: a cheap identity of the
    model files (another model at the same path, or another copy of a Hub repo, differs)."""
    layout = sorted((n, e.dtype, list(e.shape), e.end - e.start) for n in ckpt.names for e in [ckpt.entry(n)])
    return hashlib.sha256(json.dumps([ckpt.config, layout], sort_keys=True, default=str).encode()).hexdigest()


def prompts_record(harmful: Sequence[str], harmless: Sequence[str], max_prompt_tokens: int) -> str:
    """The prompt sets a trial is scored on, as a study records them (readable in a refusal)."""
    return (f"harmful {len(harmful)} sha256 {prompts_sha256(list(harmful))[:16]}, harmless {len(harmless)} sha256 "
            f"{prompts_sha256(list(harmless))[:16]}, cut to {max_prompt_tokens} tokens")


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


PREFIX_CACHE_BYTES = 2 << 30  # hidden states kept for resuming; beyond this, only every k-th layer's


class PrefixCache:
    """The scoring prompts as fixed batches, the original model's logits on them, and the hidden
    states entering each decoder layer: a trial whose edits all lie in layers >= n gets the
    same logits from the states entering layer n, the layers before it passed through
    (they are the original's, their input the same tokens). A layer is resumed at once
    proven, the first time a trial could resume there, on the shortest prompt alone: its
    resumed pass must give the full pass's logits bit for bit, else the layer is not used (a
    model whose layers are not a plain sequence falls back to full passes). A search resumes
    at few layers: proving every layer up front took a pass for each (a fifth of a 0.5B
    model's search setup)."""

    def __init__(self, lm: LoadedModel, texts: Sequence[str], batch_size: int, enabled: bool = True) -> None:
        self.lm = lm
        self.batches = list(batches(lm, texts, batch_size, True))
        self.order = [i for idx, _ in self.batches for i in idx]
        self.layers = _decoder_layers(lm.model) if enabled and texts else None
        self.states: list[dict[int, torch.Tensor]] = []
        self.proofs: dict[int, bool] = {}  # layer -> whether resuming there was proven exact
        outputs = [lm.forward(enc, output_hidden_states=self.layers is not None) for _, enc in self.batches]
        self.original = self._gather([out.logits[:, -1, :].float() for out in outputs])
        self.kept: list[int] = []
        if self.layers is not None:
            self.kept = self._kept(outputs)
            self.states = [{n: out.hidden_states[n] for n in self.kept} for out in outputs]
            self.proof_text = texts[self.order[0]]

    def _kept(self, outputs: list[Any]) -> list[int]:
        """Layers 1.. whose states fit in ``PREFIX_CACHE_BYTES`` (evenly spaced if not all do)."""
        _, layers = self.layers  # type: ignore[misc]
        per_layer = sum(out.hidden_states[0].numel() * out.hidden_states[0].element_size() for out in outputs)
        stride = max(1, math.ceil(per_layer * (len(layers) - 1) / PREFIX_CACHE_BYTES))
        return list(range(1, len(layers), stride))

    @property
    def resumable(self) -> list[int]:
        """The layers proven so far to resume exactly."""
        return sorted(n for n, exact in self.proofs.items() if exact)

    def _proven(self, n: int) -> bool:
        """Whether resuming the proof prompt's pass at layer ``n`` gives its full pass's logits,
        with the model as it is now (its edits lie at ``n`` or after: the states entering ``n``
        are the original's, and what is compared is two ways of computing the rest)."""
        if n not in self.proofs:
            enc = self.lm.tokenizer([self.proof_text], return_tensors="pt", add_special_tokens=False)
            out = self.lm.forward(enc, output_hidden_states=True)
            try:
                with self._resumed_at(n, out.hidden_states[n]):
                    self.proofs[n] = torch.equal(self.lm.forward(enc).logits, out.logits)
            except Exception:  # a decoder that does not take a pass-through layer: full passes there
                self.proofs[n] = False
        return self.proofs[n]

    def logits(self, edited: Sequence[str]) -> torch.Tensor:
        """[prompts, vocab] first-response logits of the model as it is now, whose parameters
        ``edited`` differ from the original's."""
        start = self.first_layer(edited)
        n = next((n for n in reversed(self.kept) if n <= start and self._proven(n)), 0)
        rows = []
        for b, (_, enc) in enumerate(self.batches):
            with self._resumed_at(n, self.states[b][n]) if n else nullcontext():
                rows.append(self.lm.forward(enc).logits[:, -1, :].float())
        return self._gather(rows)

    def first_layer(self, edited: Sequence[str]) -> int:
        """The first decoder layer holding an edited parameter (0 if one lies outside them)."""
        if self.layers is None:
            return 0
        prefix = self.layers[0]
        found = [name[len(prefix):].split(".")[0] for name in edited]
        if not all(name.startswith(prefix) and f.isdigit() for name, f in zip(edited, found)):
            return 0
        return min((int(f) for f in found), default=len(self.layers[1]))

    @contextmanager
    def _resumed_at(self, n: int, states: torch.Tensor) -> Iterator[None]:
        """Layers 0..n-1 pass their input through (the decoder still counts them, so per-layer
        masks and rotary tables stay at their layers), and layer n takes ``states`` instead."""
        _, layers = self.layers  # type: ignore[misc]

        def replace(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
            if args:
                return (states, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": states}

        skipped = list(layers)[:n]
        hook = layers[n].register_forward_pre_hook(replace, with_kwargs=True)
        for i in range(n):
            layers[i] = _PassThrough()
        try:
            yield
        finally:
            for i, layer in enumerate(skipped):
                layers[i] = layer
            hook.remove()

    def _gather(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """Batch rows back in prompt order."""
        out = torch.cat(rows)
        return out[torch.argsort(torch.tensor(self.order))]


class _PassThrough(torch.nn.Module):
    """A decoder layer that is skipped: its input is its output."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


def _decoder_layers(model: Any) -> tuple[str, torch.nn.ModuleList] | None:
    """(parameter name prefix of layer i without i, the layers) of the text decoder, or None
    where the model does not expose them as a list."""
    try:
        layers = model.get_decoder().layers
    except AttributeError:
        return None
    if not isinstance(layers, torch.nn.ModuleList):
        return None
    return next(((f"{name}.", layers) for name, module in model.named_modules() if module is layers), None)


@dataclass
class Scorer:
    """A loaded model, its edits undone between trials, and the prompts a trial is scored on
    (harmful and harmless in shared batches, resumed after the unedited layers: PrefixCache)."""

    lm: LoadedModel
    ckpt: Checkpoint
    meas: Measurements
    registry: Registry
    harmful: Sequence[str]
    harmless: Sequence[str]
    batch_size: int = 16
    prefix_cache: bool = True
    editor: InMemoryEditor = field(init=False)
    cache: PrefixCache = field(init=False)
    openers: list[int] = field(init=False)
    scored: dict[Hashable, tuple[float, float]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.editor = InMemoryEditor(self.lm, self.ckpt, self.registry)
        texts = format_prompts(self.lm.tokenizer, [*self.harmful, *self.harmless], True, None)
        self.cache = PrefixCache(self.lm, texts, self.batch_size, self.prefix_cache)
        self.openers = opener_ids(self.lm.tokenizer)
        self.arch = self.registry.architecture_for(self.ckpt.config, self.editor.view.names)

    @property
    def reference(self) -> torch.Tensor:
        """The original's first-response logits on the harmless prompts."""
        return self.cache.original[len(self.harmful):]

    def apply(self, plan: Plan, strategy: str) -> None:
        self.editor.apply(plan_edits(self.ckpt, self.arch, plan, self.meas, self.registry.strategy(strategy),
                                     view=self.editor.view))

    def score(self, plan: Plan, strategy: str) -> tuple[float, float]:
        """(refusal score, KL) of ``plan``; the model is restored afterwards. A plan that edits
        as one scored before (the heuristic a search was seeded with, scored again for its
        report) is not passed through the model again: the same edits give the same logits."""
        key = self._edits_key(plan, strategy)
        if key not in self.scored:
            self.apply(plan, strategy)
            try:
                logits = self.cache.logits(self.editor.edited)
            finally:
                self.editor.restore()
            harmful, harmless = logits[: len(self.harmful)], logits[len(self.harmful):]
            self.scored[key] = (float(refusal_log_odds(harmful, self.openers).mean()),
                                float(kl_divergence(self.reference, harmless).mean()))
        return self.scored[key]

    def _edits_key(self, plan: Plan, strategy: str) -> Hashable:
        """What ``plan`` does to the weights, whatever its form: per layer, its measurement, its
        options and the scale of each of the map's components (a scale a plan leaves out is 1)."""
        return strategy, tuple((e.layer, e.measurement, e.sparsity, e.ensemble, e.direction,
                                tuple(e.scale_for(c) for c in self.arch.components))
                               for e in sorted(plan.entries, key=lambda e: e.layer))


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


@dataclass
class Search:
    """A search's inputs, checked, and its study (opened and seeded, nothing loaded yet)."""

    path: Path
    ckpt: Checkpoint
    meas: Measurements
    registry: Registry
    space: Space
    study: Any

    @classmethod
    def open(cls, model: str | Path, directions: Path, harmful: Sequence[str], harmless: Sequence[str], *,
             trials: int, study: str | Path | None = None, seed: int = 0, strategies: Sequence[str] = STRATEGIES,
             registry: Registry | None = None, max_prompt_tokens: int = MAX_PROMPT_TOKENS,
             create: bool = True) -> Search:
        """Check the inputs and open the study (study.py) before any model loads; the process
        that creates the study seeds it with the heuristic plans."""
        optuna = _optuna()
        path = resolve_model(model)
        registry = registry or Registry()
        meas = Measurements.load(directions)
        ckpt = Checkpoint.open(path)
        known = registry.strategies()
        unknown = [s for s in strategies if s not in known]
        if unknown:
            raise AbliterateError(f"unknown strategy {', '.join(unknown)}; registered: {', '.join(sorted(known))}")
        space = Space.of(ckpt, registry.architecture_for(ckpt.config, logical_view(ckpt, registry).names), meas,
                         strategies)
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=min(10, max(trials // 4, 1)))
        record = {**space.record(model_name(model, path), meas), "model_sha256": header_sha256(ckpt),
                  "prompts_sha256": prompts_record(harmful, harmless, max_prompt_tokens)}
        opened = open_study(optuna, study, sampler, record, lambda p: param_problem(p, space),
                            lambda s: seed_study(s, space, meas), create)
        return cls(path, ckpt, meas, registry, space, opened)

    def scorer(self, harmful: Sequence[str], harmless: Sequence[str], *, batch_size: int = 16, dtype: str = "float32",
               lm: LoadedModel | None = None, prefix_cache: bool = True, max_prompt_tokens: int = MAX_PROMPT_TOKENS,
               log: Callable[[str], None] = lambda s: None) -> Scorer:
        """The model loaded (unless ``lm``) and ready to score plans on the prompts, cut to
        ``max_prompt_tokens`` (``cap_prompts``)."""
        if lm is None:
            require_whole(self.path, dtype, "optimize", self.registry)
            lm = load_model(self.path, dtype, registry=self.registry)
        harmful = cap_prompts(lm.tokenizer, harmful, max_prompt_tokens, "harmful", log)
        harmless = cap_prompts(lm.tokenizer, harmless, max_prompt_tokens, "harmless", log)
        return Scorer(lm, self.ckpt, self.meas, self.registry, harmful, harmless, batch_size, prefix_cache)

    def run(self, scorer: Scorer, trials: int, timeout: float | None, progress: bool, max_kl: float) -> None:
        """This worker's share of the trials (``run_trials``), scored by ``scorer``."""
        def objective(trial: Any) -> tuple[float, float]:
            return scorer.score(*plan_from_params(suggest(trial, self.space), self.space))

        release_dead_trials(self.study)
        run_trials(self.study, objective, trials, timeout, progress, max_kl)

    def outcome(self, max_kl: float, seconds: float) -> Outcome:
        """The chosen plan and the Pareto front of the whole study (every worker's trials)."""
        study, space = self.study, self.space
        best = choose(study, max_kl) or min(_complete(study), key=lambda t: t.values[1])
        plan, strategy = plan_from_params(dict(best.params), space)
        front = [{"trial": t.number, "refusal_score": t.values[0], "kl": t.values[1], **_describe(t.params, space)}
                 for t in sorted(study.best_trials, key=lambda t: t.values[1])]
        values = [(t.values[0], t.values[1]) for t in _complete(study)]
        return Outcome(plan, strategy, best.values[0], best.values[1], best.number, best.values[1] <= max_kl, front,
                       values, seconds)


def seed_study(study: Any, space: Space, meas: Measurements) -> None:
    """The heuristic plan (``analyze --suggest-plan``) and softer copies, with each strategy,
    as the first trials: the search ends at least as good, by its own measure."""
    if not space.measured:
        return
    heuristic = suggest_plan(layer_metrics(meas), space.num_layers)
    if heuristic.entries[0].measurement in space.measured:
        for peak in SEED_PEAKS:
            for strategy in space.strategies:
                study.enqueue_trial(heuristic_params(heuristic, strategy, space, peak))


def optimize(model: str | Path, directions: Path, harmful: Sequence[str], harmless: Sequence[str], *, trials: int,
             timeout: float | None, max_kl: float, study: str | Path | None = None, seed: int = 0,
             strategies: Sequence[str] = STRATEGIES, batch_size: int = 16, dtype: str = "float32",
             registry: Registry | None = None, lm: LoadedModel | None = None, progress: bool = True,
             max_prompt_tokens: int = MAX_PROMPT_TOKENS, prefix_cache: bool = True,
             log: Callable[[str], None] = lambda s: None) -> tuple[Outcome, Scorer]:
    """Search plans for ``model`` until the study has ``trials`` finished trials (a shared
    study counts every worker's); returns the chosen plan with the Pareto front of the whole
    study, and the scorer (model still loaded) for a final evaluation. The study is checked
    before the model loads (study.py)."""
    start = time.monotonic()
    search = Search.open(model, directions, harmful, harmless, trials=trials, study=study, seed=seed,
                         strategies=strategies, registry=registry, max_prompt_tokens=max_prompt_tokens)
    scorer = search.scorer(harmful, harmless, batch_size=batch_size, dtype=dtype, lm=lm, prefix_cache=prefix_cache,
                           max_prompt_tokens=max_prompt_tokens, log=log)
    search.run(scorer, trials, timeout, progress, max_kl)
    return search.outcome(max_kl, time.monotonic() - start), scorer


PID_MAX = 1 << 22  # the largest process id Linux gives


def release_dead_trials(study: Any) -> int:
    """Fail the running trials of workers on this machine whose process is gone (a killed
    ``optimize`` or ``run --search``), and queue their parameters again: a resumed search then
    runs them at once, where it would wait for them to go stale (``STALE_S``). Returns how many.

    A worker names itself on a trial as it starts it, but the trial exists a moment before:
    one that names no worker ``ORPHAN_S`` after it started was left by a process killed in
    that moment, and is released too (waiting for a young one to come of that age). The
    worker attribute comes from the study, so it is parsed as hostile input."""
    optuna = _optuna()
    running = (optuna.trial.TrialState.RUNNING,)
    trials = study.get_trials(deepcopy=False, states=running)
    youngest = min((_age(t) for t in trials if "worker" not in t.user_attrs), default=ORPHAN_S)
    if youngest < ORPHAN_S:
        time.sleep(ORPHAN_S - max(0.0, youngest))
        trials = study.get_trials(deepcopy=False, states=running)
    host, released = socket.gethostname(), 0
    for trial in trials:
        if "worker" not in trial.user_attrs:
            if _age(trial) < ORPHAN_S:
                continue
        elif not _dead_here(str(trial.user_attrs["worker"]), host):
            continue
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        study.enqueue_trial(dict(trial.params))
        released += 1
    return released


def _age(trial: Any) -> float:
    """Seconds since ``trial`` started (0 for a start time that is not a time)."""
    start = trial.datetime_start
    return (datetime.datetime.now() - start).total_seconds() if isinstance(start, datetime.datetime) else 0.0


def _dead_here(worker: str, host: str) -> bool:
    """Whether ``worker`` (host:process id) names a process of this machine that is gone."""
    name, _, digits = worker.rpartition(":")
    pid = int(digits) if digits.isdigit() else 0
    if name != host or not 0 < pid < PID_MAX or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
        return False  # alive (or reused by another process: it goes stale in time)
    except PermissionError:
        return False  # alive, another user's
    except ProcessLookupError:
        return True


POLL_S = 2.0  # how often a worker with nothing left to start looks at the others' trials
ORPHAN_S = 10.0  # a running trial that names no worker this long after it started has none alive
STALE_S = 600.0  # a trial running this long (or 10x the slowest finished one) is taken for a dead worker's


def run_trials(study: Any, objective: Callable[[Any], tuple[float, float]], trials: int, timeout: float | None,
               progress: bool, max_kl: float) -> None:
    """Run trials until the study has ``trials`` finished, counting every worker's: a trial
    starts only while finished and running ones are fewer; of trials started at once past
    that count, those of higher number stand down (pruned, not scored). Then wait for the
    others' running trials, so the study is whole when this worker reports; a trial that
    fails elsewhere is run again here. Each trial records the worker (host:process) that ran
    it. ``timeout``: no trial starts, and no waiting, after it."""
    optuna = _optuna()
    deadline = math.inf if timeout is None else time.monotonic() + timeout
    running, complete = optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.COMPLETE
    worker = f"{socket.gethostname()}:{os.getpid()}"

    def counts(upto: float = math.inf) -> tuple[int, int]:
        """(finished, live running of number <= upto) trials of the study."""
        found = study.get_trials(deepcopy=False, states=(complete, running))
        done = [t for t in found if t.state == complete]
        stale = max([STALE_S, *(10 * (t.datetime_complete - t.datetime_start).total_seconds() for t in done)])
        now = datetime.datetime.now()
        live = [t for t in found if t.state == running and t.number <= upto
                and (now - t.datetime_start).total_seconds() < stale]
        return len(done), len(live)

    def claimed(trial: Any) -> tuple[float, float]:
        trial.set_user_attr("worker", worker)  # first: see release_dead_trials
        if sum(counts(trial.number)) > trials:
            study.stop()
            raise optuna.TrialPruned("the study has its trials")
        return objective(trial)

    with tqdm(total=trials, unit="trial", desc="optimize", disable=not progress) as bar:
        def report(study: Any, trial: Any) -> None:
            done, live = counts()
            bar.update(min(done, trials) - bar.n)
            best = choose(study, max_kl)
            if best is not None:
                bar.set_postfix_str(f"best: score {best.values[0]:+.2f}, KL {best.values[1]:.3f} (trial {best.number})")
            if done + live >= trials:
                study.stop()

        while (left := deadline - time.monotonic()) > 0:
            done, live = counts()
            bar.update(min(done, trials) - bar.n)
            if done + live < trials:
                study.optimize(claimed, timeout=None if math.isinf(left) else left, callbacks=[report])
            elif live:
                time.sleep(min(POLL_S, left))
            else:
                break


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
    refusals: dict[str, int]  # per marker set, and "judge" once judged
    prompts: int
    kl: float
    answers: list[dict[str, Any]]

    def judge(self, spec: JudgeSpec, *, batch_size: int, progress: bool) -> None:
        """Each answer judged by ``spec`` too (load it once the scorer's model is released: one
        model in memory at a time): its verdict and probability beside the markers'."""
        p = judge_answers(spec, [a["prompt"] for a in self.answers], [a["answer"] for a in self.answers],
                          batch_size=batch_size, progress=progress)
        for row, prob in zip(self.answers, p, strict=True):
            row["judge"] = verdict(spec.name, prob)
        self.refusals["judge"] = sum(prob >= THRESHOLD for prob in p)


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


@functools.cache
def _optuna() -> Any:
    """optuna, imported once, on a thread of its own. optuna keeps the error of each optional
    import that failed (redis, ...) with its traceback, and so every frame that was running
    when it was first imported, with the locals those frames come to hold: imported from the
    search, it kept the loaded model alive until the process ended (in ``run``, 3 GB more
    through the evaluation, whose page faults then cost four times as much)."""
    try:
        with ThreadPoolExecutor(1) as pool:
            optuna = pool.submit(importlib.import_module, "optuna").result()
    except ImportError:
        raise AbliterateError("optimize needs optuna: pip install -e '.[optimize]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna
