"""The layer-streamed measurement under a memory cap: its numbers against the whole model's, its
peak RSS against the cap, and its time per layer against the disk read time of a layer.

    python benchmarks/streamed_measure_bench.py qwen [--cap 1GB] [--prompts 8]
    python benchmarks/streamed_measure_bench.py synthetic [--gigabytes 6] [--cap 2GB] [--prompts 16]

qwen: Qwen2.5-Coder-0.5B-Instruct measured streamed (in a child process, so that its peak RSS is
its own) and whole (in this one); prints the largest difference of the means and whether the
analysis tables are the same.

synthetic: a Gemma-3-12B-shaped bf16 checkpoint of GIGABYTES (benchmarks/synthetic.py) with a
tiny tokenizer, evicted from the page cache, measured streamed in a child under the cap; then one
layer's tensors are read cold, as the streamed pass reads them, for the disk's time per layer.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def prompts(kind: str, n: int, synthetic: bool) -> list[str]:
    if synthetic:  # the tiny tokenizer's words
        offset = 0 if kind == "harmful" else 40
        return [" ".join(f"w{(offset + i * 7 + j) % 100}" for j in range(6 + i % 5)) for i in range(n)]
    from rewriter.lab.prompts import default_prompts

    return default_prompts(f"{kind}-measure")[:n]


def child(model: str, cap: str, n: int, batch_size: int, synthetic: bool, out: Path) -> None:
    """The streamed measurement, as measure runs it; means and per-layer figures to ``out``."""
    import torch

    from rewriter.lab.memory import parse_size, peak_rss_bytes
    from rewriter.lab.streamed import StreamStats, streamed_if_needed, streamed_means

    sm = streamed_if_needed(model, "float32", parse_size(cap), log=lambda s: print(s, flush=True))
    assert sm is not None, "the cap should make the model stream"
    stats = StreamStats()
    sets = [prompts("harmful", n, synthetic), prompts("harmless", n, synthetic)]
    means = [mean for mean, _ in streamed_means(sm, sets, batch_size=batch_size, q=0.995, chat_template=True,
                                                system_prompt=None, progress=False,
                                                log=lambda s: print(s, flush=True), stats=stats)]
    torch.save({"means": means, "layers": stats.layers, "peak": peak_rss_bytes(), "seconds": stats.seconds}, out)


def run_child(args: argparse.Namespace, model: Path, synthetic: bool) -> dict:
    out = Path(tempfile.mkdtemp()) / "child.pt"
    cmd = [sys.executable, __file__, "--child", str(model), "--cap", args.cap, "--prompts", str(args.prompts),
           "--batch-size", str(args.batch_size), "--out", str(out)] + (["--synthetic"] if synthetic else [])
    start = time.monotonic()
    subprocess.run(cmd, check=True)
    import torch

    result = torch.load(out)
    result["wall"] = time.monotonic() - start
    result["child_maxrss"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return result


def qwen(args: argparse.Namespace) -> None:
    import torch

    from rewriter.directions import Measurements
    from rewriter.lab.analyze import layer_metrics, table
    from rewriter.lab.example_models import example_model
    from rewriter.lab.measure import measure
    from rewriter.lab.memory import human, parse_size

    model = example_model("qwen2.5-coder-0.5b-instruct")
    streamed = run_child(args, model, synthetic=False)
    start = time.monotonic()
    whole = measure(model, prompts("harmful", args.prompts, False), prompts("harmless", args.prompts, False),
                    batch_size=args.batch_size, progress=False)
    whole_s = time.monotonic() - start
    wholes = [torch.stack([d[n] for n in sorted(d)]) for d in (whole.harmful, whole.harmless)]
    diff = max(float((a - b).abs().max()) for a, b in zip(streamed["means"], wholes))
    layers = range(len(whole.layers))
    as_file = Measurements({n: streamed["means"][0][n] for n in layers}, {n: streamed["means"][1][n] for n in layers},
                           args.prompts, args.prompts, {})
    same_table = list(table(layer_metrics(as_file))) == list(table(layer_metrics(whole)))
    cap = parse_size(args.cap)
    print(f"qwen2.5-coder-0.5b-instruct, {args.prompts} + {args.prompts} prompts, batch {args.batch_size}, float32:")
    print(f"  streamed: {streamed['wall']:.1f} s (child, start-up included), peak RSS {human(streamed['child_maxrss'])} "
          f"under a cap of {human(cap)}: {'yes' if streamed['child_maxrss'] < cap else 'NO'}")
    print(f"  whole model: {whole_s:.1f} s (load included)")
    print(f"  max |streamed - whole| over the means: {diff:.3g}; same analysis table: {same_table}")


def evict(paths: list[Path]) -> None:
    """Drop the files from the page cache, so that reads hit the disk."""
    for p in paths:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def cold_layer_read(model: Path, layer: int) -> tuple[float, int]:
    """Seconds and bytes to read one layer's tensors from the disk, tensor by tensor."""
    from rewriter.io.checkpoint import Checkpoint
    from rewriter.lab.weights import WeightReader

    ckpt = Checkpoint.open(model)
    evict([s.path for s in ckpt.shards])
    reader = WeightReader(ckpt)
    for name in sorted(n for n in ckpt.names if n.startswith(f"model.layers.{layer}.")):
        reader.read(name)
    reader.close()
    return reader.seconds, reader.bytes_read


