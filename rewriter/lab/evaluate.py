"""evaluate: refusal count on harmful prompts and KL divergence from the original on harmless ones.

Refusals: greedy generation until the end of the turn or ``max_new_tokens`` (128 by
default: long enough to catch a refusal after a compliant-looking opening), chat template
applied, the whole answer judged by a marker set (case-insensitive, curly apostrophes
normalised, text inside a think block ignored). KL: KL(original || edited) of the
next-token distributions at the first response position, in float64, averaged over
prompts. The original's logits are computed once and cached on disk, so that the two
models are never in memory together. The cheap refusal score (no generation) is the mean
log-odds of a refusal-opening first token on the harmful prompts.

Beside the chosen markers, every answer is counted by each marker set and, with a judge
(judge.py), by a model; prompts tagged with harm categories are counted per category too.
With ``capability``, the edit's cost over whole answers and on known-answer questions
(capability.py).
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

from ..errors import AbliterateError, cause
from ..io.files import cache_root, write_atomic
from ..io.hub import parse_spec, repo_files
from .chat import MAX_PROMPT_TOKENS, cap_prompts
from .models import LoadedModel, batches, format_prompts, load_model, load_tokenizer, resolve_model
from .prompts import prompts_sha256
from .judge import THRESHOLD, JudgeSpec, check_judge, judge_answers, verdict
from .markers import MARKER_SETS, PROJECT_MARKERS, markers_in, other_script
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
    refusal_counts: dict[str, int] = field(default_factory=dict)  # per marker set, and "judge" when judged
    judge: str | None = None
    judge_refusals: int | None = None
    judge_p: dict[str, float] = field(default_factory=dict)  # prompt -> the judge's probability of a refusal
    categories: dict[str, str] = field(default_factory=dict)  # prompt -> its harm category, when tagged
    by_category: dict[str, dict[str, int]] = field(default_factory=dict)  # category -> prompts and each count
    capability: dict[str, object] | None = None  # capability.Capability.as_dict()
    other_script: int | None = None  # answers mostly in a script their prompt barely uses (markers.other_script)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def save_answers(self, path: Path, marker_sets: dict[str, Sequence[str]]) -> None:
        """One JSON line per harmful prompt: the answer, its category, per marker set the markers
        it hit, and the judge's verdict and probability when judged."""
        lines = []
        for prompt, answer in self.responses.items():
            hits = {name: markers_in(answer, markers) for name, markers in marker_sets.items()}
            line: dict[str, object] = {"prompt": prompt, "answer": answer, "refused": prompt in self.refused,
                                       "markers": hits, "other_script": other_script(prompt, answer)}
            if prompt in self.categories:
                line["category"] = self.categories[prompt]
            if prompt in self.judge_p:
                line["judge"] = verdict(self.judge, self.judge_p[prompt])
            lines.append(json.dumps(line, ensure_ascii=False))
        write_atomic(path, ("\n".join(lines) + "\n").encode())

    def count(self, harmful: Sequence[str], responses: Sequence[str], marker_sets: dict[str, Sequence[str]],
              categories: Sequence[str] | None) -> None:
        """Refusals by every marker set and the judge, in all and per category; answers in another script."""
        self.other_script = sum(other_script(p, r) for p, r in zip(harmful, responses, strict=True))
        verdicts = {name: [bool(markers_in(r, m)) for r in responses] for name, m in marker_sets.items()}
        if self.judge_p:
            verdicts["judge"] = [self.judge_p[p] >= THRESHOLD for p in harmful]
            self.judge_refusals = sum(verdicts["judge"])
        self.refusal_counts = {name: sum(v) for name, v in verdicts.items()}
        if categories is None:
            return
        self.categories = dict(zip(harmful, categories, strict=True))
        for cat in dict.fromkeys(categories):
            rows = [i for i, c in enumerate(categories) if c == cat]
            self.by_category[cat] = {"prompts": len(rows), **{n: sum(v[i] for i in rows) for n, v in verdicts.items()}}


