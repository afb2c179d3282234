"""optimize on a shared study: workers (--jobs) on one journal file or one SQLite file finish
one study together, a report from the finished study chooses what they chose, a worker of
another search is refused by name, bad --study values are one line; the prefix cache scores
as the full passes do."""
from __future__ import annotations

import json
import importlib.util
from pathlib import Path

import optuna
import pytest
import torch
from click.testing import CliRunner

from rewriter.cli import main
from rewriter.lab.optimize import Search, plan_from_params
from rewriter.lab.prompts import default_prompts
from rewriter.lab.study import STUDY_NAME, parse_storage
from rewriter.plan import Plan, PlanEntry
from tests.helpers import copy_checkpoint, fail

optuna.logging.set_verbosity(optuna.logging.WARNING)


def args(chat_model: tuple[Path, Path], plan: Path, study: str, *extra: str) -> list[str]:
    model, directions = chat_model
    return ["optimize", str(model), "-d", str(directions), "-o", str(plan), "--study", study, "--search-prompts", "4",
            "--no-final-eval", "-q", *extra]


@pytest.mark.parametrize("where", ["journal:study.log", "sqlite:///study.db"])
def test_two_workers_finish_one_study_and_a_report_chooses_the_same(chat_model: tuple[Path, Path], tmp_path: Path,
                                                                     where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the study's path is relative, as a shared folder's often is
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent.parent))  # the workers import the plugin
    # trials slowed to about a second, and each worker's first waits for the other's (tests/slow_plugin.py):
    # both workers start before the study is done
    monkeypatch.setenv("ABLITERATE_TEST_WORKERS", "2")
    result = CliRunner().invoke(main, args(chat_model, tmp_path / "plan.yml", where, "--jobs", "2", "--trials", "12",
                                           "--strategy", "slow-standard", "-p", "tests.slow_plugin"))
    assert result.exit_code == 0, result.output
    storage = parse_storage(where).open(optuna)
    trials = optuna.load_study(study_name=STUDY_NAME, storage=storage).trials
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 12 and "12 trials in" in result.output
    workers = [t.user_attrs["worker"] for t in done]
    assert len(set(workers)) == 2 and all(workers.count(w) >= 1 for w in set(workers)), workers
    points = [json.dumps(t.params, sort_keys=True) for t in done]
    assert len(set(points)) == 12, "no plan was scored twice (the 3 seeded ones by one worker each)"
    report = CliRunner().invoke(main, args(chat_model, tmp_path / "again.yml", where, "--report", "--trials", "12",
                                           "--strategy", "slow-standard", "-p", "tests.slow_plugin"))
    assert report.exit_code == 0, report.output
    assert len([t for t in optuna.load_study(study_name=STUDY_NAME, storage=storage).trials]) == len(trials)
    chosen = [line for line in result.output.splitlines() if line.startswith("chosen:")]
    assert chosen and chosen == [line.replace("again.yml", "plan.yml") for line in report.output.splitlines()
                                 if line.startswith("chosen:")]
    assert (tmp_path / "plan.yml").read_text() == (tmp_path / "again.yml").read_text()


def test_a_worker_of_another_model_or_space_is_refused_by_name(chat_model: tuple[Path, Path], tmp_path: Path) -> None:
    model = copy_checkpoint(chat_model[0], tmp_path / "model")
    study = f"journal:{tmp_path / 'study.log'}"
    first = CliRunner().invoke(main, args((model, chat_model[1]), tmp_path / "plan.yml", study, "--trials", "2"))
    assert first.exit_code == 0, first.output
    before = (tmp_path / "study.log").read_bytes()
    fail(args((model, chat_model[1]), tmp_path / "p.yml", study, "--trials", "3", "--strategy", "standard"),
         "made for another search space", tmp_path / "p.yml")
    fail(args(chat_model, tmp_path / "p.yml", study, "--trials", "3"), "made for another model (", tmp_path / "p.yml")
    fail(args((model, chat_model[1]), tmp_path / "p.yml", study, "--trials", "3", "--search-prompts", "5"),
         "made for another prompt sets (harmful 4 ", tmp_path / "p.yml")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rope_theta": 5000.0}))  # same path, other model
    fail(args((model, chat_model[1]), tmp_path / "p.yml", study, "--trials", "3"),
         "made for another model header (config and tensor layout)", tmp_path / "p.yml")
    assert (tmp_path / "study.log").read_bytes() == before, "a refused worker writes nothing to the study"


