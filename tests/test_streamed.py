"""The layer-streamed forward: the same means and logits as the whole model in memory, on tiny
checkpoints of every built-in architecture and on the real Qwen example; sizes and the choice of path."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rewriter.cli import main
from rewriter.directions import Measurements
from rewriter.errors import AbliterateError
from rewriter.lab import streamed as streamed_module
from rewriter.lab.analyze import layer_metrics, table
from rewriter.lab.evaluate import evaluate, first_token_logits, kl_divergence
from rewriter.lab.measure import mean_states, measure
from rewriter.lab.memory import MemoryChoice, choose, parse_size
from rewriter.lab.models import load_model
from rewriter.lab.prompts import default_prompts
from rewriter.lab.streamed import open_streamed, streamed_first_token_logits, streamed_means
from tests.helpers import ALL_ARCHS, build_model, edit_tensor_file, tiny_tokenizer, write_checkpoint

BAD = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9 w10", "w11", "w12 w13"]
GOOD = ["w9 w8", "w7 w6 w5 w4", "w3", "w20 w21 w22"]
KW = dict(batch_size=2, chat_template=True, system_prompt=None)


def _tiny(tmp_path: Path, arch: str) -> Path:
    path = write_checkpoint(build_model(arch), tmp_path / arch, arch)
    tiny_tokenizer(path)
    return path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_streamed_means_equal_in_memory_means(tmp_path: Path, arch: str, dtype: str) -> None:
    path = _tiny(tmp_path, arch)
    streamed = [mean for mean, _ in streamed_means(open_streamed(path, dtype), [BAD, GOOD], q=0.995, progress=False, **KW)]
    lm = load_model(path, dtype)
    whole = [mean_states(lm, prompts, q=0.995, desc="", progress=False, **KW) for prompts in (BAD, GOOD)]
    for a, b in zip(streamed, whole):
        assert a.dtype == torch.float64 and a.shape == b.shape == (4, 64)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # same batches, same sums: equal in practice


def test_streamed_logits_and_kl_equal_in_memory(tmp_path: Path) -> None:
    original = _tiny(tmp_path, "llama")
    edited = _tiny(tmp_path / "e", "llama")
    name = "model.layers.1.mlp.down_proj.weight"

    def amplify(tensors: dict[str, torch.Tensor]) -> None:  # tiny random models are near uniform: a large edit
        tensors[name] = tensors[name] * 100

    edit_tensor_file(edited, name, amplify)
    logits = {}
    for name, path in (("original", original), ("edited", edited)):
        logits[name, "streamed"] = streamed_first_token_logits(open_streamed(path), [GOOD], progress=False, **KW)[0]
        logits[name, "whole"] = first_token_logits(load_model(path), GOOD, progress=False, **KW)
        torch.testing.assert_close(logits[name, "streamed"], logits[name, "whole"], rtol=0, atol=1e-5)
    kl_streamed = kl_divergence(logits["original", "streamed"], logits["edited", "streamed"])
    kl_whole = kl_divergence(logits["original", "whole"], logits["edited", "whole"])
    assert float(kl_whole.mean()) > 1e-4, "the edit changes the next-token distributions"
    torch.testing.assert_close(kl_streamed, kl_whole, rtol=1e-4, atol=1e-9)


def _force_streaming(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny models always fit: make the choice say otherwise."""
    monkeypatch.setattr(streamed_module, "choose", lambda weights, max_memory: MemoryChoice(True, "forced"))