def synthetic_run(args: argparse.Namespace) -> None:
    import synthetic

    from rewriter.lab.memory import human, parse_size
    from tests.helpers import tiny_tokenizer

    root = Path(tempfile.mkdtemp(prefix="streamed-bench-"))
    model = root / "model"
    layers = max(1, round(args.gigabytes * 1e9 / synthetic.layer_bytes()))
    start = time.monotonic()
    synthetic.make(model, layers, 2 * 2**30)
    config = json.loads((model / "config.json").read_text())
    config.update(num_attention_heads=synthetic.HEADS, num_key_value_heads=synthetic.KV_HEADS,
                  head_dim=synthetic.HEAD_DIM, vocab_size=synthetic.VOCAB)
    (model / "config.json").write_text(json.dumps(config))
    tiny_tokenizer(model)
    shards = sorted(model.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards)
    print(f"wrote {human(size)} ({layers} layers of {human(synthetic.layer_bytes())} bf16) in {time.monotonic() - start:.0f} s")
    try:
        evict(shards)
        result = run_child(args, model, synthetic=True)
        per_layer = result["layers"]
        total = [t for _, t, _ in per_layer]
        waiting = [r for r, _, _ in per_layer]
        cold = [cold_layer_read(model, k) for k in (1, layers // 2)]
        cold_s = sum(s for s, _ in cold) / len(cold)
        cold_rate = sum(b for _, b in cold) / sum(s for s, _ in cold)
        cap = parse_size(args.cap)
        mean_total = sum(total) / len(total)
        print(f"synthetic {human(size)} bf16, cap {human(cap)}, {args.prompts} + {args.prompts} prompts, float32:")
        print(f"  peak RSS {human(result['child_maxrss'])} (under the cap: {'yes' if result['child_maxrss'] < cap else 'NO'}); "
              f"streamed pass {result['seconds']:.1f} s, child {result['wall']:.1f} s")
        print(f"  per layer: {mean_total:.2f} s (min {min(total):.2f}, max {max(total):.2f}), of which waiting for reads "
              f"{sum(waiting) / len(waiting):.2f} s")
        print(f"  one layer read cold from the disk: {cold_s:.2f} s ({human(cold_rate)}/s); "
              f"time per layer / disk read time = {mean_total / cold_s:.2f}")
    finally:
        import shutil

        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["qwen", "synthetic"], nargs="?")
    ap.add_argument("--cap", default=None, help="--max-memory for the streamed run (default 1GB for qwen, 2GB synthetic)")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per set (default 8 for qwen, 16 synthetic)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--gigabytes", type=float, default=6.0)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--synthetic", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(str(args.child), args.cap, args.prompts, args.batch_size, args.synthetic, args.out)
        return
    synthetic = args.what == "synthetic"
    args.cap = args.cap or ("2GB" if synthetic else "1GB")
    args.prompts = args.prompts or (16 if synthetic else 8)
    (synthetic_run if synthetic else qwen)(args)


if __name__ == "__main__":
    main()
