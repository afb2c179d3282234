"""Rewrite speed and memory against a plain copy, on synthetic checkpoints of growing size.

    python benchmarks/rewrite_bench.py --sizes 1 2 4 8 --shard-gb 2 --work /tmp/bench

For each size: generate a Gemma-3-12B-shaped bf16 checkpoint, read it once so that both
runs find it equally in the page cache, then time `cp -r` + `sync` and
`rewrite --strategy norm-preserving` over every layer (which fsyncs each shard), in one
run, ``--repeat`` times in alternating order, each after a sync and a few seconds' rest
(medians: the disk here is shared and noisy, and slows down right after a large write;
use an even ``--repeat`` so that each goes first equally often). Peak RSS is the child's
own ru_maxrss (os.wait4), the maximum over repeats. Prints a table; asserts nothing.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import synthetic  # noqa: E402  (torch-free at import)


def run(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return wall, usage.ru_maxrss * 1024


def warm(path: Path) -> None:
    for p in path.iterdir():
        with open(p, "rb") as f:
            while f.read(64 << 20):
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1, 2, 4, 8], help="checkpoint sizes in GiB")
    ap.add_argument("--shard-gb", type=float, nargs="+", default=[2.0], help="shard sizes in GiB (a memory-scaling table)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/abliterate-bench"))
    ap.add_argument("--workers", type=int, nargs="+", default=[1], help="--workers values to time")
    ap.add_argument("--repeat", type=int, default=2, help="alternating runs of each; medians are printed")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds of rest (after a sync) before each timed run")
    args = ap.parse_args()
    exe = shutil.which("abliterate") or sys.exit("abliterate is not installed")
    startup, baseline = run([sys.executable, "-c", "import torch, safetensors, tqdm, rewriter.cli"])
    tensor = synthetic.largest_edited_fp32_bytes()
    print(f"baseline (python + torch + libraries): {baseline / 2**20:.0f} MiB RSS, {startup:.1f} s to start; "
          f"largest edited tensor in fp32: {tensor / 2**20:.0f} MiB")
    print(f"{'size GiB':>8} {'shard GiB':>9} {'workers':>7} {'layers':>6} {'cp s':>7} {'rewrite s':>9} "
          f"{'ratio':>6} {'MB/s':>6} {'peak RSS MiB':>12} {'(RSS-base)/tensor':>17}")
    for shard_gb in args.shard_gb:
        for size in args.sizes:
            src = args.work / f"src-{size:g}-{shard_gb:g}"
            shutil.rmtree(args.work, ignore_errors=True)
            # generated in a child, so that this process stays small: a child's ru_maxrss
            # counts what it inherited at fork
            made = subprocess.run([sys.executable, str(HERE / "synthetic.py"), str(src), "--gigabytes", str(size),
                                   "--shard-gb", str(shard_gb)], check=True, capture_output=True, text=True)
            layers = int(made.stdout.split()[-1])
            directions = src.with_suffix(".directions.safetensors")
            nbytes = sum(p.stat().st_size for p in src.iterdir())
            for workers in args.workers:
                cps, rws, rss = [], [], 0
                for rep in range(args.repeat):
                    for p in ("copy", "out"):
                        shutil.rmtree(args.work / p, ignore_errors=True)
                    # alternate which runs first: the virtual disk here slows down right after a
                    # large write, which would otherwise always penalise the second run
                    order = ("cp", "rw") if rep % 2 == 0 else ("rw", "cp")
                    for which in order:
                        warm(src)
                        os.sync()
                        time.sleep(args.settle)
                        if which == "cp":
                            cps.append(run(["sh", "-c", f"cp -r '{src}' '{args.work / 'copy'}' && sync"])[0])
                            continue
                        wall, peak = run([exe, "rewrite", str(src), str(args.work / "out"), "-d", str(directions), "-q",
                                          "--layers", f"0-{layers - 1}:{layers // 2}", "--strategy", "norm-preserving",
                                          "--workers", str(workers)])
                        rws.append(wall)
                        rss = max(rss, peak)
                cp_s, rw_s = statistics.median(cps), statistics.median(rws)
                print(f"{size:>8g} {shard_gb:>9g} {workers:>7} {layers:>6} {cp_s:>7.1f} {rw_s:>9.1f} {rw_s / cp_s:>6.2f} "
                      f"{nbytes / rw_s / 1e6:>6.0f} {rss / 2**20:>12.0f} {(rss - baseline) / tensor:>17.2f}", flush=True)
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
