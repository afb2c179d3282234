"""Synthetic checkpoints with realistic shapes (Gemma-3-12B widths by default), for benchmarks.

    python benchmarks/synthetic.py OUT --gigabytes 2 --shard-gb 1 [--fused-experts 32 [--mxfp4 | --qwen3-moe] | --fp8]

writes OUT and OUT.directions.safetensors and prints the layer count. ``--fused-experts E``
writes gpt-oss-shaped layers instead (hidden size 2880, fused ``mlp.experts.down_proj``
``[E, 2880, 2880]`` edited slice by slice, ``gate_up_proj`` ``[E, 2880, 5760]`` copied).
``--fp8`` stores every projection as block FP8 (float8_e4m3fn with a float32
``weight_scale_inv`` per 128 x 128 block, ``quant_method: fp8``), as DeepSeek-V3 does.
``--mxfp4`` with ``--fused-experts`` stores the experts as gpt-oss ships them: MXFP4
``_blocks`` (uint8 [E, rows, groups, 16]) and ``_scales`` (one e8m0 exponent per group of 32).
``--qwen3-moe`` with ``--fused-experts`` writes Qwen3-MoE-30B-A3B-shaped layers instead, whose
fused ``down_proj`` ``[E, 2048, 768]`` holds d_model on axis 1 (the other orientation).

Tensor contents are random but reused per shape: timing and memory do not depend on them.
"""
from __future__ import annotations

import argparse
import json
import math
import struct
from pathlib import Path

D_MODEL, D_FF, HEADS, KV_HEADS, HEAD_DIM, VOCAB = 3840, 15360, 16, 8, 256, 32768
OSS_D, OSS_HEADS, OSS_KV_HEADS, OSS_HEAD_DIM = 2880, 64, 8, 64  # gpt-oss: expert width = hidden size
QWEN3_D, QWEN3_FF, QWEN3_HEADS, QWEN3_KV_HEADS, QWEN3_HEAD_DIM = 2048, 768, 32, 4, 128  # Qwen3-MoE-30B-A3B


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


def fused_layer_shapes(experts: int, d: int = OSS_D) -> dict[str, tuple[int, ...]]:
    """A gpt-oss decoder layer: attention with sinks, a router and fused experts with biases."""
    return {
        "input_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (OSS_HEADS * OSS_HEAD_DIM, d),
        "self_attn.k_proj.weight": (OSS_KV_HEADS * OSS_HEAD_DIM, d),
        "self_attn.v_proj.weight": (OSS_KV_HEADS * OSS_HEAD_DIM, d),
        "self_attn.o_proj.weight": (d, OSS_HEADS * OSS_HEAD_DIM),
        "self_attn.sinks": (OSS_HEADS,),
        "post_attention_layernorm.weight": (d,),
        "mlp.router.weight": (experts, d),
        "mlp.router.bias": (experts,),
        "mlp.experts.gate_up_proj": (experts, d, 2 * d),
        "mlp.experts.gate_up_proj_bias": (experts, 2 * d),
        "mlp.experts.down_proj": (experts, d, d),
        "mlp.experts.down_proj_bias": (experts, d),
    }


def qwen3_moe_layer_shapes(experts: int) -> dict[str, tuple[int, ...]]:
    """A Qwen3-MoE decoder layer as transformers 5 holds it: fused experts, d_model on axis 1 of ``down_proj``."""
    d = QWEN3_D
    return {
        "input_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (QWEN3_HEADS * QWEN3_HEAD_DIM, d),
        "self_attn.k_proj.weight": (QWEN3_KV_HEADS * QWEN3_HEAD_DIM, d),
        "self_attn.v_proj.weight": (QWEN3_KV_HEADS * QWEN3_HEAD_DIM, d),
        "self_attn.o_proj.weight": (d, QWEN3_HEADS * QWEN3_HEAD_DIM),
        "self_attn.q_norm.weight": (QWEN3_HEAD_DIM,),
        "self_attn.k_norm.weight": (QWEN3_HEAD_DIM,),
        "post_attention_layernorm.weight": (d,),
        "mlp.gate.weight": (experts, d),
        "mlp.experts.gate_up_proj": (experts, 2 * QWEN3_FF, d),
        "mlp.experts.down_proj": (experts, d, QWEN3_FF),
    }


