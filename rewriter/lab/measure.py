"""measure: per-layer means of the residual stream at the last prompt token, harmful vs harmless.

One forward pass per batch gives every layer (``hidden_states[N]``, N = 0..L-1;
docs/method.md); each vector is winsorized on its own, then summed in float64.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from .. import __version__
from ..directions import Measurements
from ..errors import AbliterateError
from .chat import MAX_PROMPT_TOKENS, cap_prompts
from .models import LoadedModel, batches, format_prompts, load_model
from .prompts import prompts_sha256
from .refusals import opener_ids, refusal_log_odds
from .streamed import streamed_if_needed, streamed_means

if TYPE_CHECKING:
    from ..registry import Registry


def last_token_states(lm: LoadedModel, enc: Any) -> torch.Tensor:
    """[batch, layers, width] residual stream at the last prompt token, hidden_states[0..L-1].

    transformers returns L + 1 hidden states (the embedding output, then each layer's);
    the last one is the final layer's output, after which no decoder layer reads.
    """
    return _last_token(lm.forward(enc, output_hidden_states=True))


def _last_token(out: Any) -> torch.Tensor:
    return torch.stack([h[:, -1, :] for h in out.hidden_states[:-1]], dim=1).float().cpu()


def winsorize(v: torch.Tensor, q: float) -> torch.Tensor:
    """Clamp each vector (last axis) to the q-quantile of its own absolute values."""
    if q >= 1.0:
        return v
    t = torch.quantile(v.abs().float(), q, dim=-1, keepdim=True).to(v.dtype)
    return torch.maximum(torch.minimum(v, t), -t)


def mean_states(lm: LoadedModel, prompts: Sequence[str], *, batch_size: int, q: float, chat_template: bool,
                system_prompt: str | None, desc: str, progress: bool = True) -> torch.Tensor:
    """float64 [layers, width] mean over prompts of winsorized last-token residuals."""
    total, count = _summed_states(lm, prompts, None, batch_size=batch_size, q=q, chat_template=chat_template,
                                  system_prompt=system_prompt, desc=desc, progress=progress)
    return total / count


def refused_mean_states(lm: LoadedModel, prompts: Sequence[str], *, batch_size: int, q: float, chat_template: bool,
                        system_prompt: str | None, desc: str, progress: bool = True) -> tuple[torch.Tensor, int]:
    """The mean over only the prompts the model refuses (first-token refusal log-odds > 0, from
    the same forward pass), and how many those were."""
    openers = opener_ids(lm.tokenizer)
    total, count = _summed_states(lm, prompts, openers, batch_size=batch_size, q=q, chat_template=chat_template,
                                  system_prompt=system_prompt, desc=desc, progress=progress)
    _some_refused(count, len(prompts))
    return total / count, count


def _some_refused(count: int, prompts: int) -> None:
    if not count:
        raise AbliterateError(f"--refused-only: the model refuses none of the {prompts} harmful prompts (first-token "
                              "refusal log-odds > 0); measure without it, or with prompts it refuses")


def _summed_states(lm: LoadedModel, prompts: Sequence[str], openers: Sequence[int] | None, *, batch_size: int,
                   q: float, chat_template: bool, system_prompt: str | None, desc: str,
                   progress: bool) -> tuple[torch.Tensor, int]:
    """float64 [layers, width] sum of winsorized last-token residuals, over every prompt or, with
    ``openers``, over those whose first response token opens a refusal more likely than not."""
    texts = format_prompts(lm.tokenizer, prompts, chat_template, system_prompt)
    total = torch.zeros(())
    count = 0
    with tqdm(total=len(texts), unit="prompt", desc=desc, disable=not progress) as bar:
        for idx, enc in batches(lm, texts, batch_size, chat_template):
            out = lm.forward(enc, output_hidden_states=True)
            states = _last_token(out)
            if openers is not None:
                states = states[refusal_log_odds(out.logits[:, -1, :].cpu(), openers) > 0]
            if states.shape[0]:  # a batch may hold no refused prompt
                total = total + winsorize(states, q).double().sum(0)
                count += states.shape[0]
            bar.update(len(idx))
    return total, count


def measure(model: str | Path, harmful: Sequence[str], harmless: Sequence[str], *, batch_size: int = 16,
            winsorize_q: float = 0.995, dtype: str = "float32", device: str = "cpu", system_prompt: str | None = None,
            chat_template: bool = True, progress: bool = True, lm: LoadedModel | None = None,
            max_memory: int | None = None, refused_only: bool = False, max_prompt_tokens: int = MAX_PROMPT_TOKENS,
            log: Callable[[str], None] = lambda s: None, registry: Registry | None = None,
            low_disk: bool = False) -> Measurements:
    """Harmful and harmless means for every layer, with the metadata method.md asks for.

    A model whose weights do not fit (in ``max_memory`` bytes, else in the memory available) is
    streamed layer by layer (streamed.py), with the same numbers. ``refused_only`` averages
    only the harmful prompts the model refuses: those it answers anyway carry little of the
    refusal and dilute the direction (docs/method.md). Prompts longer than ``max_prompt_tokens``
    are cut (``cap_prompts``). A quantized checkpoint is read through its codec plugin (``registry``).
    With ``low_disk``, a Hub model is streamed by byte range, never stored.
    """
    if not harmful or not harmless:
        raise AbliterateError("both prompt sets must hold at least one prompt")
    if not 0.0 < winsorize_q <= 1.0:
        raise AbliterateError(f"--winsorize {winsorize_q} must be in (0, 1]")
    start = time.monotonic()
    streamed = None if lm is not None else streamed_if_needed(model, dtype, max_memory, device, log, refused_only,
                                                              registry, low_disk)
    if streamed is None:
        lm = lm or load_model(model, dtype, device, registry)
    source = streamed or lm
    harmful = cap_prompts(source.tokenizer, harmful, max_prompt_tokens, "harmful", log)
    harmless = cap_prompts(source.tokenizer, harmless, max_prompt_tokens, "harmless", log)
    kw = dict(batch_size=batch_size, q=winsorize_q, chat_template=chat_template, system_prompt=system_prompt, progress=progress)
    harmful_count = len(harmful)
    if streamed is not None:
        openers = opener_ids(streamed.tokenizer) if refused_only else None
        (bad, harmful_count), (good, _) = streamed_means(streamed, [harmful, harmless], log=log, openers=openers, **kw)
        if refused_only:
            _some_refused(harmful_count, len(harmful))
    else:
        if refused_only:
            bad, harmful_count = refused_mean_states(lm, harmful, desc="harmful", **kw)
        else:
            bad = mean_states(lm, harmful, desc="harmful", **kw)
        good = mean_states(lm, harmless, desc="harmless", **kw)
    if refused_only:
        log(f"--refused-only: the model refuses {harmful_count} of the {len(harmful)} harmful prompts; "
            "the harmful means are theirs")
    seconds = time.monotonic() - start
    log(f"measured {len(harmful) + len(harmless)} prompts in {seconds:.1f} s")
    meta = {
        "model": source.path,
        "model_name_or_path": str(getattr(source.model.config, "_name_or_path", "")),
        "harmful_sha256": prompts_sha256(list(harmful)),
        "harmless_sha256": prompts_sha256(list(harmless)),
        "harmful_prompts": ("refused only (first-token refusal log-odds > 0): "
                            f"{harmful_count} of {len(harmful)}" if refused_only else "all"),
        "winsorize_quantile": str(winsorize_q),
        "position": "last prompt token (after the generation prompt)",
        "chat_template": str(chat_template).lower(),
        "system_prompt": system_prompt or "",
        "max_prompt_tokens": str(max_prompt_tokens),
        "dtype": dtype,
        "tool_version": __version__,
    }
    layers = range(bad.shape[0])
    return Measurements({n: bad[n] for n in layers}, {n: good[n] for n in layers}, harmful_count, len(harmless), meta)
