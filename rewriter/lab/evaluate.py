"""evaluate: refusal count on harmful prompts and KL divergence from the original on harmless ones.

Refusals: greedy generation until the end of the turn or ``max_new_tokens`` (128 by
default: long enough to catch a refusal after a compliant-looking opening), chat template
applied, the whole answer judged by a marker set (case-insensitive, curly apostrophes
normalised, text inside a think block ignored). KL: KL(original || edited) of the
next-token distributions at the first response position, in float64, averaged over
prompts. The original's logits are computed once and cached on disk, so that the two
models are never in memory together. The cheap refusal score (no generation) is the mean
log-odds of a refusal-opening first token on the harmful prompts.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

from ..io.files import cache_root, write_atomic
from .chat import MAX_PROMPT_TOKENS, cap_prompts
from .models import LoadedModel, batches, format_prompts, load_model, load_tokenizer, resolve_model
from .prompts import prompts_sha256
from .markers import PROJECT_MARKERS, markers_in
from .refusals import opener_ids, refusal_log_odds
from .streamed import streamed_first_token_logits, streamed_if_needed

if TYPE_CHECKING:
    from ..registry import Registry


@dataclass
class Evaluation:
    model: str
    refusals: int | None  # None: not counted (a streamed model is not generated from)
    prompts: int
    kl: float | None = None
    kl_prompts: int = 0
    refusal_score: float | None = None  # mean log-odds of a refusal opener (one forward pass, no generation)
    max_new_tokens: int = 0
    markers: str = "project"
    refused: list[str] = field(default_factory=list)
    responses: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def save_answers(self, path: Path, marker_sets: dict[str, Sequence[str]]) -> None:
        """One JSON line per harmful prompt: the answer and, per marker set, the markers it hit."""
        lines = []
        for prompt, answer in self.responses.items():
            hits = {name: markers_in(answer, markers) for name, markers in marker_sets.items()}
            lines.append(json.dumps({"prompt": prompt, "answer": answer, "refused": prompt in self.refused,
                                     "markers": hits}, ensure_ascii=False))
        write_atomic(path, ("\n".join(lines) + "\n").encode())


def generate(lm: LoadedModel, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int,
             chat_template: bool = True, system_prompt: str | None = None, progress: bool = True) -> list[str]:
    """Greedy continuations of each prompt, in the order given. The progress bar counts tokens as
    they are generated (a batch of long answers takes minutes on a CPU), and the answers done."""
    texts = format_prompts(lm.tokenizer, prompts, chat_template, system_prompt)
    out: list[str] = [""] * len(texts)
    tok = lm.tokenizer
    with tqdm(total=len(texts) * max_new_tokens, unit="token", desc="generate", disable=not progress) as bar:
        for done, (idx, enc) in enumerate(batches(lm, texts, batch_size, chat_template)):
            ticks = _TokenTicks(bar, len(idx))
            with torch.inference_mode():
                ids = lm.model.generate(**enc.to(lm.model.device), max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tok.pad_token_id, top_p=None, top_k=None, temperature=None,
                                        stopping_criteria=[ticks])
            new = ids[:, enc["input_ids"].shape[1]:]
            for i, text in zip(idx, tok.batch_decode(new, skip_special_tokens=True)):
                out[i] = text
            bar.update(len(idx) * max_new_tokens - ticks.counted)  # answers that ended early: their rest
            bar.set_postfix_str(f"{min((done + 1) * batch_size, len(texts))}/{len(texts)} answers")
    return out


class _TokenTicks:
    """A stopping criterion (any callable is one to transformers) that never stops generation:
    it advances the bar by the batch's rows at every generated token."""

    def __init__(self, bar: tqdm, rows: int) -> None:
        self.bar, self.rows, self.counted = bar, rows, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        self.bar.update(self.rows)
        self.counted += self.rows
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def first_token_logits(lm: LoadedModel, prompts: Sequence[str], *, batch_size: int, chat_template: bool = True,
                       system_prompt: str | None = None, progress: bool = True) -> torch.Tensor:
    """[prompts, vocab] float32 logits at the first response position."""
    texts = format_prompts(lm.tokenizer, prompts, chat_template, system_prompt)
    rows: list[torch.Tensor | None] = [None] * len(texts)
    with tqdm(total=len(texts), unit="prompt", desc="logits", disable=not progress) as bar:
        for idx, enc in batches(lm, texts, batch_size, chat_template):
            logits = lm.forward(enc).logits[:, -1, :].float()
            for j, i in enumerate(idx):
                rows[i] = logits[j].clone()
            bar.update(len(idx))
    return torch.stack([r for r in rows if r is not None])


