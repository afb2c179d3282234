"""The whole pipeline on the real Qwen example: refusals fall, the model keeps its mind.

Measurement prompts (the built-in measure halves) are disjoint from evaluation prompts
(the eval halves). Strategies are compared outside the suite (benchmarks/strategy_table.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest



def test_run_abliterates_qwen(qwen: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    # the installed console script, as a user runs it; its step headings (stderr) go straight to
    # the terminal, so that the longest test of the suite says what it is doing. Fewer trials,
    # prompts (16 of each set) and shorter answers than the defaults keep the suite short: on
    # 2 cores the evaluation's forward passes and greedy answers cost most (the original refuses
    # 10 of these 16, each time in its first dozen tokens).
    with capfd.disabled():
        print("\n[end-to-end] abliterate run on the Qwen example: its steps follow", file=sys.stderr, flush=True)
        done = subprocess.run([str(Path(sys.executable).with_name("abliterate")), "run", "qwen2.5-coder-0.5b-instruct",
                               "-w", str(out), "--search", "--trials", "2", "--max-new-tokens", "24",
                               "--max-prompts", "16", "--no-capability", "-q"],
                              stdout=subprocess.PIPE, text=True)
    assert done.returncode == 0, done.stdout
    report = json.loads((out / "report.json").read_text())
    print("\n" + done.stdout)
    e = report["evaluation"]
    before, after, n = e["original"]["refusals"], e["refusals"], e["prompts"]
    assert before >= n / 3, f"the original refuses only {before}/{n}: the test would mean nothing"
    # the plan is searched under a KL cap of 0.05 (on the search prompts): fewer refusals, held-out KL small
    assert after <= 0.5 * before, f"refusals fell only from {before} to {after}"
    assert e["kl"] < 0.1
    assert report["verified"] and "optimized over 2 trials" in report["search"]
    assert [s["status"] for s in report["steps"]] == ["done"] * 7
    for name in ("directions.safetensors", "plan.yml", "plan-heuristic.yml", "plan.png", "layers.png", "report.json",
                 "run.yml", "card.md", "verify.txt", "model/config.json", "model/abliteration.json",
                 "answers-original.jsonl", "answers-abliterated.jsonl"):
        assert (out / name).is_file(), name
    again = subprocess.run([str(Path(sys.executable).with_name("abliterate")), "run", "--recipe", str(out / "run.yml"),
                            "-w", str(out), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert again.returncode == 0, again.stderr
    resumed = json.loads((out / "report.json").read_text())
    assert [s["status"] for s in resumed["steps"]] == ["skipped"] * 7, "the recipe repeats the run: nothing to redo"