def shapes(experts: int = 0, qwen3: bool = False) -> dict[str, tuple[int, ...]]:
    """One decoder layer: Gemma-3-12B's, or gpt-oss's (``qwen3``: Qwen3-MoE's) with ``experts`` fused experts."""
    if experts:
        return qwen3_moe_layer_shapes(experts) if qwen3 else fused_layer_shapes(experts)
    return layer_shapes()


def width(experts: int = 0, qwen3: bool = False) -> int:
    """d_model of ``shapes(experts, qwen3)``."""
    return (QWEN3_D if qwen3 else OSS_D) if experts else D_MODEL


BLOCK = 128
GROUP = 32  # MXFP4 values per e8m0 scale
FUSED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def stored(experts: int = 0, fp8: bool = False, mxfp4: bool = False,
           qwen3: bool = False) -> dict[str, tuple[str, tuple[int, ...]]]:
    """One decoder layer as stored: name -> (dtype code, shape); with ``fp8``, each projection
    as float8 values and a float32 scale per block; with ``mxfp4``, each fused expert tensor
    (logical [E, C, R]) as blocks [E, R, C / 32, 16] and scales [E, R, C / 32]."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, shape in shapes(experts, qwen3).items():
        if fp8 and name.endswith("_proj.weight"):
            out[name] = ("F8_E4M3", shape)
            out[name[: -len("weight")] + "weight_scale_inv"] = ("F32", tuple(-(-n // BLOCK) for n in shape))
        elif mxfp4 and name.endswith(FUSED):
            e, c, r = shape
            out[name + "_blocks"] = ("U8", (e, r, c // GROUP, GROUP // 2))
            out[name + "_scales"] = ("U8", (e, r, c // GROUP))
        else:
            out[name] = ("BF16", shape)
    return out


SIZES = {"BF16": 2, "F8_E4M3": 1, "F32": 4, "U8": 1}


def layer_bytes(experts: int = 0, fp8: bool = False, mxfp4: bool = False, qwen3: bool = False) -> int:
    return sum(SIZES[dtype] * math.prod(s) for dtype, s in stored(experts, fp8, mxfp4, qwen3).values())


def largest_edited_fp32_bytes(experts: int = 0, qwen3: bool = False) -> int:
    """The largest piece the rewrite edits at once: a whole matrix, or one expert's slice."""
    if experts and qwen3:
        return 4 * QWEN3_D * max(QWEN3_FF, QWEN3_HEADS * QWEN3_HEAD_DIM)
    if experts:
        return 4 * OSS_D * max(OSS_D, OSS_HEADS * OSS_HEAD_DIM)
    return 4 * D_MODEL * max(D_FF, HEADS * HEAD_DIM)


