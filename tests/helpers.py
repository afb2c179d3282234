"""Tiny random checkpoints of every built-in architecture, written by transformers itself,
and other helpers the tests share."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from rewriter.directions import Measurements

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


def tiny_tokenizer(path: Path, vocab_size: int = 128, extra: tuple[str, ...] = ()) -> None:
    """A word-level tokenizer with a chat template, saved beside a tiny checkpoint; ``extra``
    words join its vocabulary (a judge's "yes" and "no")."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    words = ["I", "Sorry", "Sure", *extra] + [f"w{i}" for i in range(vocab_size - len(specials) - 11)]
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>")
    fast.chat_template = ("{% for m in messages %}<bos> {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}<eos>{% endif %}")
    fast.save_pretrained(path)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_tensor_file(ckpt: Path, name: str, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = ckpt / index["weight_map"][name]
    tensors = load_file(shard)
    change(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in tensors or v != shard.name}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))


def fail(args: list[str], expected: str, out: Path | None = None) -> None:
    from rewriter.cli import main

    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output and expected in lines[0], lines[0]
    if out is not None:
        assert not out.exists(), "nothing may be written on an error"


def snapshot(root: Path) -> dict[str, object]:
    """Every file and link below ``root``: its bytes' hash, or the link's target (to show what changed)."""
    out: dict[str, object] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out



def rename_tensors(path: Path, rename: Callable[[str], str]) -> None:
    """Rename every tensor of a sharded checkpoint with ``rename``; the index is rebuilt to match."""
    index_path = path / "model.safetensors.index.json"
    weight_map: dict[str, str] = {}
    for shard in sorted(path.glob("*.safetensors")):
        renamed = {rename(k): v for k, v in load_file(shard).items()}
        save_file(renamed, shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(renamed, shard.name))
    index_path.write_text(json.dumps({**json.loads(index_path.read_text()), "weight_map": weight_map}))


def tree(path: Path) -> dict[str, object]:
    """Every file's bytes; the manifest parsed, without the shards' modification times."""
    files: dict[str, object] = {p.name: p.read_bytes() for p in sorted(path.iterdir())}
    manifest = json.loads(files.pop("abliteration.json"))
    files["abliteration.json"] = {**manifest, "shards": {n: r["size"] for n, r in manifest["shards"].items()}}
    return files
