"""FP8 copies of a float checkpoint, written from the formats' published descriptions, not by the
project's codecs (a test that quantized with the rewrite's own encoder would only show that the
project agrees with itself):

- ``block``: DeepSeek-V3's layout. Each decoder linear weight is float8 e4m3 in 128 x 128 blocks,
  each block divided by its absolute maximum / 448, with the multiplier that dequantizes it as
  float32 ``weight_scale_inv`` [ceil(rows / 128), ceil(cols / 128)]; ``quantization_config``
  ``{"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}``.
- ``channel``: compressed-tensors' float-quantized scheme, one scale per output row,
  ``weight_scale`` [rows, 1] in the weight's own dtype.

Embeddings, norms and the head stay as they are, as both publishers leave them.

    python tests/fp8_convert.py SRC DST --format block
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

E4M3_MAX = 448.0
BLOCK = 128
LINEAR = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight", "up_proj.weight",
          "down_proj.weight")
CONFIGS: dict[str, dict[str, Any]] = {
    "block": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [BLOCK, BLOCK]},
    "channel": {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "output_activations": None,
                                      "weights": {"num_bits": 8, "type": "float", "symmetric": True,
                                                  "strategy": "channel", "dynamic": False, "observer": "minmax"}}},
        "ignore": ["lm_head"],
    },
}


def _to_e4m3(scaled: torch.Tensor) -> torch.Tensor:
    return scaled.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def block_fp8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """``weight`` in e4m3 and ``weight_scale_inv``, one float32 multiplier per 128 x 128 block."""
    rows, cols = w.shape
    grid_rows, grid_cols = math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)
    padded = torch.zeros(grid_rows * BLOCK, grid_cols * BLOCK)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(grid_rows, BLOCK, grid_cols, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    q = _to_e4m3(blocks / scale[:, None, :, None]).view(grid_rows * BLOCK, grid_cols * BLOCK)[:rows, :cols]
    return {"weight": q.contiguous(), "weight_scale_inv": scale}


def channel_fp8(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """``weight`` in e4m3 and ``weight_scale`` [rows, 1], one multiplier per output row."""
    amax = w.float().abs().amax(dim=1, keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return {"weight": _to_e4m3(w.float() / scale), "weight_scale": scale.to(w.dtype)}


def convert(src: Path, dst: Path, fmt: str) -> Path:
    """A copy of ``src`` with every decoder linear weight in ``fmt``; the other files as they are."""
    quantize = {"block": block_fp8, "channel": channel_fp8}[fmt]
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "quantization_config": CONFIGS[fmt]}, indent=2))
    weight_map: dict[str, str] = {}
    for shard in sorted(src.glob("*.safetensors")):
        out: dict[str, torch.Tensor] = {}
        for name, t in load_file(shard).items():
            if name.startswith("model.layers.") and name.endswith(LINEAR):
                head = name[: -len("weight")]
                out.update({head + suffix: part for suffix, part in quantize(t).items()})
            else:
                out[name] = t
        save_file(out, dst / shard.name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, shard.name))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return dst


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--format", choices=sorted(CONFIGS), default="block")
    args = parser.parse_args()
    print(convert(args.src, args.dst, args.format))
