"""measure on the real Qwen example and a tiny multimodal Gemma3; winsorization; prompt files."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rewriter.lab.analyze import layer_metrics
from rewriter.cli import main
from rewriter.directions import CONVENTION, Measurements
from rewriter.errors import AbliterateError
from rewriter.lab.measure import mean_states, measure, winsorize
from rewriter.lab.models import load_model
from rewriter.lab.prompts import default_prompts, load_prompts
from rewriter.lab.refusals import first_token_scores, opener_ids
from tests.helpers import build_model, tiny_tokenizer, write_checkpoint


def test_default_prompt_sets_are_large_and_disjoint() -> None:
    sets = {n: default_prompts(n) for n in ("harmful-measure", "harmful-eval", "harmless-measure", "harmless-eval")}
    assert len(sets["harmful-measure"]) + len(sets["harmful-eval"]) >= 128
    assert len(sets["harmless-measure"]) + len(sets["harmless-eval"]) >= 128
    assert not set(sets["harmful-measure"]) & set(sets["harmful-eval"])
    assert not set(sets["harmless-measure"]) & set(sets["harmless-eval"])


def test_qwen_directions_separate_held_out_prompts(qwen: Path, qwen_directions: Path) -> None:
    m = Measurements.load(qwen_directions)
    assert m.layers == list(range(24)) and m.width == 896
    assert m.metadata["convention"] == CONVENTION and m.metadata["winsorize_quantile"] == "0.995"
    assert m.harmful_count == 32 and m.harmless_count == 32
    metrics = layer_metrics(m)
    best = max(metrics, key=lambda x: x.quality).layer
    print("quality by layer:", [round(x.quality, 4) for x in metrics])
    assert best >= 12, "quality should peak in the later half of the layers"
    # held-out prompts: their mean residual projects further along r for harmful than for harmless
    lm = load_model(qwen)
    r = m.direction(best)
    r = r / r.norm()
    kw = dict(batch_size=16, q=0.995, chat_template=True, system_prompt=None, desc="", progress=False)
    # 16 of each held-out set: a mean over 16 prompts separates as clearly as over all of them
    bad = mean_states(lm, default_prompts("harmful-eval")[:16], **kw)[best]
    good = mean_states(lm, default_prompts("harmless-eval")[:16], **kw)[best]
    print(f"held-out projections on r at layer {best}: harmful {float(bad @ r):.3f}, harmless {float(good @ r):.3f}")
    assert float(bad @ r) > float(good @ r) + 0.5 * float(m.direction(best).norm())


def test_batched_and_unbatched_measurements_agree(qwen: Path) -> None:
    lm = load_model(qwen)
    bad, good = default_prompts("harmful-measure")[:6], default_prompts("harmless-measure")[:6]
    one = measure(qwen, bad, good, batch_size=1, lm=lm, progress=False)
    many = measure(qwen, bad, good, batch_size=6, lm=lm, progress=False)
    for n in (0, 5, 12, 23):
        for a, b in ((one.harmful[n], many.harmful[n]), (one.harmless[n], many.harmless[n])):
            assert float((a - b).norm()) <= 1e-3 * float(a.norm()), n


def test_refused_only_averages_the_prompts_the_model_refuses(qwen: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The harmful means of --refused-only are the plain means of the prompts whose own
    first-token refusal log-odds, scored one by one, are above 0; harmless ones are unchanged."""
    lm = load_model(qwen)
    bad, good = default_prompts("harmful-measure")[:10], default_prompts("harmless-measure")[:4]
    odds, _ = first_token_scores(lm, bad, opener_ids(lm.tokenizer), {}, batch_size=1)
    refused = [p for p, o in zip(bad, odds.tolist(), strict=True) if o > 0]
    assert 0 < len(refused) < len(bad), "these prompts should mix refusals and answers"
    m = measure(qwen, bad, good, batch_size=8, lm=lm, progress=False, refused_only=True)
    plain = measure(qwen, refused, good, batch_size=8, lm=lm, progress=False)
    assert m.harmful_count == len(refused) and m.harmless_count == len(good)
    assert m.metadata["harmful_prompts"] == f"refused only (first-token refusal log-odds > 0): {len(refused)} of 10"
    for n in (0, 12, 22):
        assert float((m.harmful[n] - plain.harmful[n]).norm()) <= 1e-3 * float(plain.harmful[n].norm()), n
        assert torch.equal(m.harmless[n], plain.harmless[n])
    from rewriter.lab import measure as measure_module
    monkeypatch.setattr(measure_module, "refusal_log_odds", lambda logits, openers: -torch.ones(logits.shape[0]))
    with pytest.raises(AbliterateError, match="refuses none of the 3 harmful prompts"):
        measure(qwen, bad[:3], good, lm=lm, progress=False, refused_only=True)


