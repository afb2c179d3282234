"""`abliterate verify BASE PUBLISHED` with Hub repos on either side, against the loopback Hub
(the real huggingface_hub client): a faithful push passes; each kind of tampering is named."""
from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from rewriter.io.hub import HubFiles
from tests.helpers import random_measurements
from tests.hub_server import HubServer
from tests.test_hub import LAYERS, assert_one_line_error, cli, host, hub  # noqa: F401  (hub: the fixture)

EDITED = "model.layers.1.self_attn.o_proj.weight"
UNTOUCHED = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture()
def pushed(hub: HubServer, checkpoint_factory: Callable[[str], Path], directions_file: Path, tmp_path: Path) -> str:
    """The tiny llama hosted as org/base, rewritten from the Hub and pushed to me/pub."""
    host(hub, "org/base", checkpoint_factory("llama"))
    result = cli("rewrite", "org/base", str(tmp_path / "out"), "-d", str(directions_file), *LAYERS, "-q",
                 "--push-to", "me/pub")
    assert result.exit_code == 0, result.output
    return "me/pub"


def flip_byte(hub: HubServer, repo: str, tensor: str) -> None:
    """Change one byte in the middle of ``tensor``'s data, in whichever pushed shard holds it."""
    weight_map = json.loads(hub.content(repo, "model.safetensors.index.json"))["weight_map"]
    shard = weight_map[tensor]
    data = bytearray(hub.content(repo, shard))
    (length,) = struct.unpack("<Q", data[:8])
    start, end = json.loads(data[8 : 8 + length])[tensor]["data_offsets"]
    data[8 + length + (start + end) // 2] ^= 0x01
    hub.add_file(repo, shard, bytes(data))


def verify(*args: str):
    return cli("verify", "org/base", "me/pub", "-q", *args)


def test_published_repo_verifies_against_its_base_shard_by_shard(hub: HubServer, pushed: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    held: list[int] = []
    download = HubFiles.download

    def counting(self: HubFiles, name: str) -> Path:
        path = download(self, name)
        if self.local_dir is not None and name.startswith("model-"):
            held.append(len(list(self.local_dir.glob("model-*.safetensors"))))
        return path

    monkeypatch.setattr(HubFiles, "download", counting)
    result = verify("--low-disk")
    assert result.exit_code == 0, result.output
    base, pub = hub.repos["org/base"].head, hub.repos["me/pub"].head
    assert f"me/pub@{pub} is org/base at {base} with the recorded edit and nothing else" in result.output
    shards = len([n for n in hub.repos["me/pub"].files if n.startswith("model-")])
    assert shards >= 3 and len(held) == 2 * shards, held  # every shard of both repos, downloaded once each
    assert max(held) == 1, "--low-disk holds one shard of each repo at a time"
    card = hub.content("me/pub", "README.md").decode()
    assert f"abliterate verify org/base@{base} me/pub --low-disk" in card


@pytest.mark.parametrize("tensor, problem", [(EDITED, "elements differ from a fresh edit of the source tensor"),
                                             (UNTOUCHED, "not edited by the plan, yet its bytes changed")])
def test_one_changed_byte_is_named(hub: HubServer, pushed: str, tensor: str, problem: str) -> None:
    flip_byte(hub, pushed, tensor)
    result = verify()
    assert_one_line_error(result, "verify: 1 problem in me/pub@")
    assert f"{tensor}: " in result.output and problem in result.output.split(f"{tensor}: ")[1], result.output


def test_an_extra_weight_file_is_named(hub: HubServer, pushed: str) -> None:
    hub.add_file(pushed, "pytorch_model.bin", b"the unedited weights, smuggled in")
    result = verify()
    assert_one_line_error(result, "verify: 1 problem")
    assert "pytorch_model.bin: not written by this rewrite" in result.output


def test_a_plan_file_that_is_not_the_recorded_plan_is_named(hub: HubServer, pushed: str) -> None:
    hub.add_file(pushed, "plan.yml", b"ablate:\n- {layer: 0, measurement: 1, scale: 0.5}\n")
    result = verify()
    assert_one_line_error(result, "verify: 1 problem")
    assert "plan.yml: missing or not the plan the record holds" in result.output


def test_a_swapped_direction_file_is_unverifiable(hub: HubServer, pushed: str, tmp_path: Path) -> None:
    other = tmp_path / "other.safetensors"
    random_measurements(64, 4, seed=7).save(other)
    hub.add_file(pushed, "directions.safetensors", other.read_bytes())
    assert_one_line_error(verify(), "is unverifiable", "directions.safetensors does not match")


def test_a_repo_without_a_record_is_unverifiable(hub: HubServer, pushed: str) -> None:
    del hub.repos[pushed].files["abliteration.json"]
    hub.repos[pushed].head = "f" * 40
    assert_one_line_error(verify(), "me/pub@ffff", "is unverifiable", "no abliteration.json")


def test_a_local_output_verifies_against_a_hub_base(hub: HubServer, pushed: str, tmp_path: Path) -> None:
    result = cli("verify", "org/base", str(tmp_path / "out"), "-q")
    assert result.exit_code == 0, result.output
    assert f"is org/base at {hub.repos['org/base'].head} with the recorded edit and nothing else" in result.output
