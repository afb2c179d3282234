"""Test plugin: the 'standard' strategy under the name 'slow-standard', a tenth of a second slower
per edited matrix, so that a trial takes long enough for every worker of a shared study to start
before the others have finished all of it (a tiny model's trial takes milliseconds). With
``ABLITERATE_TEST_WORKERS`` set to N, each worker's first slowed edit also waits (a minute at
most) until N workers have begun one: on a loaded machine one worker still finished all 12
trials before the other had started (seen once in CI)."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from rewriter.hookspecs import hookimpl
from rewriter.plugins.strategies import BUILTIN
from rewriter.strategy import Strategy

STANDARD = next(s for s in BUILTIN if s.name == "standard")


_begun = threading.Lock()
_waited = False


def _wait_for_the_other_workers() -> None:
    """Mark this worker as begun (a file in the working directory, which the workers share) and
    wait until ``ABLITERATE_TEST_WORKERS`` have, once per process."""
    global _waited
    wanted = int(os.environ.get("ABLITERATE_TEST_WORKERS", "0"))
    with _begun:
        if _waited or wanted < 2:
            return
        _waited = True
        Path(f"slow-worker-{os.getpid()}").touch()
        deadline = time.monotonic() + 60
        while len(list(Path().glob("slow-worker-*"))) < wanted and time.monotonic() < deadline:
            time.sleep(0.05)


def _slow_update(w: torch.Tensor, r: torch.Tensor, scale: float) -> tuple[torch.Tensor, int]:
    _wait_for_the_other_workers()
    time.sleep(0.1)
    return STANDARD.update_weight(w, r, scale)


@hookimpl
def abliterate_strategies() -> list[Strategy]:
    return [replace(STANDARD, name="slow-standard", summary="standard, slowed (a test plugin)",
                    update_weight=_slow_update)]
