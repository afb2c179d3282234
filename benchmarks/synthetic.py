"""Synthetic checkpoints with realistic shapes (Gemma-3-12B widths by default), for benchmarks.

    python benchmarks/synthetic.py OUT --gigabytes 2 --shard-gb 1

writes OUT and OUT.directions.safetensors and prints the layer count.

Tensor contents are random but reused per shape: timing and memory do not depend on them.
"""
from __future__ import annotations

import argparse
import json
import math
import struct
from pathlib import Path

D_MODEL, D_FF, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 3840, 15360, 16, 8, 256, 32768


def layer_shapes(d: int = D_MODEL, ff: int = D_FF) -> dict[str, tuple[int, ...]]:
    return {
        "input_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (HEADS * HEAD_DIM, d),
        "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, d),
        "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, d),
        "self_attn.o_proj.weight": (d, HEADS * HEAD_DIM),
        "self_attn.q_norm.weight": (HEAD_DIM,),
        "self_attn.k_norm.weight": (HEAD_DIM,),
        "post_attention_layernorm.weight": (d,),
        "pre_feedforward_layernorm.weight": (d,),
        "mlp.gate_proj.weight": (ff, d),
        "mlp.up_proj.weight": (ff, d),
        "mlp.down_proj.weight": (d, ff),
        "post_feedforward_layernorm.weight": (d,),
    }


def layer_bytes() -> int:
    return sum(2 * math.prod(s) for s in layer_shapes().values())


def largest_edited_fp32_bytes() -> int:
    return 4 * D_MODEL * max(D_FF, HEADS * HEAD_DIM)


def make(out: Path, layers: int, shard_bytes: int, seed: int = 0) -> Path:
    """Write a gemma3_text-shaped bf16 checkpoint, one shard in memory at a time."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    pool: dict[tuple[int, ...], "torch.Tensor"] = {}

    def tensor(shape: tuple[int, ...]) -> "torch.Tensor":
        if shape not in pool:
            pool[shape] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        return pool[shape]

    items = [("model.embed_tokens.weight", (VOCAB, D_MODEL))]
    items += [(f"model.layers.{i}.{k}", s) for i in range(layers) for k, s in layer_shapes().items()]
    items.append(("model.norm.weight", (D_MODEL,)))
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in items:
        nbytes = 2 * math.prod(shape)
        if size and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(out / fname, [(n, tensor(s)) for n, s in shard])
        weight_map.update(dict.fromkeys((n for n, _ in shard), fname))
    total = sum(2 * math.prod(s) for _, s in items)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps({
        "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "hidden_size": D_MODEL,
        "intermediate_size": D_FF, "num_hidden_layers": layers, "torch_dtype": "bfloat16",
    }))
    return out


def _write_safetensors(path: Path, tensors: list) -> None:
    """A bf16 safetensors file written tensor by tensor (the pool's tensors repeat, so no dict of them)."""
    import torch

    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, t in tensors:
        header[name] = {"dtype": "BF16", "shape": list(t.shape), "data_offsets": [pos, pos + 2 * t.numel()]}
        pos += 2 * t.numel()
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, t in tensors:
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def directions(path: Path, layers: int, seed: int = 1) -> Path:
    import torch

    from rewriter.directions import Measurements

    g = torch.Generator().manual_seed(seed)
    harmless = {n: torch.randn(D_MODEL, generator=g, dtype=torch.float64) for n in range(layers)}
    harmful = {n: harmless[n] + torch.randn(D_MODEL, generator=g, dtype=torch.float64) for n in range(layers)}
    Measurements(harmful, harmless, 1, 1, {"model": "synthetic"}).save(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--gigabytes", type=float, default=1.0, help="size in GiB (whole layers)")
    ap.add_argument("--shard-gb", type=float, default=2.0)
    args = ap.parse_args()
    layers = max(1, round(args.gigabytes * 2**30 / layer_bytes()))
    make(args.out, layers, int(args.shard_gb * 2**30))
    directions(args.out.with_suffix(".directions.safetensors"), layers)
    print(layers)


if __name__ == "__main__":
    main()
