"""The console scripts: they ask the kernel to start reading a rewrite's source before
Python loads torch.

Loading torch takes 1-2 s, longer than ``cp`` needs for a gigabyte. On a cold page cache
the disk would sit idle meanwhile, so the head of the source shards is handed to the
kernel's read-ahead first (``posix_fadvise(WILLNEED)``: asynchronous, nothing is read into
this process) and the rewrite later finds those bytes in memory. About what the disk reads
during start-up, and never more than a quarter of the memory available: hinting further
ahead made the copy slower, not faster (cold 8 GiB, medians of 4 on a noisy disk: 1.30x
``cp`` with 1 GiB hinted, 1.46x with 2 GiB, 1.52x with 4 GiB). Only a hint: SOURCE is
guessed from the command line without parsing it, and anything unexpected (no such
directory, no shards, a platform without fadvise) means no hint; the rewrite itself
checks and reports everything.

They also end the process without Python's teardown once torch is loaded (``finish``).
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from rewriter.engine.threads import available_memory  # torch-free, as all this module loads

PREFETCH_BYTES = 1 << 30  # about what a disk reads while torch loads (at most: see above)
HINT_BYTES = 8 << 20  # per call: Linux acts on about one read-ahead window of each hint (8 MiB here)


def main() -> None:
    """``abliterate``."""
    _hint(sys.argv[2:] if sys.argv[1:2] == ["rewrite"] else [])
    from rewriter.cli import main as cli

    finish(cli)


def rewrite_main() -> None:
    """``rewrite``: the same command as ``abliterate rewrite``."""
    _hint(sys.argv[1:])
    from rewriter.cli import rewrite_main as cli

    finish(cli)


def finish(command: Callable[[], object]) -> NoReturn:
    """Run a console command (click's, which ends in SystemExit) and exit with its status.

    Once torch is loaded, Python's own exit spends 0.4-0.5 s here tearing down its thousands
    of modules and objects (a collection over all of them, then each module's dict), after
    every command that touched a tensor. So this does what that exit does that matters (waits
    for the threads that are not daemons, runs the atexit functions, flushes stdout and
    stderr) and then ends the process at once. Every file the commands write is closed
    (and the rewrite's fsynced) before they return; a command that never loaded torch
    exits the usual way."""
    try:
        command()
        status: str | int | None = 0
    except SystemExit as done:
        status = done.code
    if "torch" not in sys.modules:
        sys.exit(status)
    code = _exit_code(status)
    shutdown = getattr(threading, "_shutdown", None)  # what Python's exit runs first (CPython 3.10-3.13)
    if shutdown is not None:
        shutdown()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        if stream is None or stream.closed:
            continue
        try:
            stream.flush()
        except OSError:  # a closed pipe: Python's exit says 120 then
            code = 120
    os._exit(code)


def _exit_code(status: str | int | None) -> int:
    """The exit status Python gives ``SystemExit(status)``: a message is printed and gives 1."""
    if status is None:
        return 0
    if isinstance(status, int):
        return status & 0xFF
    print(status, file=sys.stderr)
    return 1


def _hint(args: list[str]) -> None:
    source = next((Path(a) for a in args if not a.startswith("-") and Path(a).is_dir()), None)
    if source is not None and hasattr(os, "posix_fadvise"):
        threading.Thread(target=prefetch, args=(source,), daemon=True).start()


def prefetch(source: Path, budget: int | None = None) -> int:
    """Ask the kernel to read up to ``budget`` bytes of ``source``'s shards, in rewrite order
    (None: ``PREFETCH_BYTES`` or a quarter of the memory available, the smaller); returns the
    bytes asked for."""
    if budget is None:
        budget = min(PREFETCH_BYTES, (available_memory() or 0) // 4)
    asked = 0
    try:
        for shard in sorted(p for p in source.glob("*.safetensors") if p.is_file()):
            if asked >= budget:
                break
            size = min(shard.stat().st_size, budget - asked)
            fd = os.open(shard, os.O_RDONLY)
            try:
                for start in range(0, size, HINT_BYTES):
                    os.posix_fadvise(fd, start, min(HINT_BYTES, size - start), os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
            asked += size
    except OSError:
        pass  # a hint only: the rewrite reports what is wrong with SOURCE
    return asked
