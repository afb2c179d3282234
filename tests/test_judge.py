"""The model judge: a sequence classifier's refusal label and a causal LM's yes/no logits, checked
against the models run by hand, and the one-line errors for judges that cannot judge."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rewriter.cli import main
from rewriter.errors import AbliterateError
from rewriter.lab.judge import NO, RUBRIC, YES, check_judge, judge_answers
from tests.helpers import TEXT, build_model, fail, tiny_tokenizer, write_checkpoint

ANSWERS = ["w1 w2 w3 w4 w5", "Sorry I w7", "Sure w9 w10 w11 w12 w13 w14 w15"]


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(**TEXT, num_labels=2, id2label={0: "compliance", 1: "refusal"},
                            label2id={"compliance": 0, "refusal": 1}, pad_token_id=0)
    path = tmp_path_factory.mktemp("classifier") / "m"
    tf.LlamaForSequenceClassification(config).eval().save_pretrained(path)
    tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def causal_judge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_checkpoint(build_model("llama"), tmp_path_factory.mktemp("judge") / "m", "llama")
    tiny_tokenizer(path, extra=(*YES, *NO))
    return path


def test_classifier_reads_its_label_batched_as_alone(classifier: Path) -> None:
    import transformers as tf

    spec = check_judge(classifier, "refusal")
    assert spec.kind == "classifier" and spec.label_index == 1
    batched = judge_answers(spec, ["p"] * 3, ANSWERS, batch_size=3, progress=False)
    model = tf.AutoModelForSequenceClassification.from_pretrained(classifier, dtype=torch.float32).eval()
    tok = tf.AutoTokenizer.from_pretrained(classifier)
    for answer, p in zip(ANSWERS, batched):
        with torch.inference_mode():
            alone = torch.softmax(model(**tok(answer, return_tensors="pt")).logits.double(), -1)[0, 1]
        assert p == pytest.approx(float(alone), abs=1e-5), "padding changes the verdict"
    assert len(set(batched)) == 3 and all(0 < p < 1 for p in batched)


def test_causal_judge_reads_yes_against_no(causal_judge: Path) -> None:
    import transformers as tf

    spec = check_judge(causal_judge)
    assert spec.kind == "causal"
    prompts = ["w20 w21", "w22", "w23 w24 w25"]
    batched = judge_answers(spec, prompts, ANSWERS, batch_size=2, progress=False)
    model = tf.AutoModelForCausalLM.from_pretrained(causal_judge, dtype=torch.float32).eval()
    tok = tf.AutoTokenizer.from_pretrained(causal_judge)
    yes, no = [tok.convert_tokens_to_ids(list(w)) for w in (YES, NO)]
    for prompt, answer, p in zip(prompts, ANSWERS, batched):
        text = tok.apply_chat_template([{"role": "user", "content": RUBRIC.format(prompt=prompt, answer=answer)}],
                                       tokenize=False, add_generation_prompt=True)
        with torch.inference_mode():
            logp = torch.log_softmax(model(**tok(text, return_tensors="pt", add_special_tokens=False)).logits[0, -1].double(), -1)
        want = torch.sigmoid(torch.logsumexp(logp[yes], -1) - torch.logsumexp(logp[no], -1))
        assert p == pytest.approx(float(want), abs=1e-5)
    with pytest.raises(AbliterateError, match="names a classifier's label"):
        check_judge(causal_judge, "refusal")


def test_evaluate_with_a_judge(classifier: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ABLITERATE_CACHE", str(tmp_path / "cache"))
    model = write_checkpoint(build_model("llama"), tmp_path / "m", "llama")
    tiny_tokenizer(model)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": t, "category": c}) + "\n"
                           for t, c in [("w1 w2", "x"), ("w3", "y"), ("w4 w5 w6", "x")]))
    args = ["evaluate", str(model), "--harmful", str(bad), "--max-new-tokens", "3", "-q", "--judge", str(classifier),
            "--judge-label", "refusal", "--markers", "broad"]
    result = CliRunner().invoke(main, [*args, "--json", "--save", str(tmp_path / "a.jsonl")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    saved = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    judged = [s["judge"]["refusal"] for s in saved]
    assert report["judge_refusals"] == sum(judged) == report["refusal_counts"]["judge"]
    assert set(report["refusal_counts"]) == {"project", "broad", "judge"}
    assert all(0 < s["judge"]["p"] < 1 and (s["judge"]["p"] >= 0.5) == s["judge"]["refusal"] for s in saved)
    assert report["by_category"]["x"]["prompts"] == 2 and report["by_category"]["y"]["prompts"] == 1
    assert [s["category"] for s in saved] == ["x", "y", "x"]
    text = CliRunner().invoke(main, args)
    assert text.exit_code == 0 and "judge" in text.output and "category" in text.output, text.output


def test_optimize_judges_its_final_evaluation(classifier: Path, chat_model: tuple[Path, Path], tmp_path: Path) -> None:
    path, directions = chat_model
    args = ["optimize", str(path), "-d", str(directions), "-o", str(tmp_path / "plan.yml"), "--trials", "2",
            "--search-prompts", "4", "--max-new-tokens", "3", "--save", str(tmp_path / "a.jsonl"), "-q",
            "--study", str(tmp_path / "study.db"), "--judge", str(classifier)]
    fail(args, "name its refusal label with --judge-label")
    assert not (tmp_path / "study.db").exists(), "a bad judge fails before the search"
    result = CliRunner().invoke(main, [*args, "--judge-label", "refusal"])
    assert result.exit_code == 0, result.output
    saved = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    judged = sum(s["judge"]["refusal"] for s in saved)
    assert all(s["judge"]["model"] == "m (refusal)" and 0 < s["judge"]["p"] < 1 for s in saved)
    assert f"{judged} judge of {len(saved)}" in result.output, result.output


def test_judges_that_cannot_judge_are_one_line_errors(classifier: Path, tmp_path: Path) -> None:
    model = write_checkpoint(build_model("llama"), tmp_path / "m", "llama")
    tiny_tokenizer(model)
    base = ["evaluate", str(model), "--judge"]
    fail([*base, str(tmp_path / "nope")], "model not found")
    fail([*base, str(classifier)], "name its refusal label with --judge-label (its labels: compliance, refusal)")
    fail([*base, str(classifier), "--judge-label", "refused"], "has no label 'refused'")
    fail([*base, str(model), "--judge-label", "refusal"], "is a causal LM")
    fail(["evaluate", str(model), "--capability"], "give --original too")


def test_hand_labels_and_the_markers_agreement_with_them() -> None:
    """The figures docs/quality.md gives for the markers against the hand labels."""
    from benchmarks.judge_agreement import LABELS, agreement, marker_verdicts, read_labels

    rows = read_labels()
    assert len(rows) == 224 and {r["label"] for r in rows} == set(LABELS)
    assert all(r["prompt"] and r["source"] for r in rows)
    table = {name: agreement(rows, verdicts) for name, verdicts in marker_verdicts(rows).items()}
    assert [table[n]["agreement"] for n in ("project markers", "broad markers")] == [204 / 224, 204 / 224]
    assert table["project markers"]["called_refusal_per_label"] == {"refusal": 47, "deflection": 3, "disclaimer": 5,
                                                                    "compliance": 0}
    assert table["broad markers"]["called_refusal_per_label"]["compliance"] == 2
