"""Hub in and out, against a loopback server that speaks the Hub API, with the real client."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from rewriter.cli import main
from rewriter.io.hub import HubFiles
from tests.hub_server import HubServer

TOKEN = "hf_loopbacksecret0123456789"
LAYERS = ["--layers", "0-3:1"]


@pytest.fixture()
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with HubServer(tmp_path / "hub-objects", token=TOKEN) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield server


def host(hub: HubServer, repo: str, folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            hub.add_file(repo, p.relative_to(folder).as_posix(), p.read_bytes())


def cli(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def assert_one_line_error(result: Result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    # upload progress bars (carriage returns, no newline) may precede the error on its line
    errors = [line[line.index("Error: "):] for line in result.output.splitlines() if "Error: " in line]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for n in needles:
        assert n in errors[0], errors[0]


def test_rewrite_from_the_hub_and_push_back(hub: HubServer, checkpoint_factory: Callable[[str], Path],
                                            directions_file: Path, tmp_path: Path) -> None:
    src = checkpoint_factory("qwen2")
    host(hub, "org/tiny", src)
    local = tmp_path / "local"
    assert cli("rewrite", str(src), str(local), "-d", str(directions_file), *LAYERS, "-q").exit_code == 0
    out = tmp_path / "out"
    result = cli("rewrite", "org/tiny@main", str(out), "-d", str(directions_file), *LAYERS, "-q", "--push-to", "me/tiny-abliterated")
    assert result.exit_code == 0, result.output
    pushed = hub.repos["me/tiny-abliterated"]
    assert pushed.private, "repos are created private by default"
    assert len(pushed.commits) == 1, "one commit: no reader sees an index before its shards"
    shards = sorted(p.name for p in local.glob("*.safetensors"))
    assert set(shards) | {"model.safetensors.index.json", "config.json", "plan.yml", "directions.safetensors",
                          "README.md", "abliteration.json"} <= set(pushed.commits[0])
    for name in [*shards, "model.safetensors.index.json", "config.json", "tokenizer_config.json", "custom_code.py"]:
        assert hub.content("me/tiny-abliterated", name) == (local / name).read_bytes(), name
    revision = hub.repos["org/tiny"].head
    manifest = json.loads((out / "abliteration.json").read_text())
    assert manifest["fingerprint"]["origin"] == {"repo": "org/tiny", "revision": revision}
    card = hub.content("me/tiny-abliterated", "README.md").decode()
    for needle in ("base_model: org/tiny", "- abliterated", "- norm-preserving", revision, "| 2 | 1 | 1 |",
                   manifest["fingerprint"]["directions_sha256"]):
        assert needle in card, needle
    assert hub.content("me/tiny-abliterated", "directions.safetensors") == directions_file.read_bytes()
    assert TOKEN not in result.output
    for p in out.rglob("*"):
        assert not p.is_file() or TOKEN.encode() not in p.read_bytes(), p
    for repo in hub.repos:
        for path in hub.repos[repo].files:
            assert TOKEN.encode() not in hub.content(repo, path), path


def test_low_disk_keeps_at_most_two_input_shards(hub: HubServer, checkpoint_factory: Callable[[str], Path],
                                                directions_file: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    src = checkpoint_factory("llama")
    host(hub, "org/tiny", src)
    seen: list[int] = []
    download = HubFiles.download

    def counting(self: HubFiles, name: str) -> Path:
        path = download(self, name)
        if self.local_dir is not None:
            seen.append(len(list(self.local_dir.glob("*.safetensors"))))
        return path

    monkeypatch.setattr(HubFiles, "download", counting)
    out = tmp_path / "out"
    result = cli("rewrite", "org/tiny", str(out), "-d", str(directions_file), *LAYERS, "-q", "--low-disk")
    assert result.exit_code == 0, result.output
    shards = len(list(src.glob("*.safetensors")))
    assert shards >= 3 and len([n for n in seen if n]) == shards
    assert max(seen) <= 2, seen
    assert not (tmp_path / ".out.download").exists()
    local = tmp_path / "local"
    cli("rewrite", str(src), str(local), "-d", str(directions_file), *LAYERS, "-q")
    for p in local.glob("*.safetensors"):
        assert (out / p.name).read_bytes() == p.read_bytes()


def test_interrupted_push_resumes_with_the_rest(hub: HubServer, checkpoint_factory: Callable[[str], Path],
                                               directions_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli("rewrite", str(checkpoint_factory("llama")), str(out), "-d", str(directions_file), *LAYERS, "-q").exit_code == 0
    shards = len(list(out.glob("*.safetensors")))
    hub.fail_uploads_after = 2
    failed = cli("push", str(out), "me/model", "-d", str(directions_file))
    assert_one_line_error(failed, "me/model", "403")
    assert hub.repos["me/model"].commits == [], "nothing may be committed by a failed push"
    first = list(hub.uploads)
    assert len(first) == 2
    hub.fail_uploads_after = None
    again = cli("push", str(out), "me/model", "-d", str(directions_file))
    assert again.exit_code == 0, again.output
    assert hub.uploads[:2] == first and len(hub.uploads) == shards + 1  # shards + directions, each once
    assert len(set(hub.uploads)) == len(hub.uploads)
    assert len(hub.repos["me/model"].commits) == 1
    unchanged = cli("push", str(out), "me/model", "-d", str(directions_file))
    assert unchanged.exit_code == 0 and len(hub.uploads) == shards + 1, "a rerun uploads nothing again"


@pytest.mark.parametrize("status", [401, 403])
def test_rejected_credentials_are_one_line_and_publish_nothing(status: int, hub: HubServer,
                                                               checkpoint_factory: Callable[[str], Path],
                                                               directions_file: Path, tmp_path: Path) -> None:
    hub.deny_writes = status
    out = tmp_path / "out"
    result = cli("rewrite", str(checkpoint_factory("llama")), str(out), "-d", str(directions_file), *LAYERS, "-q",
                 "--push-to", "me/denied")
    assert_one_line_error(result, "me/denied", str(status))
    assert "me/denied" not in hub.repos and not out.exists()
    assert TOKEN not in result.output


def test_push_dry_run_lists_and_uploads_nothing(hub: HubServer, checkpoint_factory: Callable[[str], Path],
                                                directions_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert cli("rewrite", str(checkpoint_factory("llama")), str(out), "-d", str(directions_file), *LAYERS, "-q").exit_code == 0
    result = cli("push", str(out), "me/dry", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "would upload model.safetensors.index.json" in result.stdout and "would upload README.md" in result.stdout
    assert "me/dry" not in hub.repos and hub.uploads == []


def test_unknown_hub_repo(hub: HubServer, directions_file: Path, tmp_path: Path) -> None:
    result = cli("rewrite", "org/missing", str(tmp_path / "o"), "-d", str(directions_file), *LAYERS)
    assert_one_line_error(result, "resolve org/missing")
    assert not (tmp_path / "o").exists()


def test_unreachable_hub_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, directions_file: Path) -> None:
    with HubServer(tmp_path / "gone", token=TOKEN) as server:
        url = server.url  # closed once the block ends: nothing answers there
    monkeypatch.setenv("HF_ENDPOINT", url)
    result = cli("rewrite", "org/model", str(tmp_path / "out"), "-d", str(directions_file), *LAYERS)
    assert_one_line_error(result, "resolve org/model", "cannot be reached", "local checkpoint directory", "HF_ENDPOINT")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = cli("rewrite", "org/model", str(tmp_path / "out"), "-d", str(directions_file), *LAYERS)
    assert_one_line_error(result, "HF_HUB_OFFLINE is set", "unset HF_HUB_OFFLINE")
    assert not (tmp_path / "out").exists()


def test_lab_commands_take_hub_ids(hub: HubServer, tmp_path: Path) -> None:
    """inspect reads a Hub repo's headers without its weights; measure downloads it into the cache."""
    tiny = Path(__file__).parent / "data" / "reference" / "tiny-qwen2"  # with tokenizer and chat template
    host(hub, "org/tiny", tiny)
    result = cli("inspect", "org/tiny")
    assert result.exit_code == 0 and "architecture: qwen2" in result.output, result.output
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("How do I bake bread?\nWrite a poem about the sea.\n")
    out = tmp_path / "d.safetensors"
    result = cli("measure", "org/tiny", "-o", str(out), "--harmful", str(prompts), "--harmless", str(prompts))
    assert result.exit_code == 0, result.output
    assert out.is_file()
    result = cli("measure", "org/missing", "-o", str(tmp_path / "e.safetensors"))
    assert_one_line_error(result, "resolve org/missing")
