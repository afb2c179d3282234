"""`abliterate run`: a Hub model to a pushed, verifiable repo in one command; a rerun resumes,
a changed input redoes its step and those after it, a run killed in any step resumes to the
same bytes. Against the loopback Hub (the real huggingface_hub client) and a tiny llama with
a word-level tokenizer."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rewriter.directions import Measurements
from rewriter.lab.run import ANSWERS, DIRECTIONS, EVALUATION, HEURISTIC, PLAN
from tests.helpers import build_model, tiny_tokenizer, write_checkpoint
from tests.hub_server import HubServer
from tests.test_hub import TOKEN, assert_one_line_error, cli, host, hub  # noqa: F401  (hub: the fixture)
from tests.test_judge import classifier  # noqa: F401  (the fixture)

# a random model refuses nothing; capability (on by default) has a test of its own
FAST = ["--all-harmful", "--max-prompts", "4", "--max-new-tokens", "2", "--no-capability", "-q"]
STEPS = ["measure", "analyze", "plan", "rewrite", "verify", "evaluate", "card", "push"]
# byte for byte; the direction file is compared by content: safetensors orders its metadata anew in each process
SAME = ["analysis.txt", HEURISTIC, PLAN, EVALUATION, *ANSWERS, "model/model.safetensors.index.json"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama that reads prompts as real tokens (its own word-level tokenizer and chat template)."""
    path = write_checkpoint(build_model("llama"), tmp_path_factory.mktemp("tiny") / "m", "llama")
    tiny_tokenizer(path)
    return path


def statuses(output: str) -> dict[str, str]:
    """Each step's status in the summary table."""
    rows = output.split("== summary")[1].splitlines()[2:]
    return {r.split()[0]: r.split()[1] for r in rows if r.split() and r.split()[0] in STEPS}


def test_run_from_the_hub_to_a_pushed_repo_that_verifies(hub: HubServer, tiny: Path, tmp_path: Path) -> None:
    host(hub, "org/tiny", tiny)
    work = tmp_path / "work"
    first = cli("run", "org/tiny", "-w", str(work), "--push-to", "me/tiny-abliterated", "--low-disk", *FAST)
    assert first.exit_code == 0, first.output
    assert set(statuses(first.output).values()) == {"done"} and len(statuses(first.output)) == len(STEPS)
    for step in STEPS:
        assert f"/8 {step}" in first.output and f"-- {step}: " in first.output, step
    revision = hub.repos["org/tiny"].head
    assert f"model: org/tiny@{revision}" in (work / "run.yml").read_text(), "the recipe pins the commit"
    assert "strategy: norm-preserving" in (work / PLAN).read_text(), "the plan names its strategy"
    pushed = hub.repos["me/tiny-abliterated"]
    assert len(pushed.commits) == 1 and pushed.private
    assert hub.content("me/tiny-abliterated", "README.md") == (work / "card.md").read_bytes()
    card = (work / "card.md").read_text()
    evaluation = json.loads((work / EVALUATION).read_text())
    for needle in ("base_model: org/tiny", "## Plan", "## Evaluation", f"base model's refusals on 4 harmful prompts",
                   f"{evaluation['kl']:.4f}", f"abliterate verify org/tiny@{revision} me/tiny-abliterated"):
        assert needle in card, needle
    assert not (work / ".abliterate-download").exists() and not (work / "model" / ".abliterate-download").exists()

    uploads, requests = len(hub.uploads), len(hub.requests)
    again = cli("run", "org/tiny", "-w", str(work), "--push-to", "me/tiny-abliterated", "--low-disk", *FAST)
    assert again.exit_code == 0, again.output
    assert set(statuses(again.output).values()) == {"skipped"}, again.output
    assert "skipped, its inputs have not changed" in again.output
    assert len(hub.uploads) == uploads and len(pushed.commits) == 1, "a rerun uploads nothing new"
    assert not any(r.startswith(("POST", "PUT")) for r in hub.requests[requests:])

    verified = cli("verify", "org/tiny", "me/tiny-abliterated", "--low-disk", "-q")
    assert verified.exit_code == 0, verified.output
    assert f"is org/tiny at {revision} with the recorded edit and nothing else" in verified.output
    assert TOKEN not in first.output + again.output


