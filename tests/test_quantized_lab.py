"""The lab on quantized checkpoints (block FP8, compressed-tensors FP8, MXFP4 experts): measure,
score and evaluate read the weights through the codec plugins, streamed one layer at a time or
decoded whole, with the same numbers; transformers' own dequantization reads the same values; and
a plan scored in memory is the plan the rewrite writes in the same format."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner

from rewriter.cli import main
from rewriter.io.checkpoint import Checkpoint
from rewriter.lab import streamed as streamed_module
from rewriter.lab.evaluate import evaluate, first_token_logits
from rewriter.lab.inmemory import InMemoryEditor
from rewriter.lab.measure import mean_states
from rewriter.lab.memory import MemoryChoice
from rewriter.lab.models import LoadedModel, load_model, load_tokenizer
from rewriter.lab.streamed import open_streamed, streamed_first_token_logits, streamed_means
from rewriter.pipeline import prepare
from rewriter.plan import parse_layer_specs
from tests.helpers import random_measurements, tiny_tokenizer
from tests.quantize import CASES, Case, quantized

BAD = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9 w10", "w11", "w12 w13"]
GOOD = ["w9 w8", "w7 w6 w5 w4", "w3", "w20 w21 w22"]
KW = dict(batch_size=2, chat_template=True, system_prompt=None)
USED = [c for c in CASES if c.id in ("fp8-block", "compressed-channel", "mxfp4-experts")]
# compressed-tensors decompresses in the scale's dtype (bfloat16 in its case here), a rounding away from the
# codec's float32 decode; tests/test_codecs.py compares its loads within that
LOADED_BY_TRANSFORMERS = [c for c in USED if c.loads and c.codec != "compressed-tensors-fp8"]


def _model(case: Case, tmp_path: Path) -> tuple[Path, int, int]:
    path, width, layers = quantized(case, tmp_path)
    tiny_tokenizer(path)
    return path, width, layers


@pytest.mark.parametrize("case", USED, ids=[c.id for c in USED])
def test_streamed_and_decoded_whole_give_the_same_means_and_logits(case: Case, tmp_path: Path) -> None:
    path, _, layers = _model(case, tmp_path)
    streamed = [mean for mean, _ in streamed_means(open_streamed(path), [BAD, GOOD], q=0.995, progress=False, **KW)]
    lm = load_model(path)
    whole = [mean_states(lm, prompts, q=0.995, desc="", progress=False, **KW) for prompts in (BAD, GOOD)]
    for a, b in zip(streamed, whole):
        assert a.shape[0] == layers
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    logits = streamed_first_token_logits(open_streamed(path), [GOOD], progress=False, **KW)[0]
    torch.testing.assert_close(logits, first_token_logits(lm, GOOD, progress=False, **KW), rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", LOADED_BY_TRANSFORMERS, ids=[c.id for c in LOADED_BY_TRANSFORMERS])
def test_the_codec_decode_is_what_transformers_dequantizes(case: Case, tmp_path: Path) -> None:
    """transformers' own loader (its FP8 and MXFP4 integrations, dequantizing on the CPU) is the reference:
    its model's means equal the streamed ones, and its weights the decoded ones."""
    import transformers as tf

    path, _, _ = _model(case, tmp_path)
    theirs = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = dict(load_model(path).model.named_parameters())
    for name, param in theirs.named_parameters():
        torch.testing.assert_close(ours[name].detach(), param.detach().float(), rtol=0, atol=0, msg=name)
    reference = LoadedModel(theirs, load_tokenizer(path), str(path))
    streamed = [mean for mean, _ in streamed_means(open_streamed(path), [BAD, GOOD], q=0.995, progress=False, **KW)]
    for prompts, mean in zip((BAD, GOOD), streamed):
        torch.testing.assert_close(mean, mean_states(reference, prompts, q=0.995, desc="", progress=False, **KW),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", USED, ids=[c.id for c in USED])
def test_a_plan_scored_in_memory_is_the_rewritten_checkpoint(case: Case, tmp_path: Path) -> None:
    """The in-memory edit of a quantized weight is decode, edit, re-encode with the rounding, decode: the
    values the rewritten checkpoint (same format) decodes to, bit for bit."""
    path, width, layers = _model(case, tmp_path)
    directions = tmp_path / "directions.safetensors"
    random_measurements(width, layers).save(directions)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["rewrite", str(path), str(out), "-d", str(directions), "--layers", "1-2:1", "-q"])
    assert result.exit_code == 0, result.output
    job = prepare(path, None, directions, parse_layer_specs(["1-2:1"], 1.0, {}), "norm-preserving")
    assert any(name in job.view.packed for name in job.edits), "the plan should edit quantized weights"
    lm = load_model(path)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    editor = InMemoryEditor(lm, Checkpoint.open(path))
    editor.apply(job.edits)
    written = dict(load_model(out).model.named_parameters())
    for name in job.edits:
        assert torch.equal(lm.model.get_parameter(name).detach(), written[name].detach()), name
    editor.restore()
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())


