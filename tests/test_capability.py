"""Capability: the answer KL (teacher-forced on the original's greedy answers, top-k plus the rest)
and the known-answer questions with their checking rules."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rewriter.cli import main
from rewriter.lab import capability
from rewriter.lab.capability import Question, check, lumped_kl, questions, teacher_forced
from rewriter.lab.evaluate import generate_ids, kl_divergence
from rewriter.lab.models import load_model
from tests.helpers import build_model, tiny_tokenizer, write_checkpoint


def test_questions_are_fixed_and_checked_by_their_rule() -> None:
    qs = questions()
    assert qs == questions() and len(qs) == capability.QUESTIONS and len({q.text for q in qs}) == len(qs)
    add = Question("What is 2 + 3?", "add", "5")
    assert check(add, "5") and check(add, "The answer is 5.") and not check(add, "w5") and not check(add, "15")
    upper = Question("", "upper", "RIVER")
    assert check(upper, "**RIVER**") and not check(upper, "River") and not check(upper, "RIVER is the word")
    ordered = Question("", "sort", "[3, 7, 9]")
    assert check(ordered, "3, 7, 9") and not check(ordered, "3, 9, 7")
    obj = Question("", "json", '{"age": 4}')
    assert check(obj, '```json\n{"age": 4}\n```') and not check(obj, '{"age": "4"}') and not check(obj, "{age: 4}")


def test_lumped_kl_is_the_kl_over_the_whole_vocabulary_or_a_lower_bound() -> None:
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(5, 50, generator=g) * 3, torch.randn(5, 50, generator=g) * 3
    lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    full = kl_divergence(p, q)
    assert torch.allclose(lumped_kl(lp, lq), full)
    top = lp.topk(8, -1)
    part = lumped_kl(top.values, lq.gather(-1, top.indices))
    assert (part <= full + 1e-12).all() and (part > 0.2 * full).all()
    assert float(lumped_kl(top.values, top.values).max()) == 0.0


def test_teacher_forcing_reads_the_originals_own_answers(tmp_path: Path) -> None:
    path = write_checkpoint(build_model("llama"), tmp_path / "m", "llama")
    tiny_tokenizer(path)
    lm = load_model(path)
    prompts = ["w1 w2 w3", "w4", "w5 w6 w7 w8 w9"]
    kw = dict(batch_size=2, chat_template=True, system_prompt=None, progress=False)
    answers = generate_ids(lm, prompts, max_new_tokens=6, **kw)
    logp = teacher_forced(lm, prompts, answers, **kw)
    for a, lp in zip(answers, logp):
        assert lp.shape[0] == len(a) and lp.argmax(-1).tolist() == a, "each position predicts its greedy token"
    # reduced as each batch is done (what the capability measure keeps): the same values
    top = teacher_forced(lm, prompts, answers, reduce=lambda i, lp: (i, lp.topk(3, dim=-1)), **kw)
    for i, (lp, (j, t)) in enumerate(zip(logp, top)):
        assert i == j and torch.equal(t.values, lp.topk(3, dim=-1).values)


def test_evaluate_capability(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ABLITERATE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(capability, "QUESTIONS", 6)
    monkeypatch.setattr(capability, "ANSWER_TOKENS", 5)
    original = write_checkpoint(build_model("llama"), tmp_path / "o", "llama")
    tiny_tokenizer(original)
    edited = build_model("llama")
    with torch.no_grad():
        edited.model.layers[1].mlp.down_proj.weight.mul_(3.0)
    edited = write_checkpoint(edited, tmp_path / "e", "llama")
    tiny_tokenizer(edited)
    (tmp_path / "bad.txt").write_text("w1 w2\n")
    (tmp_path / "good.txt").write_text("w9 w8\nw7 w6 w5 w4\n")
    args = ["--original", str(original), "--harmful", str(tmp_path / "bad.txt"), "--harmless", str(tmp_path / "good.txt"),
            "--max-new-tokens", "2", "--capability", "--json", "-q"]
    same = json.loads(CliRunner().invoke(main, ["evaluate", str(original), *args]).stdout)["capability"]
    assert same["answer_kl"] == 0.0 and 2 <= same["answer_tokens"] <= 10 and same["questions"] == 6
    assert same["accuracy"] == same["original_accuracy"] and set(same["by_kind"]) == {q.kind for q in questions()}
    assert len(list((tmp_path / "cache" / "capability").glob("*.safetensors"))) == 1
    other = json.loads(CliRunner().invoke(main, ["evaluate", str(edited), *args]).stdout)["capability"]
    assert other["answer_kl"] > 0 and other["answer_tokens"] == same["answer_tokens"]
