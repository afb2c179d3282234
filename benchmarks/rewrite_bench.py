"""Rewrite speed and memory against a plain copy, on synthetic checkpoints; a markdown report.

    python benchmarks/rewrite_bench.py --sizes 4 8 --work /tmp/bench
    python benchmarks/rewrite_bench.py --sizes 4 --work /dev/shm/bench --workers 1 2   # a fast disk
    python benchmarks/rewrite_bench.py --sizes 4 --fused-experts 32                    # gpt-oss-shaped
    python benchmarks/rewrite_bench.py --sizes 2 --fp8                                 # block FP8
    python benchmarks/rewrite_bench.py --sizes 2 --fused-experts 32 --mxfp4            # gpt-oss's MXFP4 experts
    python benchmarks/rewrite_bench.py --sizes 8 --fused-experts 128 --qwen3-moe       # Qwen3-MoE-shaped
    python benchmarks/rewrite_bench.py --sizes 4 8 --cold                              # from the disk
    python benchmarks/rewrite_bench.py --sizes 4 --work /dev/shm/bench --cores 1 2     # scaling with cores

For each size: generate a bf16 checkpoint (Gemma-3-12B-shaped, or gpt-oss-shaped with
``--fused-experts``, Qwen3-MoE-shaped with ``--qwen3-moe`` too; block FP8 with ``--fp8``,
or MXFP4 experts with ``--mxfp4``, whose edits decode, edit and re-encode), and
before each run read it once so that every run finds it equally in the page cache, or with
``--cold`` drop the page cache (root) so that every run reads it from the disk; then time, in one run, ``--repeat`` times in alternating order, each after a sync and a few
seconds' rest (medians: the disk here is shared and noisy, and slows down right after a
large write; use an even ``--repeat`` so that each goes first equally often):

- ``cp -r`` + ``sync``;
- copy: ``rewrite --scale 0`` over every layer, the streaming copy (a tensor planned at
  scale 0 stays in the kernel's copy);
- rewrite: ``rewrite --strategy norm-preserving`` over every layer, each shard fsynced.

Peak RSS is the child's own ru_maxrss (os.wait4), the maximum over repeats. A second table
times the edit of the largest tensors in-process on one torch thread (the rewrite's setting; CPU time)
and gives the bandwidth one core's edits keep up with, and what a 16-core machine (8 workers,
one per two cores) would need from its disk; a third, for disks of 3, 7 and 14 GB/s, how many
cores the edits need and how long each piece's edit may take on one of 16 cores. Prints markdown with the date and machine;
asserts nothing. The work directory is deleted at the end.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import synthetic  # noqa: E402  (torch-free at import)

CORES_16_WORKERS = {False: 8, True: 16}  # what threads.auto_workers picks on 16 cores (quantized: one per core)
DISKS = (3.0, 7.0, 14.0)  # GB/s: a PCIe 3, PCIe 4 and PCIe 5 NVMe drive


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


def drop_caches() -> None:
    """Empty the page cache, so that every run reads its source from the disk."""
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as exc:
        sys.exit(f"--cold needs to write /proc/sys/vm/drop_caches (root): {exc}")


def machine(work: Path) -> str:
    """One line: CPU, usable cores, memory, kernel and the work directory's file system."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    fs = subprocess.run(["df", "--output=fstype", str(work)], capture_output=True, text=True).stdout.split()[-1:]
    return (f"{cpu}, {len(os.sched_getaffinity(0))} usable cores, {mem / 2**30:.0f} GiB RAM, "
            f"Linux {platform.release()}, work dir {work} on {fs[0] if fs else '?'}")


