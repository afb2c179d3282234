"""The whole CPU pipeline on a quantized model against the same pipeline on its bf16 original: the
Qwen2.5-Coder-0.5B-Instruct example converted to DeepSeek's block FP8 by tests/fp8_convert.py
(written from the format's description, not by the project's encoder), every step run by the CLI
as a user runs it, in a process of its own:

1. ``measure --refused-only --max-memory CAP`` on both, streamed: wall time, peak RSS (the child's
   own VmHWM) against the estimate the run prints (the largest layer, the activations), the
   refused count, and the cosine of the directions at every layer;
2. ``analyze --suggest-plan`` on both: the plans;
3. ``rewrite`` (block FP8 stays block FP8) and ``verify``;
4. ``evaluate --original`` on the held-out halves: refusals by generation, the refusal score,
   first-token KL. Answers saved beside (``--save``) for reading.

    python benchmarks/quantized_pipeline.py --work /tmp/qpipe [--cap 1GB] [--max-new-tokens 64]

Prints markdown with the date; asserts nothing. The work folder is kept (answers to read).
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEAK = ("import atexit, re, sys; atexit.register(lambda: print('peak-rss-kib', re.search(r'VmHWM:\\s+(\\d+)', "
        "open('/proc/self/status').read())[1], file=sys.stderr)); from rewriter.cli import main; main()")


def cli(*args: str) -> tuple[float, int, str, str]:
    """(wall seconds, peak RSS bytes, stdout, stderr) of one abliterate command in a child process."""
    start = time.monotonic()
    run = subprocess.run([sys.executable, "-c", PEAK, *args], capture_output=True, text=True, check=False)
    wall = time.monotonic() - start
    if run.returncode != 0:
        raise SystemExit(f"abliterate {' '.join(args)} failed:\n{run.stderr[-3000:]}")
    peak = int(run.stderr.split("peak-rss-kib")[-1].split()[0]) * 1024
    return wall, peak, run.stdout, run.stderr


def pipeline(name: str, model: Path, work: Path, cap: str, max_new_tokens: int) -> dict:
    """Every step on ``model`` into ``work/name``; the figures of each."""
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    row: dict = {"name": name}
    directions = out / "directions.safetensors"
    wall, peak, _, err = cli("measure", str(model), "-o", str(directions), "--refused-only", "--max-memory", cap, "-q")
    largest = re.search(r"the largest: ([0-9.]+ [KMG]?B)", err)
    activations = re.search(r"activations ([0-9.]+ [KMG]?B)", err)
    refused = re.search(r"refuses (\d+) of the (\d+)", err)
    row["measure"] = {"seconds": round(wall, 1), "peak_rss_mb": round(peak / 1e6), "streamed": "streaming the weights" in err,
                      "largest_layer": largest[1] if largest else "?", "activations": activations[1] if activations else "?",
                      "refused": f"{refused[1]}/{refused[2]}" if refused else "?"}
    plan = out / "plan.yml"
    cli("analyze", str(directions), "--suggest-plan", str(plan))
    row["plan"] = plan.read_text()
    rewritten = out / "model"
    wall, peak, _, _ = cli("rewrite", str(model), str(rewritten), "-d", str(directions), "--plan", str(plan),
                           "--strategy", "norm-preserving", "--overwrite", "-q")
    row["rewrite"] = {"seconds": round(wall, 1), "peak_rss_mb": round(peak / 1e6)}
    _, _, verified, _ = cli("verify", str(model), str(rewritten), "-q")
    row["verified"] = "verified" in verified.lower()
    wall, _, report, _ = cli("evaluate", str(rewritten), "--original", str(model), "--max-new-tokens", str(max_new_tokens),
                             "--save", str(out / "answers.jsonl"), "--json", "-q")
    row["evaluate"] = {"seconds": round(wall, 1), **json.loads(report)}
    row["directions"] = directions
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--cap", default="1GB")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    import torch

    from rewriter.directions import Measurements
    from rewriter.lab.example_models import example_model
    from tests.fp8_convert import convert

    bf16 = example_model("qwen2.5-coder-0.5b-instruct")
    fp8 = args.work / "source-fp8"
    if not (fp8 / "model.safetensors.index.json").is_file():
        convert(bf16, fp8, "block")
    rows = [pipeline("bf16", bf16, args.work, args.cap, args.max_new_tokens),
            pipeline("block FP8", fp8, args.work, args.cap, args.max_new_tokens)]
    a, b = (Measurements.load(r["directions"]) for r in rows)
    cos = [float(torch.nn.functional.cosine_similarity(a.direction(n), b.direction(n), dim=0)) for n in a.layers if n]
    print(f"# Quantized pipeline, {datetime.date.today()} (Qwen2.5-Coder-0.5B-Instruct; block FP8 by tests/fp8_convert.py)\n")
    print(f"measure --refused-only --max-memory {args.cap}, streamed; evaluate on the held-out halves, "
          f"{args.max_new_tokens} new tokens.\n")
    print("| source | measure s | peak RSS MB | streamed | largest layer | activations | refused | rewrite s | verified "
          "| refusals | refusal score | KL |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---|---:|---:|---:|")
    for r in rows:
        m, e = r["measure"], r["evaluate"]
        print(f"| {r['name']} | {m['seconds']} | {m['peak_rss_mb']} | {m['streamed']} | {m['largest_layer']} | "
              f"{m['activations']} | {m['refused']} | {r['rewrite']['seconds']} | {r['verified']} | "
              f"{e['refusals']}/{e['prompts']} | {e['refusal_score']:+.3f} | {e['kl']:.4f} |")
    print(f"\ncos(direction bf16, direction FP8) over layers 1-{len(cos)}: min {min(cos):.4f}, "
          f"median {sorted(cos)[len(cos) // 2]:.4f}")
    for r in rows:
        print(f"\nplan from {r['name']}:\n```yaml\n{r['plan']}```")


if __name__ == "__main__":
    main()