def test_a_changed_input_redoes_its_step_and_every_step_after(tiny: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    assert cli("run", str(tiny), "-w", str(work), *FAST).exit_code == 0
    shorter = cli("run", str(tiny), "-w", str(work), *FAST, "--max-new-tokens", "3")
    assert shorter.exit_code == 0, shorter.output
    assert statuses(shorter.output) == {**dict.fromkeys(STEPS[:5], "skipped"), "evaluate": "done", "card": "done"}
    plan = tmp_path / "mine.yml"
    plan.write_text("strategy: standard\nablate:\n- {layer: 2, measurement: 1}\n")
    redone = cli("run", "--recipe", str(work / "run.yml"), "-w", str(work), "--plan", str(plan), "-q")
    assert redone.exit_code == 0, redone.output
    assert statuses(redone.output) == {**dict.fromkeys(STEPS[:2], "skipped"), **dict.fromkeys(STEPS[2:7], "done")}
    recipe = (work / "run.yml").read_text()
    assert "max_new_tokens: 3" in recipe and f"plan: {plan}" in recipe, "the recipe kept the earlier choices"
    record = json.loads((work / "model" / "abliteration.json").read_text())
    assert record["fingerprint"]["strategy"] == "standard", "rewrite used the plan's strategy"
    assert [e["layer"] for e in record["fingerprint"]["plan"]] == [2]
    (work / PLAN).write_text("ablate:\n- {layer: 3, measurement: 1}\n")  # an artifact changed by hand is redone
    fixed = cli("run", "--recipe", str(work / "run.yml"), "-w", str(work), "-q")
    assert statuses(fixed.output)["plan"] == "done" and statuses(fixed.output)["rewrite"] == "skipped"


def test_run_judges_and_measures_capability_into_the_card(tiny: Path, classifier: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    bad = cli("run", str(tiny), "-w", str(work), *FAST, "--judge", str(classifier))
    assert_one_line_error(bad, "name its refusal label with --judge-label")
    assert not work.exists(), "a bad judge fails before anything is written"
    fast = [a for a in FAST if a != "--no-capability"]
    done = cli("run", str(tiny), "-w", str(work), *fast, "--judge", str(classifier), "--judge-label", "refusal")
    assert done.exit_code == 0, done.output
    evaluation = json.loads((work / EVALUATION).read_text())
    for e in (evaluation, evaluation["original"]):
        assert set(e["refusal_counts"]) == {"project", "broad", "judge"} and e["judge"] == "m (refusal)"
        assert "judge_p" not in e and "responses" not in e, "per-prompt figures stay in the answer files"
    saved = [json.loads(line) for line in (work / ANSWERS[1]).read_text().splitlines()]
    assert sum(s["judge"]["refusal"] for s in saved) == evaluation["refusal_counts"]["judge"]
    capability = evaluation["capability"]
    assert capability["answer_prompts"] == 4 and 0 <= capability["accuracy"] <= 1 and capability["answer_kl"] >= 0
    assert evaluation["original"]["capability"] is None, "capability compares the abliterated model with the original"
    card = (work / "card.md").read_text()
    assert f"judge m (refusal) {evaluation['refusal_counts']['judge']}" in card
    assert f"{capability['answer_kl']:.4f} per token" in card and "known-answer accuracy" in card
    report = json.loads((work / "report.json").read_text())
    assert report["evaluation"] == evaluation
    again = cli("run", str(tiny), "-w", str(work), *fast, "--judge", str(classifier), "--judge-label", "refusal",
                "--no-capability")
    assert statuses(again.output) == {**dict.fromkeys(STEPS[:5], "skipped"), "evaluate": "done", "card": "done"}
    assert json.loads((work / EVALUATION).read_text())["capability"] is None


def test_bad_recipes_are_one_line(tmp_path: Path) -> None:
    recipe = tmp_path / "run.yml"
    for text, expected in [("model: m\ntrails: 3\n", "unknown key trails"), ("trials: many\n", "trials must be"),
                           ("- a\n", "a recipe is a mapping"), ("search: [\n", "unreadable recipe"),
                           ("max_memory: lots\n", "memory size 'lots'")]:
        recipe.write_text(text)
        assert_one_line_error(cli("run", "--recipe", str(recipe)), expected)
    assert_one_line_error(cli("run"), "no MODEL given")
    assert not (tmp_path / "abliterate-model").exists()


def run_until(args: list[str], env: dict[str, str], heading: str | None) -> int:
    """``abliterate run ARGS`` in a child process, killed with SIGKILL as soon as it prints
    ``heading`` (None: left to finish); its exit status."""
    proc = subprocess.Popen([sys.executable, "-c", "from rewriter.cli import main; main()", "run", *args],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    assert proc.stderr is not None
    for line in proc.stderr:
        if heading is not None and line.startswith("== ") and f" {heading}" in line and "skipped" not in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    return proc.returncode


def test_a_search_killed_midway_resumes_with_the_trials_it_finished(tiny: Path, tmp_path: Path) -> None:
    """`run --search` keeps its study in the work folder: killed after some trials, a rerun keeps
    them, runs the trial the killed process left running again (its parameters queued anew)
    at once, and stops at the same count."""
    import sqlite3
    import time

    work = tmp_path / "work"
    args = [str(tiny), "-w", str(work), "--search", "--trials", "30", *FAST]
    proc = subprocess.Popen([sys.executable, "-c", "from rewriter.cli import main; main()", "run", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    mine, stale = work / "study-mine.db", work / "study-0123456789abcdef.db"  # put there before the rerun

    def trials(state: str) -> dict[int, str]:
        """number -> start time of the study's trials in ``state``, read-only from its SQLite file."""
        found = [p for p in work.glob("study-*.db") if p not in (mine, stale)]
        if not found:
            return {}
        try:
            with sqlite3.connect(f"file:{found[0]}?mode=ro", uri=True) as db:
                return dict(db.execute("SELECT number, datetime_start FROM trials WHERE state = ?", (state,)))
        except sqlite3.OperationalError:  # not created yet, or locked by the writer this moment
            return {}

    deadline = time.monotonic() + 300
    while len(trials("COMPLETE")) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    assert proc.wait() == -signal.SIGKILL, "the search ended before it could be killed"
    finished, left_running = trials("COMPLETE"), trials("RUNNING")
    assert 3 <= len(finished) < 30
    mine.write_text("a user's file: kept")
    stale.write_text("a study of earlier inputs: removed")
    resumed = cli("run", *args)
    assert resumed.exit_code == 0, resumed.output
    assert "resuming the search in study-" in resumed.output
    after = trials("COMPLETE")
    assert len(after) == 30 and all(after[n] == start for n, start in finished.items()), "finished trials were redone"
    assert set(trials("FAIL")) == set(left_running), "the killed process's running trial is not failed"
    assert not trials("RUNNING")
    assert len(list(work.glob("study-*.db"))) == 2 and mine.read_text() == "a user's file: kept"
    assert not stale.exists()


def test_a_run_killed_in_each_step_resumes_to_the_same_bytes(hub: HubServer, tiny: Path, tmp_path: Path) -> None:
    host(hub, "org/tiny", tiny)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN}
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    assert run_until(["org/tiny", "-w", str(clean), "--push-to", "me/clean", *FAST], env, None) == 0
    args = ["org/tiny", "-w", str(resumed), "--push-to", "me/resumed", *FAST]
    for step in STEPS:
        assert run_until(args, env, step) == -signal.SIGKILL, step
    assert run_until(args, env, None) == 0
    for name in [*SAME, *(f"model/{p.name}" for p in (clean / "model").glob("*.safetensors"))]:
        assert (resumed / name).read_bytes() == (clean / name).read_bytes(), name
    ours, theirs = (Measurements.load(w / DIRECTIONS) for w in (resumed, clean))
    assert ours.metadata == theirs.metadata and ours.layers == theirs.layers
    assert all(torch.equal(ours.harmful[n], theirs.harmful[n]) for n in ours.layers)
    sha = {w: Measurements.load(w / DIRECTIONS).sha256 for w in (resumed, clean)}
    card = (resumed / "card.md").read_text().replace("me/resumed", "me/clean").replace(sha[resumed], sha[clean])
    assert card == (clean / "card.md").read_text()
    assert set(hub.repos["me/resumed"].files) == set(hub.repos["me/clean"].files)
    for path, (blob, _, _) in hub.repos["me/clean"].files.items():
        if path not in ("README.md", DIRECTIONS, "abliteration.json"):
            assert hub.repos["me/resumed"].files[path][0] == blob, path
