"""What the size of each ``pwrite`` call costs: system time to write the same bytes in calls of each size.

    python benchmarks/write_size.py [--folder /tmp] [--megabytes 512] [--repeat 3] [--pause 3]

Writes ``--megabytes`` from one 64 MiB buffer (touched first) to a new file in ``--folder``,
in calls of 64 KiB to 8 MiB, each size ``--repeat`` times, sleeping ``--pause`` seconds before
each write so that memory freed by the last one has been handed back, as it would be between
the tensors of a rewrite. Prints markdown (wall and system seconds per size, each run) with the
date and machine; asserts nothing. ``rewriter.io.shard_writer._WRITE`` was chosen from it.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import time
from pathlib import Path

SIZES = [64 << 10, 256 << 10, 1 << 20, 2 << 20, 8 << 20]
BUFFER = 64 << 20


def system_seconds() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def write(path: Path, buffer: memoryview, total: int, size: int) -> tuple[float, float]:
    """Wall and system seconds to write ``total`` bytes of ``buffer`` to ``path`` in calls of ``size``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    wall, system = time.perf_counter(), system_seconds()
    try:
        offset = 0
        while offset < total:
            at = offset % len(buffer)
            offset += os.pwrite(fd, buffer[at : at + min(size, total - offset)], offset)
        return time.perf_counter() - wall, system_seconds() - system
    finally:
        os.close(fd)
        path.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", type=Path, default=Path("/tmp"))
    ap.add_argument("--megabytes", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--pause", type=float, default=3.0)
    args = ap.parse_args()
    buffer = bytearray(os.urandom(1 << 20) * (BUFFER >> 20))
    path = args.folder / f"write-size-{os.getpid()}.bin"
    runs: dict[int, list[tuple[float, float]]] = {size: [] for size in SIZES}
    for _ in range(args.repeat):
        for size in SIZES:  # sizes interleaved: a change in the machine's load touches them all
            time.sleep(args.pause)
            runs[size].append(write(path, memoryview(buffer), args.megabytes << 20, size))
    print(f"{datetime.date.today()}, {platform.node()}, {platform.release()}, {os.cpu_count()} CPUs; "
          f"{args.megabytes} MiB to {args.folder}, {args.pause} s pause before each write\n")
    print("| bytes per call | wall s | system s |\n| --- | --- | --- |")
    for size, times in runs.items():
        walls, systems = (", ".join(f"{t[i]:.2f}" for t in times) for i in (0, 1))
        print(f"| {size >> 10} KiB | {walls} | {systems} |")


if __name__ == "__main__":
    main()
