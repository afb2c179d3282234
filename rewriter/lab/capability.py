"""Capability beyond the first token: what an edit costs over whole answers, and on questions
with known answers.

1. **Answer KL.** The original answers each harmless prompt greedily (up to ``ANSWER_TOKENS``
   tokens); both models are then run teacher-forced over prompt + that answer, and
   KL(original || edited) is taken at every answer position and averaged over all of them.
   The original's part (its answers and, per position, its ``TOP_K`` most likely tokens'
   log-probabilities) is cached on disk, so the two models are never in memory together.
   The KL is over those tokens plus the rest of the vocabulary as one outcome: a lower bound
   of the full KL, equal to it within the rest's mass (below 1e-3 at almost every position of
   a greedy answer).
2. **Known answers.** Arithmetic and formatting questions the project generates from a fixed
   seed (no data set to download), each checked by a rule; accuracy of original and edited.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

from ..io.files import cache_root, write_atomic
from .evaluate import generate, generate_ids
from .models import LoadedModel, format_prompts, left_padded_positions, load_model, resolve_model

ANSWER_TOKENS = 64
TOP_K = 64
QUESTIONS = 48
QUESTION_TOKENS = 40  # the longest right answer (a list of ten numbers) fits


@dataclass(frozen=True)
class Question:
    text: str
    kind: str
    expected: str  # what check() compares with: a number, a word, a list, a JSON object


def questions(n: int | None = None, seed: int = 0) -> list[Question]:
    """``n`` (default QUESTIONS) questions with known answers, the kinds in turn, from ``seed`` (the same every run)."""
    n = QUESTIONS if n is None else n
    rng = random.Random(seed)
    words = ("river", "candle", "orange", "window", "garden", "pencil", "silver", "rocket", "button", "forest")
    keys = ("count", "total", "size", "level", "score", "age")

    def make(kind: str) -> Question:
        if kind == "add":
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            return Question(f"What is {a} + {b}? Reply with the number only.", kind, str(a + b))
        if kind == "subtract":
            a, b = rng.randint(50, 99), rng.randint(1, 49)
            return Question(f"What is {a} - {b}? Reply with the number only.", kind, str(a - b))
        if kind == "multiply":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            return Question(f"What is {a} times {b}? Reply with the number only.", kind, str(a * b))
        if kind == "upper":
            w = rng.choice(words)
            return Question(f"Write the word '{w}' in capital letters, and nothing else.", kind, w.upper())
        if kind == "sort":
            nums = rng.sample(range(1, 100), 5)
            return Question(f"Sort these numbers from smallest to largest, separated by commas, and write nothing "
                            f"else: {', '.join(map(str, nums))}.", kind, json.dumps(sorted(nums)))
        k, v = rng.choice(keys), rng.randint(1, 500)
        return Question(f'Reply with only a JSON object that has the key "{k}" with the number {v} as its value.',
                        kind, json.dumps({k: v}))

    kinds = ("add", "subtract", "multiply", "upper", "sort", "json")
    out: dict[str, Question] = {}
    while len(out) < n:  # each question once (a drawn duplicate is drawn again)
        q = make(kinds[len(out) % len(kinds)])
        out.setdefault(q.text, q)
    return list(out.values())


def check(question: Question, answer: str) -> bool:
    """Whether ``answer`` is right: the first number, the word alone, the numbers in order, the object."""
    text = answer.strip()
    numbers = [int(x) for x in re.findall(r"(?<![\w.])-?\d+(?![\w.]\d)", text)]
    if question.kind in ("add", "subtract", "multiply"):
        return bool(numbers) and numbers[0] == int(question.expected)
    if question.kind == "upper":
        return text.strip("`'\".* \n") == question.expected
    if question.kind == "sort":
        return numbers == json.loads(question.expected)
    found = re.search(r"\{.*?\}", text, re.DOTALL)
    try:
        return found is not None and json.loads(found.group(0)) == json.loads(question.expected)
    except ValueError:
        return False


@dataclass
class Capability:
    answer_kl: float  # mean over answer tokens of KL(original || edited)
    answer_tokens: int
    answer_prompts: int
    accuracy: float  # the edited model's, on the known-answer questions
    original_accuracy: float
    questions: int
    by_kind: dict[str, list[float]] = field(default_factory=dict)  # kind -> [original, edited] accuracy

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Reference:
    """The original's part, cached: its answers' token ids and top-k log-probs along them, and its
    known-answer results."""

    answers: list[list[int]]
    top_ids: torch.Tensor  # [positions, TOP_K] int64, positions of all answers in order
    top_logp: torch.Tensor  # [positions, TOP_K] float32
    correct: list[bool]


def reference(original: str | Path, harmless: Sequence[str], *, batch_size: int, dtype: str, chat_template: bool,
              system_prompt: str | None, progress: bool,
              log: Callable[[str], None] = lambda s: None) -> Reference:
    """The original's answers, top-k log-probs and known-answer results, cached by its files and the prompts."""
    path = resolve_model(original)
    stats = [f"{w.name}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in sorted(path.glob("*.safetensors"))]
    qs = questions()
    ident = json.dumps([str(path.resolve()), stats, list(harmless), [q.text for q in qs], dtype, chat_template,
                        system_prompt, ANSWER_TOKENS, TOP_K, QUESTION_TOKENS])
    cache = cache_root() / "capability" / (hashlib.sha256(ident.encode()).hexdigest()[:32] + ".safetensors")
    if cache.is_file():
        t = load_file(cache)
        lengths = t["lengths"].tolist()
        ids = t["answer_ids"].tolist()
        return Reference([ids[sum(lengths[:i]):sum(lengths[:i + 1])] for i in range(len(lengths))], t["top_ids"],
                         t["top_logp"], [bool(c) for c in t["correct"].tolist()])
    log(f"capability: the original's answers to {len(harmless)} harmless prompts and {len(qs)} known-answer questions")
    lm = load_model(path, dtype)
    kw = dict(batch_size=batch_size, chat_template=chat_template, system_prompt=system_prompt, progress=progress)
    answers = generate_ids(lm, harmless, max_new_tokens=ANSWER_TOKENS, **kw)
    top = teacher_forced(lm, harmless, answers, reduce=lambda i, lp: lp.topk(min(TOP_K, lp.shape[-1]), dim=-1), **kw)
    ref = Reference(answers, torch.cat([t.indices for t in top]), torch.cat([t.values for t in top]),
                    known_answers(lm, **kw))
    write_atomic(cache, save_safetensors({
        "answer_ids": torch.tensor([i for a in answers for i in a], dtype=torch.int64),
        "lengths": torch.tensor([len(a) for a in answers], dtype=torch.int64),
        "top_ids": ref.top_ids, "top_logp": ref.top_logp, "correct": torch.tensor(ref.correct, dtype=torch.int8)}))
    return ref


def measure_capability(lm: LoadedModel, harmless: Sequence[str], ref: Reference, *, batch_size: int,
                       chat_template: bool, system_prompt: str | None, progress: bool) -> Capability:
    """The edited model ``lm`` against the original's reference: answer KL and known-answer accuracy."""
    kw = dict(batch_size=batch_size, chat_template=chat_template, system_prompt=system_prompt, progress=progress)
    at = ref.top_ids.split([len(a) for a in ref.answers])  # each answer's rows
    logp = torch.cat(teacher_forced(lm, harmless, ref.answers, reduce=lambda i, lp: lp.gather(-1, at[i]), **kw))
    kl = lumped_kl(ref.top_logp, logp)
    correct = known_answers(lm, **kw)
    qs = questions()
    by_kind = {}
    for kind in dict.fromkeys(q.kind for q in qs):
        rows = [i for i, q in enumerate(qs) if q.kind == kind]
        by_kind[kind] = [sum(ref.correct[i] for i in rows) / len(rows), sum(correct[i] for i in rows) / len(rows)]
    return Capability(float(kl.mean()) if kl.numel() else 0.0, kl.numel(), len(harmless), sum(correct) / len(qs),
                      sum(ref.correct) / len(qs), len(qs), by_kind)


def lumped_kl(p_top: torch.Tensor, q_top: torch.Tensor) -> torch.Tensor:
    """Per position, KL(P || Q) over the top tokens of P plus everything else as one outcome,
    from the log-probs of P and of Q at P's top tokens; in float64."""
    p, q = p_top.double(), q_top.double()
    p_rest = torch.log1p(-torch.logsumexp(p, -1).exp().clamp(max=1 - 1e-15))
    q_rest = torch.log1p(-torch.logsumexp(q, -1).exp().clamp(max=1 - 1e-15))
    kl = (p.exp() * (p - q)).sum(-1) + p_rest.exp() * (p_rest - q_rest)
    return kl.clamp(min=0.0)


def teacher_forced(lm: LoadedModel, prompts: Sequence[str], answers: Sequence[Sequence[int]], *, batch_size: int,
                   chat_template: bool, system_prompt: str | None, progress: bool,
                   reduce: Callable[[int, torch.Tensor], Any] = lambda i, logp: logp) -> list[Any]:
    """Per prompt ``i``, ``reduce(i, logp)`` of its [answer tokens, vocab] float32 log-probs of
    each answer token's position, the model reading prompt + answer (left-padded batches,
    positions over real tokens). The callers keep a few tokens per position: reduced as each
    batch is done, the full log-probs of every answer (64 answers of 128 tokens over a
    151,936-token vocabulary: 5 GB) are never held at once."""
    tok = lm.tokenizer
    texts = format_prompts(tok, prompts, chat_template, system_prompt)
    rows = [tok(t, add_special_tokens=not chat_template)["input_ids"] + list(a) for t, a in zip(texts, answers, strict=True)]
    out: list[Any] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    with tqdm(total=len(rows), unit="answer", desc="answer KL", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(rows[i]) for i in idx)
            ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for j, i in enumerate(idx):
                ids[j, width - len(rows[i]):], mask[j, width - len(rows[i]):] = torch.tensor(rows[i]), 1
            keep = max(len(answers[i]) for i in idx) + 1
            with torch.inference_mode():
                logits = lm.model(input_ids=ids.to(lm.model.device), attention_mask=mask.to(lm.model.device),
                                  position_ids=left_padded_positions(mask).to(lm.model.device), use_cache=False,
                                  logits_to_keep=keep).logits
            for j, i in enumerate(idx):
                n = len(answers[i])  # the positions that predict answer tokens: the n before the last
                out[i] = reduce(i, torch.log_softmax(logits[j, keep - 1 - n:keep - 1].float(), dim=-1).cpu())
            bar.update(len(idx))
    return out


def known_answers(lm: LoadedModel, *, batch_size: int, chat_template: bool, system_prompt: str | None,
                  progress: bool) -> list[bool]:
    """Whether each generated question is answered right, greedily, in up to QUESTION_TOKENS tokens."""
    qs = questions()
    texts = generate(lm, [q.text for q in qs], max_new_tokens=QUESTION_TOKENS, batch_size=batch_size,
                     chat_template=chat_template, system_prompt=system_prompt, progress=progress)
    return [check(q, t) for q, t in zip(qs, texts, strict=True)]