def make(out: Path, layers: int, shard_bytes: int, seed: int = 0, experts: int = 0, fp8: bool = False,
         mxfp4: bool = False, qwen3: bool = False) -> Path:
    """Write a gemma3_text-shaped (or, with ``experts``, gpt_oss- or qwen3_moe-shaped) bf16 checkpoint, or
    with ``fp8`` a block-FP8 one, or with ``mxfp4`` gpt-oss's MXFP4 experts; one random tensor
    per dtype and shape is made and reused, so memory does not grow with the layer count."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    pool: dict[tuple[str, tuple[int, ...]], "torch.Tensor"] = {}
    dtypes = {"BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn, "F32": torch.float32}

    def tensor(dtype: str, shape: tuple[int, ...]) -> "torch.Tensor":
        if (dtype, shape) not in pool and dtype == "U8":  # MXFP4 blocks: any e2m1 pairs; scales 2^-9 to 2^-6
            pool[dtype, shape] = (torch.randint(0, 256, shape, generator=g) if len(shape) == 4 else
                                  torch.randint(118, 122, shape, generator=g)).to(torch.uint8)
        if (dtype, shape) not in pool:
            values = torch.rand(shape, generator=g) * 1e-3 + 1e-4 if dtype == "F32" else torch.randn(shape, generator=g)
            pool[dtype, shape] = (values if dtype == "F32" else values * 0.02 * (1 if dtype == "BF16" else 20)
                                  ).to(dtypes[dtype])
        return pool[dtype, shape]

    d = width(experts, qwen3)
    items = [("model.embed_tokens.weight", ("BF16", (VOCAB, d)))]
    layer = stored(experts, fp8, mxfp4, qwen3)
    items += [(f"model.layers.{i}.{k}", v) for i in range(layers) for k, v in layer.items()]
    items.append(("model.norm.weight", ("BF16", (d,))))
    shards: list[list[tuple[str, tuple[str, tuple[int, ...]]]]] = [[]]
    size = 0
    for name, (dtype, shape) in items:
        nbytes = SIZES[dtype] * math.prod(shape)
        if size and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, (dtype, shape)))
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(out / fname, [(n, dtype, tensor(dtype, s)) for n, (dtype, s) in shard])
        weight_map.update(dict.fromkeys((n for n, _ in shard), fname))
    total = sum(SIZES[dtype] * math.prod(s) for _, (dtype, s) in items)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = {"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"], "hidden_size": D_MODEL,
              "intermediate_size": D_FF}
    if experts and qwen3:
        config = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "hidden_size": QWEN3_D,
                  "moe_intermediate_size": QWEN3_FF, "num_experts": experts}
    elif experts:
        config = {"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "hidden_size": OSS_D,
                  "intermediate_size": OSS_D, "num_local_experts": experts}
    if mxfp4:
        config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    if fp8:
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [BLOCK, BLOCK]}
    (out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": layers, "torch_dtype": "bfloat16"}))
    return out


def _write_safetensors(path: Path, tensors: list) -> None:
    """A safetensors file written tensor by tensor (the pool's tensors repeat, so no dict of them)."""
    import torch

    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, dtype, t in tensors:
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, _, t in tensors:
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def directions(path: Path, layers: int, seed: int = 1, d: int = D_MODEL) -> Path:
    import torch

    from rewriter.directions import Measurements

    g = torch.Generator().manual_seed(seed)
    harmless = {n: torch.randn(d, generator=g, dtype=torch.float64) for n in range(layers)}
    harmful = {n: harmless[n] + torch.randn(d, generator=g, dtype=torch.float64) for n in range(layers)}
    Measurements(harmful, harmless, 1, 1, {"model": "synthetic"}).save(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--gigabytes", type=float, default=1.0, help="size in GiB (whole layers)")
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--fused-experts", type=int, default=0, metavar="E", help="gpt-oss layers with E fused experts")
    ap.add_argument("--fp8", action="store_true", help="block-FP8 projections (quant_method fp8)")
    ap.add_argument("--mxfp4", action="store_true", help="with --fused-experts: MXFP4 experts (quant_method mxfp4)")
    ap.add_argument("--qwen3-moe", action="store_true", help="with --fused-experts: Qwen3-MoE-shaped layers, bf16")
    args = ap.parse_args()
    if (args.mxfp4 or args.qwen3_moe) and not args.fused_experts:
        ap.error("--mxfp4 and --qwen3-moe store fused experts: give --fused-experts E")
    if args.qwen3_moe and (args.mxfp4 or args.fp8):
        ap.error("--qwen3-moe writes bf16 layers")
    per_layer = layer_bytes(args.fused_experts, args.fp8, args.mxfp4, args.qwen3_moe)
    layers = max(1, round(args.gigabytes * 2**30 / per_layer))
    make(args.out, layers, int(args.shard_gb * 2**30), experts=args.fused_experts, fp8=args.fp8, mxfp4=args.mxfp4,
         qwen3=args.qwen3_moe)
    directions(args.out.with_suffix(".directions.safetensors"), layers, d=width(args.fused_experts, args.qwen3_moe))
    print(layers)


if __name__ == "__main__":
    main()
