"""What requantization does to an edit, per format, on real-sized synthetic tensors.

    python benchmarks/codec_fidelity.py [--seed 0]

For each format: a float weight (normal, column scales varying by up to 2x, plus a
component along a random unit direction r of the size a refusal direction has) is
quantized as the "published" input; the dequantized input is edited in fp32 (r removed,
standard strategy); the result is requantized with plain round-to-nearest and with the
rounding that keeps r out (rewriter.rounding). Printed, as a markdown table: mean and
max |r . w| over columns before the edit, after the fp32 edit and after each
requantization; the relative (Frobenius) error of each requantized result against the
fp32 edit; the error of a plain quantize-dequantize round trip of the float weight; and
seconds per tensor (CPU time of the process on one torch thread: this project's machine is
shared, and wall time counted the other jobs' share). Asserts nothing.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from rewriter.codec import Packed
from rewriter.plugins.fp8 import CODECS
from rewriter.plugins.mxfp4 import MXFP4
from rewriter.rounding import Rounding


def formats() -> list[tuple[str, object, Packed, dict[str, torch.Tensor], int]]:
    """(label, codec, packed, like, axis of the model width)."""
    fp8, compressed = CODECS
    d, n = 7168, 2048
    return [
        ("fp8 block 128x128", fp8, Packed("w", ("w", "s"), (d, n), (), (128, 128)),
         {"w": torch.empty(d, n, dtype=torch.float8_e4m3fn), "s": torch.empty(56, 16)}, 0),
        ("compressed-tensors fp8, per channel", compressed, Packed("w", ("w", "s"), (d, n), (), (1, n)),
         {"w": torch.empty(d, n, dtype=torch.float8_e4m3fn), "s": torch.empty(d, 1, dtype=torch.bfloat16)}, 0),
        ("mxfp4 (one gpt-oss expert)", MXFP4(), Packed("x", ("b", "s"), (2880, 2880)), {}, 1),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    print("| format | shape | \\|r.w\\| mean / max: input | fp32 edit | nearest | r-aware | error vs fp32 edit: "
          "nearest | r-aware | round trip of the float weight | s/tensor: nearest | r-aware |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, codec, packed, like, axis in formats():
        shape = packed.shape
        d = shape[axis]
        r = torch.randn(d, dtype=torch.float64)
        r /= r.norm()
        other = shape[1 - axis]
        w = torch.randn(shape) * 0.02 * (1 + 0.5 * torch.randn(other).abs()).unsqueeze(axis)
        w += _outer(r.float(), torch.randn(other) * 0.02, axis)
        published = codec.decode(packed, codec.encode(packed, w, like))
        edited = (published.double() - _outer(r, _along(published, r, axis), axis)).float()
        nearest, t_near = _timed(lambda: codec.decode(packed, codec.encode(packed, edited, like)))
        aware, t_aware = _timed(lambda: codec.decode(packed, codec.encode(packed, edited, like, Rounding(r, axis))))
        cells = [_stat(x, r, axis) for x in (published, edited, nearest, aware)]
        errors = [_rel(x, edited) for x in (nearest, aware)] + [_rel(codec.decode(packed, codec.encode(packed, w, like)), w)]
        print(f"| {label} | {list(shape)} | " + " | ".join(cells) + " | "
              + " | ".join(f"{e:.4f}" for e in errors) + f" | {t_near:.2f} | {t_aware:.2f} |")


def _outer(r: torch.Tensor, c: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.outer(r, c) if axis == 0 else torch.outer(c, r)


def _along(w: torch.Tensor, r: torch.Tensor, axis: int) -> torch.Tensor:
    return torch.tensordot(w.double().movedim(axis, -1), r, dims=1)


def _stat(w: torch.Tensor, r: torch.Tensor, axis: int) -> str:
    a = _along(w, r, axis).abs()
    return f"{float(a.mean()):.2e} / {float(a.max()):.2e}"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def _timed(f: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    start = time.process_time()
    out = f()
    return out, time.process_time() - start


if __name__ == "__main__":
    main()
