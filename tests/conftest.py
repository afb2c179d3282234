"""Tiny random checkpoints of every built-in architecture, written by transformers itself."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

# Before huggingface_hub is imported (it reads these once): plain LFS transfers for the
# loopback Hub, no telemetry, and a cache of the test run's own.
os.environ["HF_HUB_DISABLE_XET"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="abliterate-test-hf-cache-")
atexit.register(shutil.rmtree, os.environ["HF_HUB_CACHE"], ignore_errors=True)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from rewriter.directions import Measurements  # noqa: E402

TEXT = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64,
)
TEXT_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")
ALL_ARCHS = (*TEXT_ARCHS, "gemma3", "gemma3-new-names")


def build_model(arch: str) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    if arch.startswith("gemma3") and arch != "gemma3_text":
        text = tf.Gemma3TextConfig(**TEXT, sliding_window=16).to_dict()
        vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=8).to_dict()
        config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                 image_token_index=127, boi_token_index=125, eoi_token_index=126)
        model = tf.Gemma3ForConditionalGeneration(config)
    else:
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
               "qwen3": tf.Qwen3Config, "gemma3_text": tf.Gemma3TextConfig}[arch]
        extra = {"sliding_window": 16} if arch == "gemma3_text" else {}
        model = tf.AutoModelForCausalLM.from_config(cls(**TEXT, **extra))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # random gains, so that Gemma's norm correction is exercised
                p.copy_(torch.randn_like(p) * 0.5)
    return model.to(torch.bfloat16).eval()


def write_checkpoint(model: torch.nn.Module, path: Path, arch: str, shard: str = "40KB") -> Path:
    model.save_pretrained(path, max_shard_size=shard)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    (path / "custom_code.py").write_text("# custom modelling code travels with the checkpoint\n")
    if arch == "gemma3-new-names":
        _rename_to_new_gemma3_scheme(path)
    return path


def _rename_to_new_gemma3_scheme(path: Path) -> None:
    """transformers writes 'language_model.model.layers'; newer files use 'model.language_model.layers'."""
    def new(name: str) -> str:
        for old, repl in (("language_model.model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
                          ("multi_modal_projector.", "model.multi_modal_projector."), ("language_model.lm_head.", "lm_head.")):
            if name.startswith(old):
                return repl + name[len(old):]
        return name

    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(path / shard)
        save_file({new(k): v for k, v in tensors.items()}, path / shard, metadata={"format": "pt"})
    index["weight_map"] = {new(k): v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))


def random_measurements(width: int, layers: int, seed: int = 1) -> Measurements:
    g = torch.Generator().manual_seed(seed)
    harmless = {n: torch.randn(width, generator=g, dtype=torch.float64) for n in range(layers)}
    harmful = {n: harmless[n] + torch.randn(width, generator=g, dtype=torch.float64) for n in range(layers)}
    return Measurements(harmful, harmless, 10, 10, {"model": "tiny-random"})


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


def tiny_tokenizer(path: Path, vocab_size: int = 128) -> None:
    """A word-level tokenizer with a chat template, saved beside a tiny checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    words = [f"w{i}" for i in range(vocab_size - len(specials) - 8)]
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")
    fast.chat_template = ("{% for m in messages %}<bos> {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}<eos>{% endif %}")
    fast.save_pretrained(path)


@pytest.fixture(scope="session")
def qwen() -> Path:
    """The real Qwen2.5-Coder-0.5B-Instruct example checkpoint (converted once, then cached)."""
    from rewriter.example_models import example_model

    return example_model("qwen2.5-coder-0.5b-instruct")


@pytest.fixture(scope="session")
def qwen_directions(qwen: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Directions measured on Qwen with the project's own measurement prompts."""
    from rewriter.measure import measure
    from rewriter.prompts import default_prompts

    path = tmp_path_factory.mktemp("qwen") / "directions.safetensors"
    measure(qwen, default_prompts("harmful-measure"), default_prompts("harmless-measure"), progress=False).save(path)
    return path
