"""Test plugin: 'norm-preserving' that SIGKILLs its own process after N edits, to leave a half-written shard.

Used with '-p no:strategies -p tests.killer_plugin', so the fingerprint matches a normal run.
Shards are committed on a background thread, so before dying it waits until the manifest
named by KILL_AFTER_FINISHED records a finished shard.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch

from rewriter.hookspecs import hookimpl
from rewriter.plugins.strategies import biprojected_direction, norm_preserving, subtractive
from rewriter.strategy import Strategy

_calls = 0


def _dying_update(w: torch.Tensor, r: torch.Tensor, scale: float) -> tuple[torch.Tensor, int]:
    global _calls
    _calls += 1
    if _calls > int(os.environ["KILL_AFTER_EDITS"]):
        manifest = Path(os.environ["KILL_AFTER_FINISHED"])
        deadline = time.monotonic() + 60
        while not json.loads(manifest.read_text())["shards"] and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
    return norm_preserving(w, r, scale)


@hookimpl
def abliterate_strategies() -> list[Strategy]:
    return [Strategy("norm-preserving", "dies mid-run", biprojected_direction, _dying_update, subtractive)]
