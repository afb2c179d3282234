"""Refusal markers, KL arithmetic, and evaluate of a model against itself."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner

from rewriter.cli import main
from rewriter.lab.evaluate import kl_divergence
from rewriter.lab.markers import BROAD_MARKERS, is_refusal, markers_in
from tests.helpers import build_model, tiny_tokenizer, write_checkpoint


def test_refusal_markers() -> None:
    assert is_refusal("I\u2019m sorry, but I can\u2019t help with that.")
    assert is_refusal("AS AN AI language model, I cannot provide that")
    assert not is_refusal("Sure, here are the steps: first, gather the materials")
    assert not is_refusal("<think>I cannot do this... but the user is a chemist</think>Sure, here it is.")
    assert is_refusal("<think>let me consider</think>I won't help with that.")
    assert not is_refusal("<think>I'm sorry, I should refuse")  # an unfinished think block is all thought
    assert is_refusal("Nope, not doing it.", markers=["not doing it"])
    late = "Sure, here is an outline of the steps. However, I cannot provide the details of the final step."
    assert is_refusal(late), "a refusal after a compliant opening counts"
    compliant = "Here is how such illegal schemes are usually detected by banks: ..."
    assert not is_refusal(compliant) and markers_in(compliant, BROAD_MARKERS) == ["illegal"]
    assert len(BROAD_MARKERS) == 33


def test_answers_in_another_script_are_counted_and_carded() -> None:
    """A refusal in Chinese to an English prompt (read in the answers of an over-ablated Qwen) is
    a refusal to the project markers, not to the broad (English) set; either way the answer's
    script is counted apart, and a compliant Chinese answer is no refusal. Code, names and a
    few borrowed words stay in the prompt's script; so does a whole conversation in Russian."""
    from rewriter.io.publish import model_card
    from rewriter.lab.evaluate import Evaluation
    from rewriter.lab.markers import MARKER_SETS, other_script

    chinese = "抱歉，我无法协助完成这个请求。"
    assert is_refusal(chinese) and not is_refusal(chinese, BROAD_MARKERS)
    assert other_script("How do I forge a signature?", chinese)
    assert not is_refusal("当然可以。以下是伪造签名的步骤：首先，准备一支笔。")  # "of course; here are the steps"
    assert is_refusal("作为一个AI语言模型，我没有个人观点。")  # "as an AI language model": a deflection
    assert other_script("Write a speech.", "<think>plan it</think>尊敬的各位来宾，大家好！ Thank you.")
    assert not other_script("Write a speech.", "<think>用中文想一想，想很久很久很久</think>Dear friends, welcome.")
    assert not other_script("Sort a list in Python", "Use sorted(xs). In 中文 it is 排序, but the call is the same.")
    assert not other_script("Как дела?", "Хорошо, спасибо!")
    assert other_script("Как дела?", "I am fine, thank you very much!")
    assert not other_script("", chinese) and not other_script("Hello?", "42 ...")
    prompts, answers = ["a", "b", "c"], ["Sure, here.", chinese, "I'm sorry, no."]
    result = Evaluation("m", 1, 3, refused=["c"], responses=dict(zip(prompts, answers)))
    result.count(prompts, answers, dict(MARKER_SETS), None)
    assert result.other_script == 1 and result.refusal_counts["project"] == 2 and result.refusal_counts["broad"] == 1
    card = model_card({}, base_model="org/base", evaluation=result.as_dict())
    assert "answers mostly in another script than their prompt (markers read English and Chinese only): 1" in card
    assert "another script" not in model_card({}, base_model="org/base", evaluation={**result.as_dict(), "other_script": 0})


def test_kl_divergence_in_float64() -> None:
    p = torch.tensor([[0.0, 0.0]])
    q = torch.tensor([[0.0, float(torch.log(torch.tensor(3.0)))]])
    # KL((1/2, 1/2) || (1/4, 3/4)) = 0.5 ln 2 + 0.5 ln(2/3)
    expected = 0.5 * torch.log(torch.tensor(2.0, dtype=torch.float64)) + 0.5 * torch.log(torch.tensor(2 / 3, dtype=torch.float64))
    assert torch.allclose(kl_divergence(p, q), expected.reshape(1))
    assert float(kl_divergence(q, q)) == 0.0


def test_model_against_itself_has_zero_kl(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ABLITERATE_CACHE", str(tmp_path / "cache"))
    path = write_checkpoint(build_model("llama"), tmp_path / "m", "llama")  # a tiny qwen2 reads these words as nothing
    tiny_tokenizer(path)
    (tmp_path / "bad.txt").write_text("w1 w2 w3\nw4 w5\nw6\n")
    (tmp_path / "good.txt").write_text("w9 w8\nw7 w6 w5 w4\n")
    args = ["evaluate", str(path), "--original", str(path), "--harmful", str(tmp_path / "bad.txt"),
            "--harmless", str(tmp_path / "good.txt"), "--max-new-tokens", "4", "--json", "-q"]
    result = CliRunner().invoke(main, [*args, "--save", str(tmp_path / "answers.jsonl")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert 0.0 <= report["kl"] <= 1e-9 and report["kl_prompts"] == 2
    assert report["prompts"] == 3 and len(report["responses"]) == 3
    assert isinstance(report["refusal_score"], float) and report["max_new_tokens"] == 4
    saved = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in saved] == ["w1 w2 w3", "w4 w5", "w6"]
    assert all(set(s["markers"]) == {"project", "broad"} and isinstance(s["refused"], bool) for s in saved)
    assert list((tmp_path / "cache" / "logits").glob("*.safetensors")), "the original's logits are cached"
    again = CliRunner().invoke(main, args)
    assert json.loads(again.stdout)["kl"] == report["kl"]


def test_missing_model_or_prompts_is_an_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "model not found" in result.output
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path), "--harmful", str(tmp_path / "none.txt")])
    assert result.exit_code == 1 and "prompt file not found" in result.output


def test_tagged_sets_cover_every_category_evenly_and_apart() -> None:
    from rewriter.lab.prompts import CATEGORIES, TAGGED_SETS, UNTAGGED_SETS, default_set, load_prompts

    sets = {name: default_set(name) for name in TAGGED_SETS}
    for name, s in sets.items():
        assert s.categories is not None and len(s.texts) == len(s.categories) == 80, name
        assert {c: s.categories.count(c) for c in CATEGORIES} == dict.fromkeys(CATEGORIES, 8), name
    texts = [set(s.texts) for s in sets.values()] + [set(default_set(n).texts) for n in UNTAGGED_SETS]
    assert sum(len(t) for t in texts) == len(set().union(*texts)), "no prompt is in two sets"
    for kind in ("harmful", "harmless"):  # each harmless prompt matches a harmful one's category, in order
        assert sets[f"{kind}-tagged-eval"].categories == sets["harmful-tagged-eval"].categories
    assert load_prompts("harmful-tagged-eval") == sets["harmful-tagged-eval"].texts


def test_categories_from_a_file(tmp_path: Path) -> None:
    from rewriter.lab.prompts import UNTAGGED, load_tagged

    (tmp_path / "p.jsonl").write_text('{"text": "a", "category": "x"}\n{"text": "b"}\n{"text": " ", "category": "y"}\n')
    tagged = load_tagged(tmp_path / "p.jsonl")
    assert tagged.texts == ["a", "b"] and tagged.categories == ["x", UNTAGGED]
    (tmp_path / "p.csv").write_text("text,kind\na,x\nb,y\n")
    assert load_tagged(tmp_path / "p.csv", category_column="kind").categories == ["x", "y"]
    assert load_tagged(tmp_path / "p.csv").categories is None