def time_edits(src: Path, repeat: int) -> None:
    """Child: median seconds of the edit of each kind of edited tensor (one expert slice of a
    fused one), one torch thread, as JSON lines {name, shape, pieces, bytes (whole tensor),
    seconds (one piece), layers}."""
    import torch

    from rewriter.engine.coded import CodedEdit
    from rewriter.engine.rewrite import slice_entry
    from rewriter.io.safetensors_io import tensor_from_bytes
    from rewriter.pipeline import prepare
    from rewriter.plan import parse_layer_specs

    torch.set_num_threads(1)
    layers = json.loads((src / "config.json").read_text())["num_hidden_layers"]
    plan = parse_layer_specs((f"0-{layers - 1}:{layers // 2}",), 1.0, {})
    job = prepare(src, None, src.with_suffix(".directions.safetensors"), plan, "norm-preserving")
    seen: set[str] = set()
    for name, edit in job.stored_edits.items():
        kind = name.split(".layers.")[-1].split(".", 1)[-1]
        if kind in seen or (isinstance(edit, CodedEdit) and name != edit.parts[0]):
            continue
        seen.add(kind)
        shape = job.ckpt.entry(name).shape
        piece = edit.piece(0) if edit.slices(shape) > 1 else edit
        part = shape[1:] if piece is not edit else shape
        if isinstance(piece, CodedEdit):  # decode, edit, re-encode, from the stored parts (slice 0 when stacked)
            entries = [slice_entry(job.ckpt.entry(p), 0, edit.slices(shape)) for p in piece.parts]
            parts = {p: tensor_from_bytes(bytearray(job.ckpt.files.read(job.ckpt.shard_of[p], e.start, e.end)), e,
                                          stored=True) for p, e in zip(piece.parts, entries)}
            nbytes = sum(job.ckpt.entry(p).end - job.ckpt.entry(p).start for p in piece.parts)
            # the working copy and the decoded tensor's buffer reused, as the engine's scratch is
            work, decoded = (torch.empty(math.prod(piece.shape), dtype=torch.float32) for _ in range(2))
            times = _timed(lambda: piece.apply(parts, workspace=work, decoded=decoded),  # noqa: B023
                           repeat, time.process_time)
            with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
                pooled = _timed(lambda: piece.apply(parts, pool=pool, workspace=work, decoded=decoded),  # noqa: B023
                                repeat)
        else:
            tensor = (torch.randn(part) * 0.02).to(torch.bfloat16)
            work = torch.empty(tensor.numel(), dtype=torch.float32)
            nbytes = job.ckpt.entry(name).end - job.ckpt.entry(name).start
            times = _timed(lambda: piece.apply(tensor.clone(), torch.float32, in_place=True, workspace=work),  # noqa: B023
                           repeat, time.process_time)
            with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
                pooled = _timed(lambda: piece.apply(tensor.clone(), torch.float32, in_place=True,  # noqa: B023
                                                    workspace=work, pool=pool), repeat)  # noqa: B023
        print(json.dumps({"name": kind + ("[i]" if piece is not edit else ""), "shape": list(part),
                          "pieces": edit.slices(shape), "bytes": nbytes, "seconds": statistics.median(times),
                          "pooled": statistics.median(pooled), "layers": layers}), flush=True)


