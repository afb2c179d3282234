"""Options that several model commands share (measure, evaluate, optimize, run); importing this
needs no torch, so that their --help stays fast."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from ..lab.chat import MAX_PROMPT_TOKENS


def max_prompt_tokens_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--max-prompt-tokens", type=click.IntRange(min=1), default=MAX_PROMPT_TOKENS, show_default=True,
        help="Cut each prompt to its first N tokens (before the chat template; how many were cut is reported): "
             "a forward pass keeps layers x tokens x width of hidden states per prompt.")(f)


def judge_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """--judge, --judge-label, --judge-batch-size: a model that judges each answer beside the markers."""
    for option in reversed((
        click.option("--judge", metavar="MODEL",
                     help="A model that judges each answer too (a checkpoint directory, example name or Hub repo): a "
                          "sequence classifier (its refusal label named by --judge-label; it reads the answer alone), "
                          "or a causal LM asked the rubric of docs/method.md, its verdict read from the logits of "
                          "'yes' and 'no'. Checked before any work; runs after the judged model is released, in "
                          "batches on the CPU. The markers still decide 'refusals'; the judge's count is reported "
                          "beside them."),
        click.option("--judge-label", metavar="LABEL",
                     help="The refusal label of a classifier judge (one of its id2label names)."),
        click.option("--judge-batch-size", type=click.IntRange(min=1), default=8, show_default=True),
    )):
        f = option(f)
    return f
