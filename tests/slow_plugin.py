"""Test plugin: the 'standard' strategy under the name 'slow-standard', a tenth of a second slower
per edited matrix, so that a trial takes long enough for every worker of a shared study to start
before the others have finished all of it (a tiny model's trial takes milliseconds)."""
from __future__ import annotations

import time
from dataclasses import replace

import torch

from rewriter.hookspecs import hookimpl
from rewriter.plugins.strategies import BUILTIN
from rewriter.strategy import Strategy

STANDARD = next(s for s in BUILTIN if s.name == "standard")


def _slow_update(w: torch.Tensor, r: torch.Tensor, scale: float) -> tuple[torch.Tensor, int]:
    time.sleep(0.1)
    return STANDARD.update_weight(w, r, scale)


@hookimpl
def abliterate_strategies() -> list[Strategy]:
    return [replace(STANDARD, name="slow-standard", summary="standard, slowed (a test plugin)",
                    update_weight=_slow_update)]