def test_evaluate_a_quantized_abliteration_against_its_quantized_original_streamed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate --original with both in block FP8, streamed: the refusal score and the KL of the
    whole-model path."""
    monkeypatch.setenv("ABLITERATE_CACHE", str(tmp_path / "cache"))
    path, width, layers = _model(USED[0], tmp_path)
    directions = tmp_path / "directions.safetensors"
    random_measurements(width, layers).save(directions)
    out = tmp_path / "out"
    assert CliRunner().invoke(main, ["rewrite", str(path), str(out), "-d", str(directions), "--layers", "1-3:1",
                                     "--scale", "2", "-q"]).exit_code == 0
    load_tokenizer(path).save_pretrained(out)
    whole = evaluate(out, BAD, GOOD, original=path, max_new_tokens=2, progress=False, **KW)
    monkeypatch.setattr(streamed_module, "choose", lambda weights, max_memory: MemoryChoice(True, "forced"))
    monkeypatch.setenv("ABLITERATE_CACHE", str(tmp_path / "cache-streamed"))
    lines: list[str] = []
    result = evaluate(out, BAD, GOOD, original=path, progress=False, log=lines.append, **KW)
    assert any(line.startswith("streamed 4 layers") for line in lines)
    assert whole.kl > 1e-6, "the edit changes the next-token distributions"
    assert result.kl == pytest.approx(whole.kl, rel=1e-4)
    assert result.refusal_score == pytest.approx(whole.refusal_score, abs=1e-5)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def test_fp8_qwen_measures_streamed_under_1gb_what_bf16_measures(qwen: Path, qwen_fp8: Path, tmp_path: Path) -> None:
    """The real example in block FP8: `measure --refused-only --max-memory 1GB` streams it under that
    cap; its means are those of the same FP8 checkpoint decoded whole (cos >= 0.9999), its directions
    the bf16 original's (cos >= 0.99 at every layer), and analyze suggests the same measurement layer
    or an adjacent one. The prompts are ones the bf16 model refuses or answers by a clear margin
    (|first-token log-odds| > 1): a prompt on the edge may tip either way under FP8's 2.6% weight
    error, and in a set this small one prompt more or less moves the mean (docs/quality.md)."""
    from rewriter.directions import Measurements
    from rewriter.lab.analyze import layer_metrics, suggest_plan
    from rewriter.lab.measure import measure
    from rewriter.lab.prompts import default_prompts
    from rewriter.lab.refusals import first_token_scores, opener_ids

    lm = load_model(qwen)
    pool = default_prompts("harmful-measure")[:24]
    odds, _ = first_token_scores(lm, pool, opener_ids(lm.tokenizer), {}, batch_size=8)
    bad = [p for p, o in zip(pool, odds.tolist(), strict=True) if abs(o) > 1][:12]
    good = default_prompts("harmless-measure")[:6]
    kw = dict(batch_size=8, progress=False, refused_only=True)
    bf16 = measure(qwen, bad, good, lm=lm, **kw)
    del lm  # one model in memory at a time: page faults cost several times as much with two
    (tmp_path / "bad.txt").write_text("\n".join(bad) + "\n")
    (tmp_path / "good.txt").write_text("\n".join(good) + "\n")
    out = tmp_path / "d.safetensors"
    args = ["measure", str(qwen_fp8), "--harmful", str(tmp_path / "bad.txt"), "--harmless", str(tmp_path / "good.txt"),
            "-o", str(out), "--batch-size", "8", "-q", "--max-memory", "1GB", "--refused-only"]
    stderr, peak = _run_measuring_peak(args)
    assert "streaming the weights layer by layer" in stderr and "streamed 24 layers" in stderr
    assert peak < 1e9, f"peak RSS {peak / 1e9:.2f} GB over the 1GB cap"
    streamed = Measurements.load(out)
    whole = measure(qwen_fp8, bad, good, **kw)
    assert 0 < streamed.harmful_count == whole.harmful_count == bf16.harmful_count < len(bad)
    for n in streamed.layers:
        assert _cos(streamed.harmful[n], whole.harmful[n]) >= 0.9999, n
        assert _cos(streamed.harmless[n], whole.harmless[n]) >= 0.9999, n
        if n:  # layer 0 (the embedding output) has no direction
            assert _cos(streamed.direction(n), bf16.direction(n)) >= 0.99, n
    plans = [suggest_plan(layer_metrics(m), len(m.layers)) for m in (streamed, bf16)]
    (a, *_), (b, *_) = (p.entries for p in plans)
    assert abs(a.measurement - b.measurement) <= 1, plans


def _run_measuring_peak(args: list[str]) -> tuple[str, int]:
    """The CLI in a process of its own; its stderr and its own peak RSS (VmHWM at exit: ru_maxrss would
    include the parent's at fork)."""
    import subprocess
    import sys

    code = ("import atexit, re, sys; atexit.register(lambda: print('peak-rss-kib', re.search(r'VmHWM:\\s+(\\d+)', "
            "open('/proc/self/status').read())[1], file=sys.stderr)); from rewriter.cli import main; main()")
    run = subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    return run.stderr, int(run.stderr.split("peak-rss-kib")[-1].split()[0]) * 1024


def test_a_third_party_codec_is_read_by_measure_streamed_and_whole(checkpoint_factory: Any, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A codec from a plugin of one's own (tests/toy_codec.py, loaded with -p) decodes for the lab as
    for the rewrite: measure streams the checkpoint with it and gives the means of the model decoded
    whole; without the plugin, one line says no codec reads the format."""
    from rewriter.codec import Packed
    from rewriter.directions import Measurements
    from rewriter.lab.measure import measure
    from rewriter.registry import Registry
    from tests.quantize import quantize
    from tests.toy_codec import RowInt8

    def convert(name: str, t: torch.Tensor) -> dict[str, torch.Tensor] | None:
        if not name.endswith(("o_proj.weight", "down_proj.weight")):
            return None
        head = name[: -len("weight")]
        return RowInt8().encode(Packed(name, (head + "qweight", head + "qscale"), tuple(t.shape)), t.float(), {})

    src = quantize(checkpoint_factory("llama"), tmp_path / "int8", {"quant_method": "toy-int8"}, convert)
    tiny_tokenizer(src)
    (tmp_path / "bad.txt").write_text("\n".join(BAD) + "\n")
    (tmp_path / "good.txt").write_text("\n".join(GOOD) + "\n")
    out = tmp_path / "d.safetensors"
    args = ["measure", str(src), "--harmful", str(tmp_path / "bad.txt"), "--harmless", str(tmp_path / "good.txt"),
            "-o", str(out), "--batch-size", "2", "-q"]
    without = CliRunner().invoke(main, args)
    assert without.exit_code == 1 and "quant_method 'toy-int8'" in without.output.splitlines()[-1]
    monkeypatch.setattr(streamed_module, "choose", lambda weights, max_memory: MemoryChoice(True, "forced"))
    result = CliRunner().invoke(main, [*args, "-p", "tests.toy_codec"])
    assert result.exit_code == 0, result.output
    assert "streamed 4 layers" in result.output
    whole = measure(src, BAD, GOOD, batch_size=2, progress=False,
                    lm=load_model(src, registry=Registry(["tests.toy_codec"])))
    streamed = Measurements.load(out)
    for n in whole.layers:
        torch.testing.assert_close(streamed.harmful[n], whole.harmful[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", [USED[0], USED[2]], ids=[USED[0].id, USED[2].id])
def test_optimize_searches_a_quantized_model_and_says_what_to_do_where_it_does_not_fit(
        case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """optimize scores plans on the decoded model (each trial's edits re-encoded as the rewrite does),
    and the plan it writes rewrites the quantized checkpoint in its own format; where the decoded model
    would not fit, one line points to the heuristic plan before anything loads."""
    path, width, layers = _model(case, tmp_path)
    directions = tmp_path / "directions.safetensors"
    random_measurements(width, layers).save(directions)
    plan = tmp_path / "plan.yml"
    args = ["optimize", str(path), "-d", str(directions), "-o", str(plan), "--search-prompts", "4", "--trials", "3",
            "--max-kl", "10", "--no-final-eval", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "3 trials in" in result.output
    strategy = result.output.split("--strategy ")[-1].split()[0]
    out = tmp_path / "out"
    rewritten = CliRunner().invoke(main, ["rewrite", "--plan", str(plan), str(path), str(out), "--strategy", strategy,
                                          "-q"])
    assert rewritten.exit_code == 0, rewritten.output
    assert Checkpoint.open(out).quantization() == Checkpoint.open(path).quantization()
    monkeypatch.setattr(streamed_module, "choose", lambda weights, max_memory: MemoryChoice(True, "weights 9 GB > 70%"))
    refused = CliRunner().invoke(main, [*args[:4], "-o", str(tmp_path / "other.yml"), *args[6:]])
    assert refused.exit_code == 1 and not (tmp_path / "other.yml").exists()
    assert refused.output.strip().splitlines()[-1] == (
        f"Error: optimize needs the whole model in memory and {path.name} does not fit (weights 9 GB > 70%); use the "
        "heuristic plan instead: abliterate analyze DIRECTIONS --suggest-plan plan.yml, then rewrite --plan plan.yml")
