"""Prompts on their way to the model, bounded: each cut to a number of tokens, then wrapped in
the checkpoint's chat template, rendered in a forked child process under a memory limit, a time
limit per prompt and a size limit on what it returns.

A forward pass keeps layers x tokens x width of hidden states per prompt, so one long row of a
prompt set could exhaust memory on a real model. Chat templates come from the checkpoint and
are code (Jinja): transformers renders them in Jinja's sandbox, which keeps a template from
reaching the machine, but not from raising, looping for hours (two nested ``range(100000)``)
or building a gigabyte string (``{{ 'w1 ' * 400000000 }}``). A child process bounds all of
that at the cost of one fork per prompt set; a real template renders a prompt in
milliseconds and adds at most a few kilobytes to it.
"""
from __future__ import annotations

import functools
import multiprocessing
import resource
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from ..errors import AbliterateError, cause
from .memory import address_space_bytes

MAX_PROMPT_TOKENS = 512  # per prompt, by default; the project's own prompts are far shorter
_LONGEST_TOKEN = 64  # characters; no vocabulary has longer tokens in practice
SECONDS_PER_PROMPT = 10.0
MEMORY = 512 << 20  # bytes the renderer may allocate beyond what it was forked with
ADDED_CHARS = 64 << 10  # what a template may add around a conversation's own text

Conversation = list[dict[str, str]]


def cap_prompts(tok: Any, prompts: Sequence[str], max_tokens: int, what: str,
                log: Callable[[str], None]) -> list[str]:
    """``prompts``, each cut to its first ``max_tokens`` tokens of ``tok`` (its own text; the chat
    template adds its own), and a line to ``log`` saying how many were cut."""
    heads = [p[: max_tokens * _LONGEST_TOKEN] for p in prompts]  # tokenizing a huge row whole is unbounded too
    ids = tok(heads, add_special_tokens=False)["input_ids"]
    cut = [len(i) > max_tokens or len(h) < len(p) for i, h, p in zip(ids, heads, prompts, strict=True)]
    if any(cut):
        log(f"{sum(cut)} of {len(prompts)} {what} prompts are longer than {max_tokens} tokens and were cut to their "
            f"first {max_tokens} (--max-prompt-tokens)")
    return [tok.decode(i[:max_tokens]) if c else p for i, c, p in zip(ids, cut, prompts, strict=True)]


def render_chats(tok: Any, conversations: Sequence[Conversation]) -> list[str]:
    """Each conversation as the model sees it before its first response token, rendered by
    ``tok``'s chat template in a child process; a template that fails, takes longer than
    ``SECONDS_PER_PROMPT`` on one prompt, or grows too large is a one-line error."""
    chats = tuple(tuple((m["role"], m["content"]) for m in c) for c in conversations)
    return list(_rendered(tok, repr(tok.chat_template), chats))


@functools.lru_cache(maxsize=16)
def _rendered(tok: Any, template: str, chats: tuple[tuple[tuple[str, str], ...], ...]) -> tuple[str, ...]:
    """The rendering, once per tokenizer, template (``template`` is part of the key only: a
    tokenizer's template can be replaced) and prompts: a fork costs about 0.1 s per 2 GB the
    process holds, and optimize scores the same prompts in every trial."""
    conversations = [[{"role": role, "content": content} for role, content in chat] for chat in chats]
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_render_all, args=(tok, conversations, send), daemon=True)
    child.start()
    send.close()
    try:
        return tuple(_result(receive, i) for i in range(len(conversations)))
    finally:
        receive.close()
        child.kill()
        child.join()


def _result(receive: Connection, index: int) -> str:
    where = f"the model's chat template (code from the checkpoint), on prompt {index + 1}"
    if not receive.poll(SECONDS_PER_PROMPT):
        raise AbliterateError(f"{where}: took more than {SECONDS_PER_PROMPT:g} s")
    try:
        ok, value = receive.recv()
    except EOFError:
        raise AbliterateError(f"{where}: the renderer died (more than {MEMORY >> 20} MiB?)") from None
    if not ok:
        raise AbliterateError(f"{where}: {value}")
    return value


def _render_all(tok: Any, conversations: Sequence[Conversation], send: Connection) -> None:
    """The child: render one conversation after the other and send each (or the first failure)."""
    _limit_memory(MEMORY)
    for conversation in conversations:
        try:
            text = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        except MemoryError:
            send.send((False, f"it needs more than {MEMORY >> 20} MiB"))
            return
        except Exception as exc:  # the template's own error, whatever its type
            send.send((False, cause(exc, 300)))
            return
        if problem := _oversized(text, conversation):
            send.send((False, problem))
            return
        send.send((True, text))


def _oversized(text: object, conversation: Conversation) -> str | None:
    """What is wrong with a rendered prompt that is not text or adds more than ``ADDED_CHARS``, or None."""
    if not isinstance(text, str):
        return f"it rendered a {type(text).__name__}, not text"
    own = sum(len(m["content"]) for m in conversation)
    if len(text) > own + ADDED_CHARS:
        return (f"it rendered {len(text):,} characters around {own:,} of messages, more than the {ADDED_CHARS:,} a "
                "chat template may add")
    return None


def _limit_memory(extra: int) -> None:
    """Let this process's address space grow by at most ``extra`` bytes (RLIMIT_AS; off Linux,
    where its size is unknown, only the time limit holds)."""
    size = address_space_bytes()
    if not size:
        return
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = size + extra if hard == resource.RLIM_INFINITY else min(size + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
