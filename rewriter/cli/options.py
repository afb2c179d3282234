"""Options that several model commands share (measure, evaluate, optimize); importing this
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