@pytest.mark.parametrize("study, expected", [
    ("postgresql://me:secret@db.example:port/s", "--study postgresql://me:***@db.example:port/s: not a database URL"),
    ("nosuchdb://host/s", "unknown database kind 'nosuchdb'"),
    ("mysql://me:secret@127.0.0.1:1/s", "--study mysql://me:***@127.0.0.1:1/s: cannot be used as a study ("),
    ("journal:", "names no file"),
    ("journal:{tmp}/missing/study.log", "folder {tmp}/missing does not exist"),
    ("{tmp}/link.log", "the journal is a symbolic link"),
    ("journal:{tmp}", "not a regular file"),
    ("{tmp}/locked.log", "is in the way of the journal's lock"),
    ("{tmp}/notes.log", "not an Optuna journal"),
    ("redis://localhost:1/0", "needs the redis package"),
])
def test_a_bad_study_is_one_line(chat_model: tuple[Path, Path], tmp_path: Path, study: str, expected: str) -> None:
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "link.log").symlink_to(tmp_path / "notes.txt")
    (tmp_path / "notes.log").write_text("my notes\n")
    (tmp_path / "locked.log.lock").write_text("mine\n")
    if study.startswith("redis") and importlib.util.find_spec("redis") is not None:
        expected = "cannot be used as a study ("
    study, expected = study.format(tmp=tmp_path), expected.format(tmp=tmp_path)
    fail(args(chat_model, tmp_path / "plan.yml", study, "--trials", "2"), expected, tmp_path / "plan.yml")
    assert "secret" not in expected and (tmp_path / "notes.txt").read_text() == "my notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.log", "locked.log.lock", "notes.log", "notes.txt"]


def test_report_needs_a_study_that_exists(chat_model: tuple[Path, Path], tmp_path: Path) -> None:
    fail(args(chat_model, tmp_path / "plan.yml", str(tmp_path / "s.log"), "--report"), "holds no study of optimize yet")
    result = CliRunner().invoke(main, [a for a in args(chat_model, tmp_path / "plan.yml", "x") if a not in ("--study", "x")]
                                + ["--report"])
    assert result.exit_code == 1 and "--report reads the study of --study" in result.output


def test_the_prefix_cache_scores_as_full_passes_do(chat_model: tuple[Path, Path]) -> None:
    model, directions = chat_model
    harmful, harmless = default_prompts("harmful-measure")[:6], default_prompts("harmless-measure")[:5]
    search = Search.open(model, directions, harmful, harmless, trials=4)
    cached = search.scorer(harmful, harmless, batch_size=4)
    full = search.scorer(harmful, harmless, batch_size=4, lm=cached.lm, prefix_cache=False)
    assert cached.cache.resumable == [] and torch.equal(cached.reference, full.reference)
    for first in range(4):
        plan = Plan(tuple(PlanEntry(n, 2, 1.0) for n in range(first, 4)))
        cached.apply(plan, "standard")
        assert cached.cache.first_layer(cached.editor.edited) == first
        cached.editor.restore()
        assert cached.score(plan, "standard") == full.score(plan, "standard"), first
        assert cached.cache.resumable == list(range(1, first + 1)), "each layer proven as a trial first resumes there"
    assert full.cache.resumable == []
    # the last plan again, its component scales written out: the same edits, not scored again
    scored = len(cached.scored)
    same = Plan((PlanEntry(3, 2, 1.0, {c: 1.0 for c in search.space.components}),))
    assert cached.score(same, "standard") == full.score(plan, "standard") and len(cached.scored) == scored
    nothing = plan_from_params({**{f"{c}_{k}": v for c in search.space.components
                                   for k, v in (("peak", 0.0), ("position", 0.5), ("floor", 0.0), ("width", 1.0))},
                                "measurement": 2, "center": 1.0, "half_width": 0.5, "strategy": "standard"},
                               search.space)
    assert cached.score(*nothing) == full.score(*nothing)


def test_running_trials_of_a_dead_process_here_are_failed_and_queued_again(monkeypatch) -> None:
    """A trial left running by a killed worker on this machine is failed and its parameters queued
    again; one of a live process, of another machine, or with a worker attribute that is not a
    host and process id (the study is hostile input) is left to go stale. One that names no
    worker (its process was killed as it began it) is released once it is ORPHAN_S old: a
    young one is waited for."""
    import os
    import socket
    import subprocess
    import sys
    import time

    from rewriter.lab import optimize as optimize_module
    from rewriter.lab.optimize import release_dead_trials

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = socket.gethostname()
    study = optuna.create_study(directions=["minimize", "minimize"])
    workers = [f"{host}:{gone.pid}", f"{host}:{os.getppid()}", f"elsewhere:{gone.pid}", f"{host}:99999999999",
               f"{host}:-1", "no colon", f"{host}:{os.getpid()}"]
    for worker in workers:
        trial = study.ask()
        trial.suggest_int("layer", 0, 10)
        trial.set_user_attr("worker", worker)
    unnamed = study.ask()
    unnamed.suggest_int("layer", 0, 10)
    monkeypatch.setattr(optimize_module, "ORPHAN_S", 0.5)
    start = time.monotonic()
    assert release_dead_trials(study) == 2
    assert time.monotonic() - start >= 0.4, "the unnamed trial was released before it was ORPHAN_S old"
    states = [t.state for t in study.get_trials(deepcopy=False)]
    assert states[0] == states[len(workers)] == optuna.trial.TrialState.FAIL
    assert states[1 : len(workers)] == [optuna.trial.TrialState.RUNNING] * (len(workers) - 1)
    queued = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in queued] == [study.trials[0].params, unnamed.params]
