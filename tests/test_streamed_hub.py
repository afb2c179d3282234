"""A Hub model measured with --low-disk: streamed layer by layer by byte range from the loopback
Hub (the real huggingface_hub client), no shard ever written to disk, the means those of the
same checkpoint on disk."""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rewriter.cli import main
from rewriter.directions import Measurements
from rewriter.lab.evaluate import evaluate
from rewriter.lab.measure import measure
from tests.helpers import tiny_tokenizer
from tests.hub_server import HubServer
from tests.test_hub import host, hub  # noqa: F401  (hub: the fixture)

BAD = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9 w10", "w11", "w12 w13"]
GOOD = ["w9 w8", "w7 w6 w5 w4", "w3", "w20 w21 w22"]


@pytest.fixture()
def hosted(hub: HubServer, checkpoint_factory: Callable[[str], Path], tmp_path: Path) -> Path:
    """A tiny llama with its tokenizer, on disk and hosted on the loopback Hub as org/tiny."""
    src = tmp_path / "tiny"
    shutil.copytree(checkpoint_factory("llama"), src)
    tiny_tokenizer(src)
    host(hub, "org/tiny", src)
    return src


def _shards_in_cache() -> set[Path]:
    return set(Path(os.environ["HF_HUB_CACHE"]).rglob("*.safetensors"))


def test_measure_low_disk_streams_a_hub_model_by_byte_range(hosted: Path, tmp_path: Path) -> None:
    src = hosted
    before = _shards_in_cache()
    lines: list[str] = []
    (tmp_path / "bad.txt").write_text("\n".join(BAD) + "\n")
    (tmp_path / "good.txt").write_text("\n".join(GOOD) + "\n")
    out = tmp_path / "d.safetensors"
    result = CliRunner().invoke(main, ["measure", "org/tiny", "--low-disk", "--harmful", str(tmp_path / "bad.txt"),
                                       "--harmless", str(tmp_path / "good.txt"), "--batch-size", "2", "-o", str(out),
                                       "-q"])
    assert result.exit_code == 0, result.output
    assert "--low-disk: its weights are read from the Hub layer by layer" in result.output
    assert "streamed 4 layers" in result.output
    assert _shards_in_cache() == before, "no shard is stored"
    remote = Measurements.load(out)
    local = measure(src, BAD, GOOD, batch_size=2, progress=False)
    for n in local.layers:
        torch.testing.assert_close(remote.harmful[n], local.harmful[n], rtol=0, atol=1e-6)
        torch.testing.assert_close(remote.harmless[n], local.harmless[n], rtol=0, atol=1e-6)


def test_evaluate_low_disk_scores_a_hub_original_streamed(hosted: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate --low-disk --original ORG/NAME: the original streamed from the Hub (its head read by
    byte range in pieces), its logits the local copy's: the KL of a model against itself is 0, and
    no shard is stored."""
    monkeypatch.setenv("ABLITERATE_CACHE", str(tmp_path / "cache"))
    before = _shards_in_cache()
    lines: list[str] = []
    result = evaluate(hosted, BAD, GOOD, original="org/tiny", low_disk=True, max_new_tokens=2, batch_size=2,
                      progress=False, log=lines.append)
    assert any("--low-disk: its weights are read from the Hub layer by layer" in line for line in lines)
    assert result.refusals is not None, "the local model is evaluated in memory, with generation"
    assert 0.0 <= result.kl <= 1e-9 and result.kl_prompts == len(GOOD)
    assert _shards_in_cache() == before, "no shard is stored"