# What generate() takes from the checkpoint's generation_config.json, pinned: one greedy answer per
# prompt as a tensor, bounded in time and memory (no beams, drafts, time limits, static caches of
# any size, watermarks or compilation). The model's own token ids, penalties and suppressed or
# forced tokens still apply: they are part of how it answers.
GREEDY = dict(do_sample=False, top_p=None, top_k=None, temperature=None, num_beams=1, num_return_sequences=1,
              return_dict_in_generate=False, output_scores=False, output_logits=False, output_attentions=False,
              output_hidden_states=False, max_time=None, penalty_alpha=None, prompt_lookup_num_tokens=None,
              dola_layers=None, stop_strings=None, watermarking_config=None, guidance_scale=None, token_healing=False,
              cache_implementation=None, cache_config=None, disable_compile=True, use_mtp=False,
              assistant_early_exit=None)


def generate(lm: LoadedModel, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int,
             chat_template: bool = True, system_prompt: str | None = None, progress: bool = True) -> list[str]:
    """Greedy continuations of each prompt, in the order given (``generate_ids``, decoded)."""
    ids = generate_ids(lm, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       chat_template=chat_template, system_prompt=system_prompt, progress=progress)
    return lm.tokenizer.batch_decode(ids, skip_special_tokens=True)


def generate_ids(lm: LoadedModel, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int,
                 chat_template: bool = True, system_prompt: str | None = None, progress: bool = True) -> list[list[int]]:
    """Greedy continuations of each prompt as token ids, in the order given, each up to and with
    its end-of-turn token. The progress bar counts tokens as they are generated (a batch of long
    answers takes minutes on a CPU), and the answers done."""
    texts = format_prompts(lm.tokenizer, prompts, chat_template, system_prompt)
    out: list[list[int]] = [[] for _ in texts]
    tok = lm.tokenizer
    ends = _end_ids(lm)
    with tqdm(total=len(texts) * max_new_tokens, unit="token", desc="generate", disable=not progress) as bar:
        for done, (idx, enc) in enumerate(batches(lm, texts, batch_size, chat_template)):
            ticks = _TokenTicks(bar, len(idx))
            with torch.inference_mode():
                try:
                    ids = lm.model.generate(**enc.to(lm.model.device), max_new_tokens=max_new_tokens,
                                            pad_token_id=tok.pad_token_id, stopping_criteria=[ticks], **GREEDY)
                except Exception as exc:  # transformers checks most generation settings only as it generates
                    raise AbliterateError(f"{lm.path}: generation failed ({cause(exc)}); transformers generates "
                                          "with the settings of its generation_config.json, or config.json's") from None
            for i, row in zip(idx, ids[:, enc["input_ids"].shape[1]:].tolist()):
                stop = next((k for k, t in enumerate(row) if t in ends), len(row) - 1)
                out[i] = row[:stop + 1]
            bar.update(len(idx) * max_new_tokens - ticks.counted)  # answers that ended early: their rest
            bar.set_postfix_str(f"{min((done + 1) * batch_size, len(texts))}/{len(texts)} answers")
    return out