def kl_divergence(original: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
    """Per-prompt KL(original || edited) of softmax(logits), in float64."""
    p_log = torch.log_softmax(original.double(), dim=-1)
    q_log = torch.log_softmax(edited.double(), dim=-1)
    return (p_log.exp() * (p_log - q_log)).sum(-1).clamp(min=0.0)


def original_logits(original: str | Path, prompts: Sequence[str], *, batch_size: int, dtype: str, chat_template: bool,
                    system_prompt: str | None, progress: bool, lm: LoadedModel | None = None,
                    max_memory: int | None = None, log: Callable[[str], None] = lambda s: None,
                    registry: Registry | None = None) -> torch.Tensor:
    """The original model's first-response logits, cached by model files and prompts.

    ``lm``, when given, is the original already loaded (it is used rather than loaded again).
    A model that does not fit (``max_memory``, else the memory available) is streamed layer by layer.
    """
    path = resolve_model(original)
    weights = sorted(path.glob("*.safetensors"))
    ident = "|".join([str(path.resolve()), *(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights),
                      prompts_sha256(list(prompts)), dtype, str(chat_template), system_prompt or ""])
    cache = cache_root() / "logits" / (hashlib.sha256(ident.encode()).hexdigest()[:32] + ".safetensors")
    if cache.is_file():
        return load_file(cache)["logits"]
    kw = dict(batch_size=batch_size, chat_template=chat_template, system_prompt=system_prompt, progress=progress)
    streamed = None if lm is not None else streamed_if_needed(path, dtype, max_memory, log=log, logits=True,
                                                              registry=registry)
    if streamed is not None:
        logits = streamed_first_token_logits(streamed, [prompts], log=log, **kw)[0]
    else:
        logits = first_token_logits(lm or load_model(path, dtype, registry=registry), prompts, **kw)
    write_atomic(cache, save_safetensors({"logits": logits}))
    return logits


def evaluate(model: str | Path, harmful: Sequence[str], harmless: Sequence[str], *, original: str | Path | None = None,
             max_new_tokens: int = 128, batch_size: int = 16, dtype: str = "float32",
             markers: Sequence[str] = PROJECT_MARKERS, marker_set: str = "project", chat_template: bool = True,
             system_prompt: str | None = None, cache_as_original: bool = False, progress: bool = True,
             max_memory: int | None = None, max_prompt_tokens: int = MAX_PROMPT_TOKENS,
             log: Callable[[str], None] = lambda s: None, registry: Registry | None = None) -> Evaluation:
    """Refusals of ``model`` on ``harmful`` and its cheap refusal score; with ``original``, the
    mean KL on ``harmless`` too. ``cache_as_original`` also caches this model's logits on
    ``harmless`` while it is loaded, so that a later evaluation against it loads it no more.

    A model that does not fit (``max_memory``, else the memory available) is streamed layer by
    layer: one pass over its weights gives the refusal score and the KL; nothing is generated,
    so refusals are not counted (None). Prompts longer than ``max_prompt_tokens`` are cut
    (``cap_prompts``, with this model's tokenizer: the original sees the same text)."""
    tok = load_tokenizer(resolve_model(model))
    harmful = cap_prompts(tok, harmful, max_prompt_tokens, "harmful", log)
    harmless = cap_prompts(tok, harmless, max_prompt_tokens, "harmless", log)
    kw = dict(batch_size=batch_size, chat_template=chat_template, system_prompt=system_prompt, progress=progress)
    mem = dict(max_memory=max_memory, log=log, registry=registry)
    reference = original_logits(original, harmless, dtype=dtype, **mem, **kw) if original is not None else None
    if (streamed := streamed_if_needed(model, dtype, logits=True, **mem)) is not None:
        if cache_as_original:  # a pass of its own: rare, and cached after
            original_logits(model, harmless, dtype=dtype, **mem, **kw)
        sets = [harmful] if reference is None else [harmful, harmless]
        bad, *good = streamed_first_token_logits(streamed, sets, log=log, **kw)
        score = refusal_log_odds(bad, opener_ids(streamed.tokenizer)).mean()
        result = Evaluation(streamed.path, None, len(harmful), refusal_score=float(score), markers=marker_set)
        if reference is not None:
            result.kl, result.kl_prompts = float(kl_divergence(reference, good[0]).mean()), len(harmless)
        return result
    lm = load_model(model, dtype, registry=registry)
    if cache_as_original:
        original_logits(model, harmless, dtype=dtype, lm=lm, **kw)
    responses = generate(lm, harmful, max_new_tokens=max_new_tokens, **kw)
    refused = [p for p, r in zip(harmful, responses) if markers_in(r, markers)]
    score = refusal_log_odds(first_token_logits(lm, harmful, **kw), opener_ids(lm.tokenizer)).mean()
    result = Evaluation(lm.path, len(refused), len(harmful), refusal_score=float(score), max_new_tokens=max_new_tokens,
                        markers=marker_set, refused=refused, responses=dict(zip(harmful, responses)))
    if reference is not None:
        result.kl = float(kl_divergence(reference, first_token_logits(lm, harmless, **kw)).mean())
        result.kl_prompts = len(harmless)
    return result