def test_refused_only_streamed_averages_the_prompts_the_whole_model_does(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """--refused-only streams: the pass ends with the logits, and the harmful mean is over the prompts they
    call refused, the same prompts and the same sums as in memory. (A tiny random model refuses nothing,
    so a refusal here is a logit comparison that splits the prompts.)"""
    from rewriter.lab import measure as measure_module
    from rewriter.lab import refusals

    def split(logits: torch.Tensor, openers: list[int]) -> torch.Tensor:
        return (logits[:, 0] - logits[:, 0].median()).double()  # about half of each batch

    monkeypatch.setattr(measure_module, "refusal_log_odds", split)
    monkeypatch.setattr(refusals, "refusal_log_odds", split)
    path = _tiny(tmp_path, "llama")  # (transformers 5 gives a tiny qwen2 its own BPE, which reads these words as nothing)
    prompts = [" ".join(f"w{i * j % 23 + 1}" for j in range(1 + i % 4)) for i in range(12)]
    kw = dict(batch_size=4, progress=False, refused_only=True, chat_template=False)
    whole = measure(path, prompts, GOOD, **kw)
    assert 0 < whole.harmful_count < len(prompts), "the split should refuse some prompts, not all"
    _force_streaming(monkeypatch)
    lines: list[str] = []
    streamed = measure(path, prompts, GOOD, log=lines.append, **kw)
    assert any(line.startswith("streamed 4 layers") for line in lines)
    assert streamed.harmful_count == whole.harmful_count and streamed.metadata == whole.metadata
    for n in whole.layers:
        torch.testing.assert_close(streamed.harmful[n], whole.harmful[n], rtol=0, atol=1e-6)
        torch.testing.assert_close(streamed.harmless[n], whole.harmless[n], rtol=0, atol=1e-6)
    monkeypatch.setattr(refusals, "refusal_log_odds", lambda logits, openers: -torch.ones(logits.shape[0]))
    out = tmp_path / "d.safetensors"
    result = CliRunner().invoke(main, ["measure", str(path), "-o", str(out), "--refused-only", "-q", "--no-chat-template"])
    assert result.exit_code == 1 and not out.exists()
    assert result.output.strip().splitlines()[-1].startswith("Error: --refused-only: the model refuses none of the 64")


def test_evaluate_streamed_scores_without_generating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ABLITERATE_CACHE", str(tmp_path / "cache"))
    path = _tiny(tmp_path, "mistral")  # a tiny qwen2's own BPE would read every prompt as the same tokens
    whole = evaluate(path, BAD, GOOD, original=path, max_new_tokens=2, progress=False, **KW)
    _force_streaming(monkeypatch)
    monkeypatch.setenv("ABLITERATE_CACHE", str(tmp_path / "cache-streamed"))
    lines: list[str] = []
    result = evaluate(path, BAD, GOOD, original=path, progress=False, log=lines.append, **KW)
    assert result.refusals is None and result.responses == {} and result.prompts == len(BAD)
    assert result.refusal_score == pytest.approx(whole.refusal_score, abs=1e-5)
    assert 0.0 <= result.kl <= 1e-9 and result.kl_prompts == len(GOOD)
    assert any("forced" in line for line in lines) and any(line.startswith("streamed 4 layers") for line in lines)


def test_measure_streamed_when_forced_records_the_same_metadata(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _tiny(tmp_path, "qwen3")
    whole = measure(path, BAD, GOOD, batch_size=2, progress=False)
    _force_streaming(monkeypatch)
    streamed = measure(path, BAD, GOOD, batch_size=2, progress=False)
    assert streamed.metadata == whole.metadata
    for n in whole.layers:
        torch.testing.assert_close(streamed.harmful[n], whole.harmful[n], rtol=0, atol=1e-6)


def test_qwen_streamed_under_a_cap_measures_what_the_whole_model_measures(qwen: Path, tmp_path: Path) -> None:
    bad, good = default_prompts("harmful-measure")[:3], default_prompts("harmless-measure")[:3]
    (tmp_path / "bad.txt").write_text("\n".join(bad) + "\n")
    (tmp_path / "good.txt").write_text("\n".join(good) + "\n")
    out = tmp_path / "d.safetensors"
    # a process of its own, so that its peak RSS is its own: the weights are 2.5 GB in float32
    args = ["measure", str(qwen), "--harmful", str(tmp_path / "bad.txt"), "--harmless", str(tmp_path / "good.txt"),
            "-o", str(out), "--batch-size", "3", "-q", "--max-memory", "1.2GB"]
    # The child reports its own peak at exit: VmHWM of its own address space. (ru_maxrss would
    # include the parent's RSS at fork: the kernel keeps the old mm's high-water mark at exec.)
    code = ("import atexit, re, sys; atexit.register(lambda: print('peak-rss-kib', re.search(r'VmHWM:\\s+(\\d+)', "
            "open('/proc/self/status').read())[1], file=sys.stderr)); from rewriter.cli import main; main()")
    run = subprocess.run([sys.executable, "-c", code, *args], check=False, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "streaming the weights layer by layer" in run.stderr and "streamed 24 layers" in run.stderr
    peak_kib = int(run.stderr.split("peak-rss-kib")[-1].split()[0])
    assert peak_kib * 1024 < 1.2e9
    streamed = Measurements.load(out)
    whole = measure(qwen, bad, good, batch_size=3, progress=False)
    for n in whole.layers:
        for a, b in ((streamed.harmful[n], whole.harmful[n]), (streamed.harmless[n], whole.harmless[n])):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))
    assert list(table(layer_metrics(streamed))) == list(table(layer_metrics(whole)))


def test_sizes_and_the_choice_of_path() -> None:
    assert parse_size("1GB") == 10**9 and parse_size("512MB") == 512 * 10**6
    assert parse_size("1.5GiB") == 3 * 2**29 and parse_size("2048") == 2048 and parse_size("64 mb") == 64 * 10**6
    for bad in ("", "1XB", "-1GB", "0GB", "GB"):
        with pytest.raises(AbliterateError, match="memory size"):
            parse_size(bad)
    assert choose(8 * 10**9, 10 * 10**9).stream is True  # 80% of the cap
    assert choose(6 * 10**9, 10 * 10**9).stream is False
    assert "--max-memory 10.0 GB" in choose(8 * 10**9, 10 * 10**9).reason


def test_cap_too_small_and_a_false_quantization_are_one_line_errors(tmp_path: Path, qwen: Path) -> None:
    result = CliRunner().invoke(main, ["measure", str(qwen), "-o", str(tmp_path / "d.safetensors"), "--max-memory", "10MB"])
    assert result.exit_code == 1 and "--max-memory 10.0 MB is too small to stream" in result.output.splitlines()[-1]
    assert "Traceback" not in result.output and not (tmp_path / "d.safetensors").exists()
    path = _tiny(tmp_path, "llama")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(AbliterateError, match=r"declares quant_method 'fp8' but no tensor is stored in that format"):
        open_streamed(path)
