"""Peak memory of rewriting one fused expert tensor: bounded by an expert slice, not the tensor.

    python benchmarks/fused_expert_memory.py --work /tmp/fused-bench [--experts 128] [--compare-whole]

Writes a one-layer gpt-oss-shaped bf16 checkpoint whose ``mlp.experts.down_proj`` is
``[E, 2880, 2880]`` (gpt-oss-120b's own shape; 2.1 GB at E = 128), streamed to disk one
expert at a time, then runs ``abliterate rewrite`` on layer 0 in a child process and
reports its peak RSS (``os.wait4`` ru_maxrss). ``--compare-whole`` runs it once more with
the tensor edited whole, as before slicing (needs about 3x the tensor in RAM). The work
directory is deleted at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

D = 2880  # gpt-oss hidden size and expert width: the shape cannot tell the residual axis

# The child: a rewrite, optionally with stacked edits applied whole (the behaviour before slicing).
CHILD = """
import sys
from rewriter.engine.edit import TensorEdit
if sys.argv.pop(1) == "whole":
    TensorEdit.slices = lambda self, shape: 1
from rewriter.cli import main
main()
"""


def write_checkpoint(root: Path, experts: int) -> int:
    """A gpt_oss checkpoint with the writers of layer 0 only; returns the fused tensor's bytes."""
    import torch

    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({
        "model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "hidden_size": D, "intermediate_size": D,
        "num_hidden_layers": 1, "num_local_experts": experts, "torch_dtype": "bfloat16"}))
    g = torch.Generator().manual_seed(0)
    slice_ = (torch.randn(D, D, generator=g) * 0.02).to(torch.bfloat16)
    small = {
        "model.layers.0.self_attn.o_proj.weight": (torch.randn(D, 4096, generator=g) * 0.02).to(torch.bfloat16),
        "model.layers.0.mlp.experts.down_proj_bias": torch.zeros(experts, D, dtype=torch.bfloat16),
    }
    fused = "model.layers.0.mlp.experts.down_proj"
    fused_bytes = experts * slice_.numel() * 2
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, t in small.items():
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [offset, offset + t.numel() * 2]}
        offset += t.numel() * 2
    header[fused] = {"dtype": "BF16", "shape": [experts, D, D], "data_offsets": [offset, offset + fused_bytes]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(root / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in small.values():
            f.write(t.view(torch.uint8).numpy().tobytes())
        for _ in range(experts):
            f.write(slice_.view(torch.uint8).numpy().tobytes())
    return fused_bytes


def rewrite(root: Path, mode: str) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of a child rewriting layer 0."""
    out = root.parent / f"out-{mode}"
    cmd = [sys.executable, "-c", CHILD, mode, "rewrite", str(root), str(out), "-d", str(root.parent / "d.safetensors"),
           "--layers", "0:0", "-q"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"rewrite ({mode}) failed")
    seconds = time.monotonic() - start
    shutil.rmtree(out)
    return seconds, usage.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fused-expert-bench"))
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--compare-whole", action="store_true", help="also edit the tensor whole (needs ~3x its size)")
    args = ap.parse_args()
    if args.work.exists():
        raise SystemExit(f"{args.work} exists; give another --work")
    try:
        from rewriter.archcheck import random_measurements

        fused = write_checkpoint(args.work / "ckpt", args.experts)
        random_measurements(D, 1).save(args.work / "d.safetensors")
        slice_bytes = fused // args.experts
        print(f"fused down_proj [{args.experts}, {D}, {D}] bf16: {fused / 1e9:.2f} GB ({fused / 2**30:.2f} GiB); one expert slice "
              f"{slice_bytes / 2**20:.1f} MiB bf16, {2 * slice_bytes / 2**20:.1f} MiB fp32")
        for mode in ("sliced", *(["whole"] if args.compare_whole else [])):
            seconds, rss = rewrite(args.work / "ckpt", mode)
            print(f"{mode:>7}: peak RSS {rss / 2**20:,.0f} MiB ({rss / fused:.2f}x the tensor), {seconds:.1f} s")
    finally:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