def test_winsorize_clips_each_vector_on_its_own() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1, 1000, generator=g)
    b = torch.randn(1, 1000, generator=g)
    b[0, 7] = 1e6  # a batch-mate's outlier
    together = winsorize(torch.cat([a, b]), 0.995)
    assert torch.equal(together[0], winsorize(a, 0.995)[0])
    assert float(together[1].abs().max()) < 10
    assert float(together[0].abs().max()) == pytest.approx(float(torch.quantile(a.abs(), 0.995)))
    assert torch.equal(winsorize(b, 1.0), b)


def test_tiny_multimodal_gemma3_measures_language_layers(tmp_path: Path) -> None:
    path = write_checkpoint(build_model("gemma3").float(), tmp_path / "g3", "gemma3")
    tiny_tokenizer(path)
    out = tmp_path / "d.safetensors"
    result = CliRunner().invoke(main, ["measure", str(path), "--harmful", str(_txt(tmp_path / "bad.txt", ["w1 w2 w3", "w4 w5"])),
                                       "--harmless", str(_txt(tmp_path / "good.txt", ["w9 w8", "w7 w6 w5 w4"])),
                                       "-o", str(out), "-q", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    m = Measurements.load(out)
    assert m.layers == [0, 1, 2, 3] and m.width == 64  # the text model's 4 layers, not the vision tower's


def _txt(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prompt_file_formats(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    want = ["first prompt", "second prompt"]
    (tmp_path / "p.json").write_text(json.dumps(want))
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"text": w}) for w in want))
    (tmp_path / "p.csv").write_text("id,text\n1,first prompt\n2,second prompt\n")
    pq.write_table(pa.table({"text": want}), tmp_path / "p.parquet")
    for name in ("p.json", "p.jsonl", "p.csv", "p.parquet"):
        assert load_prompts(tmp_path / name) == want, name
    assert load_prompts(_txt(tmp_path / "p.txt", want)) == want


@pytest.mark.parametrize("setup,expected", [
    (lambda d: _txt(d / "empty.txt", ["", "  "]), "no prompts in the file"),
    (lambda d: (d / "bad.json").write_text("{not json") and d / "bad.json", "unreadable prompt file"),
    (lambda d: (d / "p.csv").write_text("prompt\nhello\n") and d / "p.csv", "no column 'text' (columns: prompt)"),
    (lambda d: d / "missing.txt", "prompt file not found"),
])
def test_prompt_file_errors(tmp_path: Path, setup, expected: str) -> None:
    path = setup(tmp_path)
    result = CliRunner().invoke(main, ["measure", "qwen2.5-coder-0.5b-instruct", "--harmful", str(path), "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and expected in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "o").exists()


def test_not_a_causal_lm(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "resnet", "architectures": ["ResNetModel"]}))
    result = CliRunner().invoke(main, ["measure", str(tmp_path), "-o", str(tmp_path / "o.safetensors")])
    assert result.exit_code == 1
    assert "model_type 'resnet' is not a causal language model" in result.output


def test_model_without_chat_template_needs_the_flag(tmp_path: Path) -> None:
    path = write_checkpoint(build_model("llama"), tmp_path / "m", "llama")
    tiny_tokenizer(path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    args = ["measure", str(path), "--harmful", str(_txt(tmp_path / "b.txt", ["w1 w2"])),
            "--harmless", str(_txt(tmp_path / "g.txt", ["w3"])), "-o", str(tmp_path / "d.safetensors"), "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "no chat template; pass --no-chat-template" in result.output
    assert CliRunner().invoke(main, [*args, "--no-chat-template"]).exit_code == 0


def _rss_mb() -> int:
    import re

    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text())[1]) // 1024


def test_memory_freed_before_a_model_loads_goes_back_to_the_system(chat_model: tuple[Path, Path]) -> None:
    """256 MB freed in small pieces stay in glibc's heaps (the RSS does not fall) until a model
    loads: a second model then does not land on top of what the first one left."""
    held = [torch.ones(16 * 1024) for _ in range(4096)]  # 64 KiB each: heap memory, not mmap
    last = held[-1]  # (keeps the heap's top in use: glibc alone trims only there)
    del held
    freed = _rss_mb()
    load_model(chat_model[0])
    assert _rss_mb() < freed - 128, "the freed memory stayed with the process"
    del last
