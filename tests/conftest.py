"""Session fixtures: tiny checkpoints, direction files, the real Qwen example (helpers live in tests/helpers.py)."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

# Before huggingface_hub is imported (it reads these once): plain LFS transfers for the
# loopback Hub, no telemetry, and a cache of the test run's own.
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="abliterate-test-hf-cache-")
atexit.register(shutil.rmtree, os.environ["HF_HUB_CACHE"], ignore_errors=True)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from tests.helpers import TEXT, build_model, random_measurements, tiny_tokenizer, write_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """checkpoint(arch) -> a sharded bf16 checkpoint directory (built once per session)."""
    cache: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in cache:
            path = tmp_path_factory.mktemp(f"ckpt-{arch}")
            write_checkpoint(build_model(arch), path, arch)
            cache[arch] = path
        return cache[arch]

    return make


@pytest.fixture(scope="session")
def directions_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("directions") / "directions.safetensors"
    random_measurements(TEXT["hidden_size"], TEXT["num_hidden_layers"]).save(path)
    return path


@pytest.fixture(scope="session")
def qwen() -> Path:
    """The real Qwen2.5-Coder-0.5B-Instruct example checkpoint (converted once, then cached)."""
    from rewriter.lab.example_models import example_model

    return example_model("qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="session")
def qwen_fp8(qwen: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Qwen example in DeepSeek's block FP8 layout, converted by tests/fp8_convert.py (not by the codecs)."""
    from tests.fp8_convert import convert

    return convert(qwen, tmp_path_factory.mktemp("qwen-fp8") / "model", "block")


@pytest.fixture(scope="session")
def qwen_directions(qwen: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directions measured on Qwen with the first 32 of each of the project's own measurement sets."""
    from rewriter.lab.measure import measure
    from rewriter.lab.prompts import default_prompts

    path = tmp_path_factory.mktemp("qwen") / "directions.safetensors"
    bad, good = (default_prompts(f"{kind}-measure")[:32] for kind in ("harmful", "harmless"))
    measure(qwen, bad, good, progress=False).save(path)
    return path


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny llama with a word-level tokenizer and a chat template, and directions for it
    (tests that change it work on a copy). Not qwen2: transformers 5 gives a qwen2 its own BPE
    tokenizer, which reads these words as nothing, so every prompt would be the same."""
    path = write_checkpoint(build_model("llama"), tmp_path_factory.mktemp("chat") / "m", "llama")
    tiny_tokenizer(path)
    directions = path.parent / "d.safetensors"
    random_measurements(TEXT["hidden_size"], TEXT["num_hidden_layers"]).save(directions)
    return path, directions