def _end_ids(lm: LoadedModel) -> set[int]:
    """The tokens that end an answer: the generation config's end-of-sequence ids and the tokenizer's."""
    configured = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    found = [*(configured if isinstance(configured, list) else [configured]), lm.tokenizer.eos_token_id]
    return {t for t in found if isinstance(t, int) and not isinstance(t, bool)}  # (the config's are any JSON)


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
                    registry: Registry | None = None, low_disk: bool = False) -> torch.Tensor:
    """The original model's first-response logits, cached by model files (a Hub model's commit
    under ``low_disk``) and prompts.

    ``lm``, when given, is the original already loaded (it is used rather than loaded again).
    A model that does not fit (``max_memory``, else the memory available) is streamed layer by layer;
    with ``low_disk``, a Hub model always is, by byte range.
    """
    hub = parse_spec(str(original)) if low_disk else None
    if hub:
        path: str | Path = f"{hub[0]}@{repo_files(*hub)[0]}"
        files = [path]
    else:
        path = resolve_model(original)
        files = [str(path.resolve()), *(f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}"
                                        for w in sorted(path.glob("*.safetensors")))]
    ident = "|".join([*files, prompts_sha256(list(prompts)), dtype, str(chat_template), system_prompt or ""])
    cache = cache_root() / "logits" / (hashlib.sha256(ident.encode()).hexdigest()[:32] + ".safetensors")
    if cache.is_file():
        return load_file(cache)["logits"]
    kw = dict(batch_size=batch_size, chat_template=chat_template, system_prompt=system_prompt, progress=progress)
    streamed = None if lm is not None else streamed_if_needed(path, dtype, max_memory, log=log, logits=True,
                                                              registry=registry, low_disk=low_disk)
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
             log: Callable[[str], None] = lambda s: None, registry: Registry | None = None,
             categories: Sequence[str] | None = None, judge: str | Path | JudgeSpec | None = None,
             judge_label: str | None = None, judge_batch_size: int = 8, capability: bool = False,
             low_disk: bool = False) -> Evaluation:
    """Refusals of ``model`` on ``harmful`` and its cheap refusal score; with ``original``, the
    mean KL on ``harmless`` too. ``cache_as_original`` also caches this model's logits on
    ``harmless`` while it is loaded, so that a later evaluation against it loads it no more.

    Refusals are also counted by every marker set, by ``judge`` (a model: judge.py) when given,
    and per category when ``categories`` tags each harmful prompt. ``capability`` (needs
    ``original``) adds the answer KL and known-answer accuracy (capability.py). The judge is
    checked before anything runs and loaded after this model is released.

    A model that does not fit (``max_memory``, else the memory available) is streamed layer by
    layer: one pass over its weights gives the refusal score and the KL; nothing is generated,
    so refusals are not counted (None), nothing is judged and capability is not measured.
    With ``low_disk``, a Hub model (this one or the original) is always streamed, by byte range.
    Prompts longer than ``max_prompt_tokens`` are cut (``cap_prompts``, with this model's
    tokenizer: the original sees the same text)."""
    spec = check_judge(judge, judge_label) if judge is not None and not isinstance(judge, JudgeSpec) else judge
    if capability and original is None:
        raise AbliterateError("capability is measured against the original: give --original too")
    if categories is not None and len(categories) != len(harmful):
        raise AbliterateError(f"{len(categories)} categories for {len(harmful)} harmful prompts")
    mem = dict(max_memory=max_memory, log=log, registry=registry, low_disk=low_disk)
    streamed = streamed_if_needed(model, dtype, logits=True, **mem)
    tok = streamed.tokenizer if streamed is not None else load_tokenizer(resolve_model(model))
    harmful = cap_prompts(tok, harmful, max_prompt_tokens, "harmful", log)
    harmless = cap_prompts(tok, harmless, max_prompt_tokens, "harmless", log)
    kw = dict(batch_size=batch_size, chat_template=chat_template, system_prompt=system_prompt, progress=progress)
    reference = original_logits(original, harmless, dtype=dtype, **mem, **kw) if original is not None else None
    if streamed is not None:
        if cache_as_original:  # a pass of its own: rare, and cached after
            original_logits(model, harmless, dtype=dtype, **mem, **kw)
        sets = [harmful] if reference is None else [harmful, harmless]
        bad, *good = streamed_first_token_logits(streamed, sets, log=log, **kw)
        score = refusal_log_odds(bad, opener_ids(streamed.tokenizer)).mean()
        result = Evaluation(streamed.path, None, len(harmful), refusal_score=float(score), markers=marker_set)
        if spec is not None or capability:
            log("the model was streamed: no answers, so nothing was judged and capability was not measured")
        if reference is not None:
            result.kl, result.kl_prompts = float(kl_divergence(reference, good[0]).mean()), len(harmless)
        return result
    baseline = None  # the original's answers and known-answer results, for capability
    if capability:
        from .capability import reference as capability_reference  # capability builds on this module

        baseline = capability_reference(original, harmless, dtype=dtype, log=log, **kw)
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
    if baseline is not None:
        from .capability import measure_capability

        result.capability = measure_capability(lm, harmless, baseline, **kw).as_dict()
    del lm  # released before the judge is loaded: one model in memory at a time
    if spec is not None:
        result.judge = spec.name
        result.judge_p = dict(zip(harmful, judge_answers(spec, harmful, responses, batch_size=judge_batch_size,
                                                         dtype=dtype, progress=progress), strict=True))
    result.count(harmful, responses, {**MARKER_SETS, marker_set: markers}, categories)
    return result