def _timed(f: Callable[[], object], repeat: int, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Seconds of each of ``repeat`` calls by ``clock``: the process's CPU time for one thread (on a
    shared machine wall time counts the other jobs' share), wall time for several."""
    times = []
    for _ in range(repeat):
        start = clock()
        f()
        times.append(clock() - start)
    return times


def edit_table(src: Path, repeat: int, quantized: bool) -> None:
    """Per-tensor edit times (from a child) and the disk bandwidth at which edits become the limit."""
    child = subprocess.run([sys.executable, __file__, "--time-edits", str(src), "--repeat", str(repeat)],
                           check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]
    layer_bytes = sum(r["bytes"] for r in rows)
    layer_seconds = sum(r["pieces"] * r["seconds"] for r in rows)
    share = rows[0]["layers"] * layer_bytes / sum(p.stat().st_size for p in src.glob("*.safetensors"))
    per_core = layer_bytes / layer_seconds / 1e9
    print(f"\n## Edit math, one torch thread (in-process, medians of {repeat}; one thread: CPU time, "
          "edit threads: wall time)\n")
    cores = len(os.sched_getaffinity(0))
    print(f"| tensor | piece shape | pieces | piece ms | piece GB/s (as stored) | piece ms, {cores} edit threads |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['shape']} | {r['pieces']} | {r['seconds'] * 1e3:.0f} "
              f"| {r['bytes'] / r['pieces'] / r['seconds'] / 1e9:.2f} | {r['pooled'] * 1e3:.0f} |")
    print(f"\nOne layer's edits: {layer_seconds:.2f} s for {layer_bytes / 1e9:.2f} GB on one core "
          f"({per_core:.2f} GB/s); edited tensors are {share:.0%} of the checkpoint, so one core's edits keep up "
          f"with a {per_core / share:.1f} GB/s disk. A 16-core machine ({CORES_16_WORKERS[quantized]} workers, "
          f"enough shards) keeps up with {CORES_16_WORKERS[quantized] * per_core / share:.1f} GB/s, if memory "
          f"bandwidth allows; past that the edit math is the limit.")
    print("\n| disk GB/s | cores the edits need (one thread each) | " +
          " | ".join(f"{r['name']} budget, ms per piece on one of 16 cores" for r in rows) + " |")
    print("|---|---|" + "---|" * len(rows))
    for disk in DISKS:
        # the disk streams a piece's share of the checkpoint in (piece bytes / share) / disk seconds;
        # 16 cores editing side by side may each take 16 times that
        budgets = " | ".join(f"{16 * r['bytes'] / r['pieces'] / share / (disk * 1e9) * 1e3:.0f}" for r in rows)
        print(f"| {disk:g} | {disk * share / per_core:.1f} | {budgets} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=float, nargs="+", default=[4, 8], help="checkpoint sizes in GiB")
    ap.add_argument("--shard-gb", type=float, nargs="+", default=[2.0], help="shard sizes in GiB")
    ap.add_argument("--work", type=Path, default=Path("/tmp/abliterate-bench"),
                    help="source and outputs live here (/dev/shm: a fast disk)")
    ap.add_argument("--cores", nargs="+", default=["all"],
                    help="cores every run may use (taskset -c 0..N-1; the automatic workers and edit threads follow "
                         "the mask), e.g. 1 2 4: how the time scales with cores ('all': no mask)")
    ap.add_argument("--workers", nargs="+", default=["auto"], help="--workers values to time ('auto': the default)")
    ap.add_argument("--edit-threads", nargs="+", default=["auto"],
                    help="--edit-threads values to time with each --workers value ('auto': the default)")
    ap.add_argument("--fused-experts", type=int, default=0, metavar="E", help="gpt-oss layers with E fused experts")
    ap.add_argument("--fp8", action="store_true", help="block-FP8 projections: edits decode, edit and re-encode")
    ap.add_argument("--mxfp4", action="store_true", help="with --fused-experts: MXFP4 experts, as gpt-oss ships them")
    ap.add_argument("--qwen3-moe", action="store_true",
                    help="with --fused-experts: Qwen3-MoE-shaped layers (d_model on axis 1 of the fused down_proj)")
    ap.add_argument("--repeat", type=int, default=2, help="alternating runs of each; medians are printed")
    ap.add_argument("--cold", action="store_true",
                    help="drop the page cache before each run (needs root), as the issue measured, instead of "
                         "reading the source beforehand")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds of rest (after a sync) before each timed run")
    ap.add_argument("--time-edits", type=Path, help=argparse.SUPPRESS)  # the child of the edit-time table
    args = ap.parse_args()
    if args.time_edits:
        time_edits(args.time_edits, args.repeat)
        return
    exe = shutil.which("abliterate") or sys.exit("abliterate is not installed")
    startup, baseline = run([sys.executable, "-c", "import torch, safetensors, tqdm, rewriter.cli"])
    tensor = synthetic.largest_edited_fp32_bytes(args.fused_experts, args.qwen3_moe)
    family = "Qwen3-MoE" if args.qwen3_moe else "gpt-oss"
    shape = f"{family}-shaped, {args.fused_experts} fused experts" if args.fused_experts else "Gemma-3-12B-shaped"
    stored = "block FP8" if args.fp8 else "MXFP4 experts" if args.mxfp4 else "bf16"
    print(f"## Rewrite against `cp -r` + `sync` ({shape} {stored}, every layer edited)\n")
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {machine(args.work.parent)}  ")
    print(f"`{' '.join(sys.argv)}`  ")
    print(f"Python + torch start in {startup:.1f} s and {baseline / 2**20:.0f} MiB (in every rewrite's time); "
          f"largest edited piece in fp32: {tensor / 2**20:.0f} MiB. Medians of {args.repeat}.\n")
    print("| GiB | shard GiB | cores | workers | edit threads | layers | cp s | copy s | copy/cp | rewrite s | rewrite/cp "
          "| MB/s | peak RSS MiB | (RSS-base)/piece |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    src = None
    try:
        for shard_gb in args.shard_gb:
            for size in args.sizes:
                shutil.rmtree(args.work, ignore_errors=True)
                src = args.work / f"src-{size:g}-{shard_gb:g}"
                # generated in a child, so that this process stays small: a child's ru_maxrss
                # counts what it inherited at fork
                made = subprocess.run([sys.executable, str(HERE / "synthetic.py"), str(src), "--gigabytes", str(size),
                                       "--shard-gb", str(shard_gb), "--fused-experts", str(args.fused_experts),
                                       *(["--fp8"] if args.fp8 else []), *(["--mxfp4"] if args.mxfp4 else []),
                                       *(["--qwen3-moe"] if args.qwen3_moe else [])],
                                      check=True, capture_output=True, text=True)
                layers = int(made.stdout.split()[-1])
                directions = src.with_suffix(".directions.safetensors")
                nbytes = sum(p.stat().st_size for p in src.iterdir())
                rewrite = [exe, "rewrite", str(src), str(args.work / "out"), "-d", str(directions), "-q",
                           "--layers", f"0-{layers - 1}:{layers // 2}", "--strategy", "norm-preserving"]
                for cores, workers, threads in itertools.product(args.cores, args.workers, args.edit_threads):
                    extra = [*([] if workers == "auto" else ["--workers", workers]),
                             *([] if threads == "auto" else ["--edit-threads", threads])]
                    mask = [] if cores == "all" else ["taskset", "-c", f"0-{int(cores) - 1}"]
                    runs = {"cp": [*mask, "sh", "-c", f"cp -r '{src}' '{args.work / 'out'}' && sync"],
                            "copy": [*mask, *rewrite, "--scale", "0", *extra], "rewrite": [*mask, *rewrite, *extra]}
                    times: dict[str, list[float]] = {k: [] for k in runs}
                    rss = 0
                    for rep in range(args.repeat):
                        # alternate the order: the virtual disk here slows down right after a large
                        # write, which would otherwise always penalise the same run
                        for which in (list(runs) if rep % 2 == 0 else list(runs)[::-1]):
                            shutil.rmtree(args.work / "out", ignore_errors=True)
                            os.sync()
                            drop_caches() if args.cold else warm(src)
                            time.sleep(args.settle)
                            wall, peak = run(runs[which])
                            times[which].append(wall)
                            if which != "cp":
                                rss = max(rss, peak)
                    cp_s, copy_s, rw_s = (statistics.median(times[k]) for k in runs)
                    print(f"| {size:g} | {shard_gb:g} | {cores} | {workers} | {threads} | {layers} | {cp_s:.1f} | {copy_s:.1f} "
                          f"| {copy_s / cp_s:.2f} | {rw_s:.1f} | {rw_s / cp_s:.2f} | {nbytes / rw_s / 1e6:.0f} "
                          f"| {rss / 2**20:.0f} | {(rss - baseline) / tensor:.2f} |", flush=True)
        assert src is not None
        edit_table(src, max(args.repeat, 5), args.fp8 or args.mxfp4)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
