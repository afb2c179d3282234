"""measure: per-layer means of the residual stream at the last prompt token, harmful vs harmless.

One forward pass per batch gives every layer (``hidden_states[N]``, N = 0..L-1; method.md);
each vector is winsorized on its own, then summed in float64.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import __version__
from .directions import Measurements
from .errors import AbliterateError
from .prompts import prompts_sha256

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    path: str

    @property
    def num_layers(self) -> int:
        config = self.model.config
        return getattr(config, "text_config", config).num_hidden_layers


def resolve_model(name: str | Path) -> Path:
    """A checkpoint directory, or an example model's name (converted on first use)."""
    from .example_models import EXAMPLES, example_model

    if str(name) in EXAMPLES and not Path(name).exists():
        return example_model(str(name))
    path = Path(name)
    if not (path / "config.json").is_file():
        raise AbliterateError(f"model not found: {name} (a directory with config.json, or an example: {', '.join(EXAMPLES)})")
    return path


def load_model(name: str | Path, dtype: str = "float32", device: str = "cpu", progress: bool = True) -> LoadedModel:
    """A causal LM (or Gemma-3-style image-text-to-text model) and its tokenizer, for inference."""
    import transformers as tf
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    tf.logging.set_verbosity_error()
    (tf.logging.enable_progress_bar if progress else tf.logging.disable_progress_bar)()

    path = resolve_model(name)
    config = tf.AutoConfig.from_pretrained(path)
    if hasattr(config, "vision_config"):
        cls = tf.AutoModelForImageTextToText
    elif config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        cls = tf.AutoModelForCausalLM
    else:
        raise AbliterateError(f"{path}: model_type '{config.model_type}' is not a causal language model")
    model = cls.from_pretrained(path, dtype=DTYPES[dtype]).to(device).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, str(path))


def format_prompts(tok: Any, prompts: Sequence[str], chat_template: bool, system_prompt: str | None) -> list[str]:
    """Each prompt as the model sees it before its first response token."""
    if not chat_template:
        return list(prompts)
    if not getattr(tok, "chat_template", None):
        raise AbliterateError("the model has no chat template; pass --no-chat-template to use raw prompts")
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [tok.apply_chat_template([*system, {"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts]


def batches(lm: LoadedModel, texts: Sequence[str], batch_size: int, chat_template: bool):
    """(indices, encoded batch) in order of token length, so that batches carry little padding."""
    tok = lm.tokenizer
    lengths = [len(ids) for ids in tok(list(texts), add_special_tokens=not chat_template)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=not chat_template)
        yield idx, enc


def last_token_states(lm: LoadedModel, enc: Any) -> torch.Tensor:
    """[batch, layers, width] residual stream at the last prompt token, hidden_states[0..L-1]."""
    mask = enc["attention_mask"].to(lm.model.device)
    # Left padding: positions must count real tokens only, as generate() does.
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        out = lm.model(input_ids=enc["input_ids"].to(lm.model.device), attention_mask=mask, position_ids=positions,
                       output_hidden_states=True, use_cache=False, logits_to_keep=1)
    return torch.stack([h[:, -1, :] for h in out.hidden_states[: lm.num_layers]], dim=1).float().cpu()


def winsorize(v: torch.Tensor, q: float) -> torch.Tensor:
    """Clamp each vector (last axis) to the q-quantile of its own absolute values."""
    if q >= 1.0:
        return v
    t = torch.quantile(v.abs().float(), q, dim=-1, keepdim=True).to(v.dtype)
    return torch.maximum(torch.minimum(v, t), -t)


def mean_states(lm: LoadedModel, prompts: Sequence[str], *, batch_size: int, q: float, chat_template: bool,
                system_prompt: str | None, desc: str, progress: bool = True) -> torch.Tensor:
    """float64 [layers, width] mean over prompts of winsorized last-token residuals."""
    texts = format_prompts(lm.tokenizer, prompts, chat_template, system_prompt)
    total: torch.Tensor | None = None
    with tqdm(total=len(texts), unit="prompt", desc=desc, disable=not progress) as bar:
        for idx, enc in batches(lm, texts, batch_size, chat_template):
            states = winsorize(last_token_states(lm, enc), q).double().sum(0)
            total = states if total is None else total + states
            bar.update(len(idx))
    assert total is not None
    return total / len(texts)


def measure(model: str | Path, harmful: Sequence[str], harmless: Sequence[str], *, batch_size: int = 16,
            winsorize_q: float = 0.995, dtype: str = "float32", device: str = "cpu", system_prompt: str | None = None,
            chat_template: bool = True, progress: bool = True, lm: LoadedModel | None = None,
            log: Callable[[str], None] = lambda s: None) -> Measurements:
    """Harmful and harmless means for every layer, with the metadata method.md asks for."""
    if not harmful or not harmless:
        raise AbliterateError("both prompt sets must hold at least one prompt")
    if not 0.0 < winsorize_q <= 1.0:
        raise AbliterateError(f"--winsorize {winsorize_q} must be in (0, 1]")
    start = time.monotonic()
    lm = lm or load_model(model, dtype, device, progress)
    kw = dict(batch_size=batch_size, q=winsorize_q, chat_template=chat_template, system_prompt=system_prompt, progress=progress)
    bad = mean_states(lm, harmful, desc="harmful", **kw)
    good = mean_states(lm, harmless, desc="harmless", **kw)
    seconds = time.monotonic() - start
    log(f"measured {len(harmful) + len(harmless)} prompts in {seconds:.1f} s")
    meta = {
        "model": lm.path,
        "model_name_or_path": str(getattr(lm.model.config, "_name_or_path", "")),
        "harmful_sha256": prompts_sha256(list(harmful)),
        "harmless_sha256": prompts_sha256(list(harmless)),
        "winsorize_quantile": str(winsorize_q),
        "position": "last prompt token (after the generation prompt)",
        "chat_template": str(chat_template).lower(),
        "system_prompt": system_prompt or "",
        "dtype": dtype,
        "tool_version": __version__,
    }
    layers = range(bad.shape[0])
    return Measurements({n: bad[n] for n in layers}, {n: good[n] for n in layers}, len(harmful), len(harmless), meta)
