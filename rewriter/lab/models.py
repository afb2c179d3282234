"""Loading a model for inference, and running it on left-padded prompt batches: what measure
and evaluate share."""
from __future__ import annotations

import ctypes
import difflib
import gc
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..dtypes import DTYPES, RUN_DTYPES, dtype_name
from ..errors import AbliterateError, cause
from .chat import render_chats

if TYPE_CHECKING:
    from ..registry import Registry


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    path: str

    def forward(self, enc: Any, **kw: Any) -> Any:
        """One forward pass over an encoded, left-padded batch, returning only the last position's logits.

        Positions count real tokens only, as generate() does, so that a batch gives what
        single prompts give.
        """
        return forward_batch(self.model, enc, self.model.device, **kw)


def forward_batch(model: Any, enc: Any, device: Any, **kw: Any) -> Any:
    """``model`` on an encoded, left-padded batch: positions over real tokens, the last position's logits."""
    mask = enc["attention_mask"].to(device)
    with torch.inference_mode():
        return model(input_ids=enc["input_ids"].to(device), attention_mask=mask,
                     position_ids=left_padded_positions(mask), use_cache=False, logits_to_keep=1, **kw)


def left_padded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token (padding clamped to 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def resolve_model(name: str | Path) -> Path:
    """A checkpoint directory, an example model's name, or a Hub repo ``ORG/NAME[@REVISION]``
    (downloaded into the Hugging Face cache, shard by shard, when no such directory exists)."""
    from ..io.hub import download_checkpoint, parse_spec
    from .example_models import EXAMPLES, resolve_source

    path = Path(resolve_source(str(name)))
    spec = parse_spec(str(name))
    if spec is not None:
        return download_checkpoint(*spec)
    if not (path / "config.json").is_file():
        raise AbliterateError(f"model not found: {name} (a directory with config.json, an example: "
                              f"{', '.join(EXAMPLES)}, or a Hub repo ORG/NAME){_did_you_mean(str(name), EXAMPLES)}")
    return path


def _did_you_mean(name: str, examples: Collection[str]) -> str:
    """A close example name or a nearby directory with a config.json, for a mistyped model."""
    parent = Path(name).expanduser().parent
    try:
        nearby = [str(parent / p.name) for p in parent.iterdir() if (p / "config.json").is_file()] if parent.is_dir() else []
    except OSError:
        nearby = []
    close = difflib.get_close_matches(name, [*examples, *nearby[:1000]], n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def load_model(name: str | Path, dtype: str = "float32", device: str = "cpu", registry: Registry | None = None) -> LoadedModel:
    """A causal LM (or Gemma-3-style image-text-to-text model) and its tokenizer, for inference; a
    quantized safetensors checkpoint decoded through its codec plugin (decoded.py)."""
    # the decoded path builds on the streamed one, which imports this module
    from .decoded import load_decoded, safetensors_checkpoint

    path = resolve_model(name)
    ckpt = safetensors_checkpoint(path)
    if ckpt is not None and ckpt.quantization() is not None:
        lm = load_decoded(ckpt, dtype, registry)
        lm.model.to(device)
        return lm
    config = load_config(path, len(ckpt.names) if ckpt is not None else None)
    check_generation_config(path)
    cls = model_class(config, path)
    model = built(lambda: cls.from_pretrained(path, dtype=DTYPES[dtype_name(dtype, RUN_DTYPES)]), path)
    return LoadedModel(model.to(device).eval(), load_tokenizer(path), str(path))


def release_free_memory() -> None:
    """Hand the memory freed so far back to the system before a model is built. glibc keeps what a
    model and its activations freed (2.1 GB after run's search on the 0.5B model) in its heaps,
    where the next model's tensors mostly do not land: the peak grew by that much, and page
    faults here cost several times as much when so much is held. Elsewhere than glibc, only
    the collection."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc (Windows: no CDLL(None))
        pass


def load_config(path: Path, tensors: int | None = None) -> Any:
    """transformers' config of a checkpoint: it checks config.json's fields as it reads them (a
    string for a width, an unknown model type) and raised from deep inside. Its layer count is
    checked too: transformers takes -1 and builds no layer, and builds every layer it is told of
    before it reads a weight (a million hung the load); where the weights' ``tensors`` are
    counted, each layer needs at least one."""
    try:
        config = quiet_transformers().AutoConfig.from_pretrained(path)
    except Exception as exc:  # whatever transformers raises on the file's values
        raise AbliterateError(f"{path / 'config.json'}: transformers cannot read it ({cause(exc)})") from None
    layers = getattr(config.get_text_config(), "num_hidden_layers", 1)
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise AbliterateError(f"{path / 'config.json'}: num_hidden_layers {layers!r}; a model has at least one layer")
    if tensors is not None and layers > tensors:
        raise AbliterateError(f"{path / 'config.json'}: num_hidden_layers {layers}, but the weights hold "
                              f"{tensors} tensors in all")
    return config


def built(make: Callable[[], Any], path: Path) -> Any:
    """``make()``, a model's from_pretrained or from_config (every model the lab loads, whole,
    decoded, streamed or a judge), after the memory freed so far is given back: a config that
    reads can still describe a model transformers cannot build (no attention heads, an unknown
    activation or rope type), and weights can miss what it describes."""
    release_free_memory()
    try:
        return make()
    except AbliterateError:
        raise
    except Exception as exc:  # whatever transformers raises on what the checkpoint describes
        raise AbliterateError(f"{path}: transformers cannot build the model its config.json describes "
                              f"({cause(exc)})") from None


def check_generation_config(path: Path) -> None:
    """Read ``generation_config.json`` as from_pretrained will: transformers raises on a bad one
    (a list where an object belongs, a negative max_new_tokens, an unknown cache implementation)
    from deep inside the model's loading, where nothing names the file."""
    if not (path / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    try:
        GenerationConfig.from_pretrained(path)
    except Exception as exc:  # whatever transformers raises on the file's values
        raise AbliterateError(f"{path / 'generation_config.json'}: transformers cannot read it ({cause(exc)})") from None


def quiet_transformers() -> Any:
    """transformers, its warnings and progress bars off (one progress display per step: ours)."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    tf.logging.disable_progress_bar()
    return tf


def model_class(config: Any, path: Path) -> Any:
    """The auto class that builds this model: causal LM, or image-text-to-text for Gemma-3-style models."""
    import transformers as tf
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if hasattr(config, "vision_config"):
        return tf.AutoModelForImageTextToText
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return tf.AutoModelForCausalLM
    raise AbliterateError(f"{path}: model_type '{config.model_type}' is not a causal language model")


def load_tokenizer(path: Path) -> Any:
    """The model's tokenizer, padding on the left (the last prompt token is the last position)."""
    import transformers as tf

    try:
        tokenizer = tf.AutoTokenizer.from_pretrained(path)
        for special in ("unk", "bos", "eos", "pad"):  # looked up on use: an unknown unk token recursed without end
            getattr(tokenizer, f"{special}_token_id")
    except Exception as exc:  # what transformers raises for missing or broken tokenizer files varies
        raise AbliterateError(f"{path}: no usable tokenizer ({cause(exc)})") from None
    limit = tokenizer.model_max_length  # transformers takes any JSON here, and compares it with each prompt's length
    if not isinstance(limit, (int, float)) or isinstance(limit, bool):
        raise AbliterateError(f"{path}: no usable tokenizer (model_max_length {limit!r} is not a number)")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        raise AbliterateError(f"{path}: no usable tokenizer (no padding or end-of-sequence token to pad a batch with)")
    return tokenizer


def format_prompts(tok: Any, prompts: Sequence[str], chat_template: bool, system_prompt: str | None) -> list[str]:
    """Each prompt as the model sees it before its first response token (the chat template,
    which is the checkpoint's code, rendered under bounds: see chat.py)."""
    if not chat_template:
        return list(prompts)
    if not getattr(tok, "chat_template", None):
        raise AbliterateError("the model has no chat template; pass --no-chat-template to use raw prompts")
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return render_chats(tok, [[*system, {"role": "user", "content": p}] for p in prompts])


def batches(lm: LoadedModel, texts: Sequence[str], batch_size: int, chat_template: bool) -> Iterator[tuple[list[int], Any]]:
    """(indices, encoded batch) in order of token length, so that batches carry little padding."""
    tok = lm.tokenizer
    lengths = [len(ids) for ids in tok(list(texts), add_special_tokens=not chat_template)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=not chat_template)
        yield idx, enc
