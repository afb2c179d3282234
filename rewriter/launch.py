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
"""
from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

from rewriter.engine.threads import available_memory  # torch-free, as all this module loads

PREFETCH_BYTES = 1 << 30  # about what a disk reads while torch loads (at most: see above)
HINT_BYTES = 8 << 20  # per call: Linux acts on about one read-ahead window of each hint (8 MiB here)


def main() -> None:
    """``abliterate``."""
    _hint(sys.argv[2:] if sys.argv[1:2] == ["rewrite"] else [])
    from rewriter.cli import main as cli

    cli()


def rewrite_main() -> None:
    """``rewrite``: the same command as ``abliterate rewrite``."""
    _hint(sys.argv[1:])
    from rewriter.cli import rewrite_main as cli

    cli()


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
