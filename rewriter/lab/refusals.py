"""The cheap refusal score: from one forward pass, the log-odds that the first response token
opens a refusal, for searches that cannot afford generation (text verdicts: ``markers``)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..errors import AbliterateError
from .models import LoadedModel, batches, format_prompts

# First words of a refusal; their probability at the first response position is the cheap score.
REFUSAL_OPENERS = ("I", "Sorry", "As", "Unfortunately", "No", "While", "It")


def opener_ids(tokenizer: object) -> list[int]:
    """Token ids that start a refusal, in this tokenizer (with and without a leading space)."""
    ids: set[int] = set()
    for word in REFUSAL_OPENERS:
        for text in (word, " " + word):
            pieces = tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
            if pieces and pieces[0] != getattr(tokenizer, "unk_token_id", None):
                ids.add(int(pieces[0]))
    if not ids:
        raise AbliterateError(f"the tokenizer has no token for any refusal opener ({', '.join(REFUSAL_OPENERS)}); "
                              "the refusal score cannot be computed")
    return sorted(ids)


def refusal_log_odds(logits: torch.Tensor, openers: Sequence[int]) -> torch.Tensor:
    """Per prompt, log P(first token opens a refusal) - log P(it does not), in float64."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    inside = torch.logsumexp(logp[:, list(openers)], dim=-1)
    outside = torch.log1p(-inside.exp().clamp(max=1 - 1e-12))
    return inside - outside


def first_token_scores(lm: LoadedModel, prompts: Sequence[str], openers: Sequence[int],
                       directions: Mapping[int, torch.Tensor], *, batch_size: int,
                       chat_template: bool = True) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Two cheap refusal scores from one forward pass, per prompt: the refusal log-odds of
    the first response token, and, per layer N given, the residual hidden_states[N] at the
    last prompt token projected on that layer's unit direction (what an edit aims to remove)."""
    texts = format_prompts(lm.tokenizer, prompts, chat_template, None)
    units = {n: (r / r.norm()).float() for n, r in directions.items()}
    odds, proj = torch.empty(len(texts), dtype=torch.float64), {n: torch.empty(len(texts)) for n in units}
    for idx, enc in batches(lm, texts, batch_size, chat_template):
        out = lm.forward(enc, output_hidden_states=True)
        odds[idx] = refusal_log_odds(out.logits[:, -1, :], openers)
        for n, u in units.items():
            proj[n][idx] = out.hidden_states[n][:, -1, :].float().cpu() @ u
    return odds, proj
