"""``abliterate run``: from a model (a checkpoint, a Hub repo, an example) to a verified, evaluated
and optionally published abliteration, every step's artifact in one work folder.

A rerun resumes. Each step records (in ``run.json``) a hash of its inputs: the recipe's
choices that matter to it and the identity of every artifact it reads (a file's sha256;
the rewritten model's record). A step whose inputs and outputs are as recorded is skipped
and says so; any change redoes that step, and through the artifacts it writes, every step
after it. Every artifact is written atomically, so a run killed anywhere resumes from the
last finished step (the rewrite from its last finished shard).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import AbliterateError
from ..io.checkpoint import Checkpoint
from ..io.files import DOWNLOAD_DIR, copy_atomic, exclusive_lock, sha256_file, write_atomic
from ..io.hub import parse_spec, repo_files
from ..io.manifest import MANIFEST_NAME, load_manifest
from ..plan import Plan, load_plan
from .example_models import resolve_source
from .models import resolve_model
from .recipe import DEFAULT_STRATEGY, Recipe

if TYPE_CHECKING:
    from .judge import JudgeSpec

STATE = "run.json"
RECIPE = "run.yml"
DIRECTIONS, HEURISTIC, PLAN, MODEL = "directions.safetensors", "plan-heuristic.yml", "plan.yml", "model"
EVALUATION, CARD, PUSHED, REPORT = "evaluation.json", "card.md", "pushed.json", "report.json"
ANSWERS = ("answers-original.jsonl", "answers-abliterated.jsonl")
STUDY = re.compile(r"study-[0-9a-f]{16}\.db")  # the search's study, study-KEY.db (sqlite): resumed by a rerun
SEARCH_PROMPTS = 32  # of each measurement set, for optimize's search (its held-out sets stay apart)


@dataclass
class StepResult:
    name: str
    status: str  # done, skipped
    seconds: float
    produced: str


class Run:
    """One run of ``recipe`` in ``work``; ``steps()`` lists what it will do, ``go()`` does it."""

    def __init__(self, recipe: Recipe, work: Path, *, progress: bool = True,
                 log: Callable[[str], None] = print) -> None:
        if recipe.model is None:
            raise AbliterateError("no MODEL given (argument or the recipe's 'model')")
        if work.is_symlink() or (work.exists() and not work.is_dir()):
            raise AbliterateError(f"work folder {work} is a link or not a directory")
        self.recipe, self.work, self.progress, self.log = recipe, work, progress, log
        self.results: list[StepResult] = []
        self.state: dict[str, Any] = {}

    # -- what the model is

    @cached_property
    def hub(self) -> tuple[str, str] | None:
        """(repo, resolved commit) of a Hub model: every step reads that commit, whatever the Hub does meanwhile."""
        spec = parse_spec(str(self.recipe.model))
        return None if spec is None else (spec[0], repo_files(*spec)[0])

    @cached_property
    def source(self) -> str:
        """What the rewrite and verify read: the pinned Hub repo, or the local checkpoint's folder."""
        if self.hub:
            return f"{self.hub[0]}@{self.hub[1]}"
        return resolve_source(str(self.recipe.model))

    @cached_property
    def model_path(self) -> Path:
        """The model as measure, optimize and evaluate load it (a Hub repo: in the Hugging Face cache)."""
        return resolve_model(self.source)

    @cached_property
    def identity(self) -> str:
        """What the steps' inputs name the model by: a Hub commit, or a local checkpoint's files."""
        if self.hub:
            return self.source
        ckpt = Checkpoint.open(self.source)
        files = [(s.name, s.path.stat().st_size, s.path.stat().st_mtime_ns) for s in ckpt.shards]
        return _digest({"config": ckpt.config, "files": files, "index": ckpt.index_name and ckpt.index_bytes().hex()})

    @property
    def remote(self) -> bool:
        """A Hub model under --low-disk: streamed from the Hub by byte range, never held on disk."""
        return bool(self.hub and self.recipe.low_disk)

    @property
    def lab_model(self) -> str | Path:
        """What measure and evaluate read: the pinned Hub repo itself under --low-disk, else the local files."""
        return self.source if self.remote else self.model_path

    @cached_property
    def fits(self) -> bool:
        """Whether the model fits in memory whole (else it is streamed: no search, no generation)."""
        from .streamed import logical_view, memory_choice

        if self.remote:
            self.log("--low-disk: the model is streamed from the Hub, so it is not loaded whole")
            return False
        ckpt = Checkpoint.open(self.model_path)
        choice = memory_choice(ckpt, logical_view(ckpt), "float32", self.recipe.max_memory)
        self.log(choice.reason)
        return not choice.stream

    @cached_property
    def judge(self) -> JudgeSpec | None:
        """The recipe's judge, checked (its config, not its weights)."""
        from .judge import check_judge

        return check_judge(self.recipe.judge, self.recipe.judge_label) if self.recipe.judge else None

    # -- the run

    def steps(self) -> list[tuple[str, Callable[[], tuple[dict[str, Any], list[str], Callable[[], str]]]]]:
        steps = [("measure", self.measure), ("analyze", self.analyze), ("plan", self.plan), ("rewrite", self.rewrite),
                 ("verify", self.verify), ("evaluate", self.evaluate), ("card", self.card)]
        return steps + [("push", self.push)] * bool(self.recipe.push_to)

    def go(self) -> dict[str, Any]:
        """Every step, in order, each done or skipped; returns (and writes to report.json) the report."""
        if self.judge is not None:  # a bad judge fails before anything is written
            self.log(f"judge: {self.judge.name}")
        self.work.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.work):
            self.recipe.with_changes(model=self.source if self.hub else self.recipe.model).save(self.work / RECIPE)
            if self.remote:
                self.log("note: --low-disk: rewrite and verify hold one shard of the Hub model at a time; measure "
                         "streams it from the Hub by byte range; no search (it needs the model whole)")
            self.state = _read_state(self.work / STATE)
            steps = self.steps()
            for i, (name, prepare) in enumerate(steps, 1):
                self._step(f"{i}/{len(steps)} {name}", name, *prepare())
            report = self.report()
            write_atomic(self.work / REPORT, (json.dumps(report, indent=2) + "\n").encode())
        return report

    def _step(self, heading: str, name: str, inputs: dict[str, Any], outputs: list[str], do: Callable[[], str]) -> None:
        key = _digest({**inputs, "tool": __version__})
        done = self.state.get(name)
        if (isinstance(done, dict) and done.get("inputs") == key and isinstance(done.get("outputs"), dict)
                and all(self._identity(o) == done["outputs"].get(o) for o in outputs)):
            produced = str(done.get("produced", ""))
            self.log(f"\n== {heading}: skipped, its inputs have not changed ({produced})")
            self.results.append(StepResult(name, "skipped", 0.0, produced))
            return
        self.log(f"\n== {heading}")
        self.state.pop(name, None)  # not finished until it is recorded again
        start = time.monotonic()
        produced = do()
        seconds = round(time.monotonic() - start, 1)
        self.state[name] = {"inputs": key, "outputs": {o: self._identity(o) for o in outputs}, "produced": produced,
                            "seconds": seconds}
        write_atomic(self.work / STATE, (json.dumps(self.state, indent=2, sort_keys=True) + "\n").encode())
        self.log(f"-- {name}: {produced} ({seconds:.1f} s)")
        self.results.append(StepResult(name, "done", seconds, produced))

    def _identity(self, name: str) -> str | None:
        """A file's sha256; the rewritten model's record, if its shards are those it records; None if missing."""
        path = self.work / name
        if name != MODEL:
            return sha256_file(path) if path.is_file() and not path.is_symlink() else None
        manifest = load_manifest(path)
        if not manifest or not manifest["complete"]:
            return None
        for shard, rec in manifest["shards"].items():
            st = os.lstat(path / shard) if (path / shard).exists() else None
            if st is None or (st.st_size, st.st_mtime_ns) != (rec["size"], rec["mtime_ns"]):
                return None
        return sha256_file(path / MANIFEST_NAME)

    def _inputs(self, *names: str, **choices: Any) -> dict[str, Any]:
        return {"artifacts": {n: self._identity(n) for n in names}, **choices}

    # -- the steps: each returns (its inputs, its outputs, the function that does it)

    def measure(self) -> tuple[dict[str, Any], list[str], Callable[[], str]]:
        r = self.recipe
        if r.directions:
            given = Path(r.directions)

            def copy() -> str:
                copy_atomic(given, self.work / DIRECTIONS)
                return f"{DIRECTIONS}: a copy of {given}"

            return {"given": sha256_file(given)}, [DIRECTIONS], copy

        def measure() -> str:
            from .measure import measure

            harmful, harmless = self._prompts("measure")
            m = measure(self.lab_model, harmful, harmless, batch_size=r.batch_size, progress=self.progress,
                        max_memory=r.max_memory, refused_only=r.refused_only, log=self.log, low_disk=self.remote)
            m.save(self.work / DIRECTIONS)
            return f"{DIRECTIONS}: {len(m.layers)} layers, width {m.width}, {m.harmful_count} harmful prompts"

        return ({"source": self.identity, "refused_only": r.refused_only, "max_prompts": r.max_prompts,
                 "batch_size": r.batch_size}, [DIRECTIONS], measure)

    def analyze(self) -> tuple[dict[str, Any], list[str], Callable[[], str]]:
        def analyze() -> str:
            from ..directions import Measurements
            from .analyze import chart, layer_metrics, suggest_plan, table

            m = Measurements.load(self.work / DIRECTIONS)
            metrics = layer_metrics(m)
            lines = list(table(metrics))
            for line in lines:
                self.log(line)
            write_atomic(self.work / "analysis.txt", ("\n".join(lines) + "\n").encode())
            heuristic = self._plan(suggest_plan(metrics, len(m.layers)), None)
            heuristic.save(self.work / HEURISTIC, "written by abliterate run: analyze's heuristic plan")
            self._chart(lambda path: chart(metrics, path, title=str(self.recipe.model), plan=heuristic), "layers.png")
            return f"analysis.txt, layers.png, {HEURISTIC} ({_layers(heuristic)})"

        return self._inputs(DIRECTIONS), ["analysis.txt", HEURISTIC], analyze

    def plan(self) -> tuple[dict[str, Any], list[str], Callable[[], str]]:
        r = self.recipe
        if r.plan:
            given = load_plan(r.plan)  # checked now: a bad plan stops the run before anything is redone

            def copy() -> str:
                plan = self._plan(given, r.strategy or given.strategy or DEFAULT_STRATEGY)
                plan.save(self.work / PLAN, f"written by abliterate run: {r.plan}")
                return f"{PLAN}: {r.plan}, {_layers(plan)}, {plan.strategy}"

            return {"given": sha256_file(Path(r.plan)), "strategy": r.strategy}, [PLAN], copy
        search = r.search and self.fits
        if r.search and not search:
            self.log("the model does not fit in memory whole: no search, analyze's heuristic plan")
        inputs = self._inputs(DIRECTIONS, HEURISTIC, strategy=r.strategy, search=search)
        if search:
            inputs.update(source=self.identity, trials=r.trials, max_kl=r.max_kl, batch_size=r.batch_size)
        return inputs, [PLAN], (self._search if search else self._heuristic)

    def _heuristic(self) -> str:
        plan = self._plan(load_plan(self.work / HEURISTIC), self.recipe.strategy or DEFAULT_STRATEGY)
        plan.save(self.work / PLAN, "written by abliterate run: analyze's heuristic plan")
        return f"{PLAN}: the heuristic plan, {_layers(plan)}, {plan.strategy}"

    def _search(self) -> str:
        from .optimize import optimize, pareto_chart

        r = self.recipe
        harmful, harmless = (p[:SEARCH_PROMPTS] for p in self._prompts("measure"))
        strategies = (r.strategy,) if r.strategy else (DEFAULT_STRATEGY,)
        outcome, scorer = optimize(self.model_path, self.work / DIRECTIONS, harmful, harmless, trials=r.trials,
                                   timeout=None, max_kl=r.max_kl, strategies=strategies, batch_size=r.batch_size,
                                   study=self._study(strategies), progress=self.progress, log=self.log)
        heuristic = load_plan(self.work / HEURISTIC)
        score, kl = scorer.score(heuristic, outcome.strategy)
        del scorer  # the model it holds is not needed any more
        plan = self._plan(outcome.plan, outcome.strategy)
        plan.save(self.work / PLAN, f"written by abliterate run: optimize, {r.trials} trials")
        self.log(f"{'plan':<10} {'refusal score':>13} {'KL':>8}  (search prompts: measurement halves)")
        self.log(f"{'heuristic':<10} {score:>+13.3f} {kl:>8.4f}  {_layers(heuristic)}")
        self.log(f"{'optimized':<10} {outcome.refusal_score:>+13.3f} {outcome.kl:>8.4f}  {_layers(plan)}")
        self._chart(lambda path: pareto_chart(outcome, path, r.max_kl), "plan.png")
        return f"{PLAN}: optimized over {r.trials} trials, {_layers(plan)}, {plan.strategy}; plan.png"

    def _study(self, strategies: tuple[str, ...]) -> Path:
        """The search's study file, named by what the study depends on (the model, the directions,
        the strategies), so that a killed search resumes with the trials it finished, and a
        changed input starts a study of its own; studies of earlier inputs are removed."""
        key = _digest({"source": self.identity, "directions": self._identity(DIRECTIONS), "strategies": strategies,
                       "tool": __version__})[:16]
        study = self.work / f"study-{key}.db"
        for old in self.work.glob("study-*.db"):  # only names of STUDY's form: a user's files stay
            if old != study and STUDY.fullmatch(old.name) and not old.is_symlink() and old.is_file():
                old.unlink()
        if study.is_file():
            self.log(f"resuming the search in {study.name}")
        return study

    def rewrite(self) -> tuple[dict[str, Any], list[str], Callable[[], str]]:
        def rewrite() -> str:
            with self._job(self.work / MODEL) as job:
                summary = job.run(self.work / MODEL, overwrite=True, progress=self.progress)
            return (f"{MODEL}/: {summary.tensors_edited} tensors edited, {summary.shards_written} shards written, "
                    f"{summary.shards_reused} kept from an earlier run")

        return self._inputs(DIRECTIONS, PLAN, source=self.identity), [MODEL], rewrite

    @contextmanager
    def _job(self, output: Path | None) -> Iterator[Any]:
        """The rewrite of this run's plan; with --low-disk a Hub source's shards are downloaded into
        the work folder one at a time, and that folder is removed after the block."""
        from ..pipeline import prepare

        plan = load_plan(self.work / PLAN)
        download = self.work / DOWNLOAD_DIR if self.recipe.low_disk else None
        try:
            yield prepare(self.source, output, self.work / DIRECTIONS, plan, plan.strategy or DEFAULT_STRATEGY,
                          download_dir=download)
        finally:
            if download is not None:
                shutil.rmtree(download, ignore_errors=True)

    def verify(self) -> tuple[dict[str, Any], list[str], Callable[[], str]]:
        def verify() -> str:
            from ..verify import verify

            with self._job(None) as job:
                problems = list(verify(job, self.work / MODEL, progress=self.progress))
            text = "\n".join(problems) if problems else (f"verified: {len(job.edits)} edited tensors bit for bit, "
                                                         "every other byte equal to the source's")
            write_atomic(self.work / "verify.txt", (text + "\n").encode())
            if problems:
                raise AbliterateError(f"verify: {len(problems)} problems in {self.work / MODEL}: see "
                                      f"{self.work / 'verify.txt'}")
            return f"verify.txt ({text})"

        return self._inputs(MODEL, DIRECTIONS, PLAN, source=self.identity), ["verify.txt"], verify

    def evaluate(self) -> tuple[dict[str, Any], list[str], Callable[[], str]]:
        r = self.recipe

        def evaluate() -> str:
            from .evaluate import evaluate
            from .markers import MARKER_SETS

            harmful, harmless = self._prompts("eval")
            kw = dict(max_new_tokens=r.max_new_tokens, batch_size=r.batch_size, progress=self.progress,
                      max_memory=r.max_memory, log=self.log, low_disk=self.remote, judge=judge,
                      judge_batch_size=r.judge_batch_size)
            before = evaluate(self.lab_model, harmful, harmless, cache_as_original=True, **kw)
            after = evaluate(self.work / MODEL, harmful, harmless, original=self.lab_model, capability=r.capability,
                             **kw)
            for name, result in zip(ANSWERS, (before, after)):
                if result.refusals is not None:
                    result.save_answers(self.work / name, dict(MARKER_SETS))
            doc = {**_numbers(after), "original": _numbers(before)}
            write_atomic(self.work / EVALUATION, (json.dumps(doc, indent=2) + "\n").encode())
            counted = (f"refusals {before.refusals}/{before.prompts} -> {after.refusals}/{after.prompts}"
                       if after.refusals is not None else
                       f"refusal score {before.refusal_score:+.3f} -> {after.refusal_score:+.3f} (streamed: no generation)")
            return f"{EVALUATION}: {counted}, KL {after.kl:.4f}"

        judge = self.judge
        inputs = self._inputs(MODEL, source=self.identity, max_new_tokens=r.max_new_tokens, max_prompts=r.max_prompts,
                              batch_size=r.batch_size, max_memory=r.max_memory, capability=r.capability,
                              judge=judge and judge.name)
        return inputs, [EVALUATION, *ANSWERS], evaluate

    def card(self) -> tuple[dict[str, Any], list[str], Callable[[], str]]:
        def card() -> str:
            from ..io.publish import model_card

            manifest = load_manifest(self.work / MODEL) or {}
            text = model_card(manifest, base_model=None, evaluation=self._evaluation(), repo=self.recipe.push_to)
            write_atomic(self.work / CARD, text.encode())
            return f"{CARD}: method, plan, provenance, evaluation and how to verify"

        return self._inputs(MODEL, EVALUATION, repo=self.recipe.push_to), [CARD], card

    def push(self) -> tuple[dict[str, Any], list[str], Callable[[], str]]:
        r = self.recipe
        assert r.push_to is not None

        def push() -> str:
            from ..io.publish import Publisher, publish

            publisher = Publisher(r.push_to, private=r.private, log=self.log)
            publisher.start()
            commit = publish(self.work / MODEL, publisher=publisher, directions=self.work / DIRECTIONS,
                             evaluation=self._evaluation())
            write_atomic(self.work / PUSHED, (json.dumps({"repo": r.push_to, "commit": commit}) + "\n").encode())
            return f"pushed to {r.push_to} (commit {commit})"

        return self._inputs(MODEL, DIRECTIONS, CARD, repo=r.push_to, private=r.private), [PUSHED], push

    # -- helpers

    def _prompts(self, kind: str) -> tuple[list[str], list[str]]:
        from .prompts import default_prompts

        n = self.recipe.max_prompts
        return default_prompts(f"harmful-{kind}")[:n], default_prompts(f"harmless-{kind}")[:n]

    def _plan(self, plan: Plan, strategy: str | None) -> Plan:
        """``plan``'s entries, with this run's paths and the strategy it is meant for."""
        return Plan(plan.entries, model=self.source, measurements=str(self.work / DIRECTIONS),
                    output=str(self.work / MODEL), strategy=strategy)

    def _evaluation(self) -> dict[str, Any]:
        return json.loads((self.work / EVALUATION).read_text())

    def _chart(self, draw: Callable[[Path], None], name: str) -> None:
        """A chart is a nicety: drawn into a fresh folder and moved into place (never through a
        link), or a line saying why there is none."""
        folder = Path(tempfile.mkdtemp(dir=self.work, prefix=".chart-"))
        try:
            draw(folder / name)
            os.replace(folder / name, self.work / name)
        except Exception as exc:  # matplotlib missing, a font problem: the run goes on without it
            self.log(f"(no chart {name}: {exc})")
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def report(self) -> dict[str, Any]:
        """What the run made, for report.json and the summary."""
        evaluation = self._evaluation()
        plan = load_plan(self.work / PLAN)
        pushed = json.loads((self.work / PUSHED).read_text()) if self.recipe.push_to else None
        return {"model": str(self.recipe.model), "source": self.source, "strategy": plan.strategy,
                "plan": _layers(plan), "search": self.state.get("plan", {}).get("produced"),
                "evaluation": evaluation, "verified": True, "pushed": pushed, "output": str(self.work / MODEL),
                "steps": [asdict(s) for s in self.results]}


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The final table: each step, done or skipped, its time and what it produced; then the numbers."""
    steps = report["steps"]
    width = max(len(s["name"]) for s in steps)
    lines = ["", "== summary", f"{'step':<{width}}  {'status':<7}  {'time':>7}  produced"]
    for s in steps:
        time_ = f"{s['seconds']:.1f} s" if s["status"] == "done" else "-"
        lines.append(f"{s['name']:<{width}}  {s['status']:<7}  {time_:>7}  {s['produced']}")
    e = report["evaluation"]
    lines.append(f"model: {report['source']}   plan: {report['plan']}, {report['strategy']}   output: {report['output']}")
    if e.get("refusals") is not None:
        lines.append(f"refusals on {e['prompts']} held-out prompts: {e['original']['refusals']} before, "
                     f"{e['refusals']} after; KL {e['kl']:.4f}")
    else:
        lines.append(f"refusal score {e['original']['refusal_score']:+.3f} before, {e['refusal_score']:+.3f} after "
                     f"(streamed: no generation); KL {e['kl']:.4f}")
    if report["pushed"]:
        lines.append(f"published: {report['pushed']['repo']} (commit {report['pushed']['commit']})")
    return lines


def _numbers(result: Any) -> dict[str, Any]:
    """An evaluation without its answers (those are in answers-*.jsonl) or local paths."""
    left_out = ("model", "refused", "responses", "judge_p", "categories")  # a path, and per-prompt figures
    return {k: v for k, v in result.as_dict().items() if k not in left_out}


def _layers(plan: Plan) -> str:
    layers = [e.layer for e in plan.entries]
    return f"layers {min(layers)}-{max(layers)}, measurement {plan.entries[0].measurement}"


def _digest(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _read_state(path: Path) -> dict[str, Any]:
    """The steps an earlier run finished; anything unreadable counts as none (every step is redone)."""
    try:
        if path.is_symlink() or path.stat().st_size > 1 << 20:
            return {}
        doc = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return doc if isinstance(doc, dict) else {}
