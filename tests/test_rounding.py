"""Requantization after an edit: the grids are rounded to correctly, and the rounding that keeps
the direction out does so where rounding to nearest puts much of it back."""
from __future__ import annotations

import pytest
import torch

from rewriter.codec import Packed
from rewriter.plugins.fp8 import CODECS, _other_e4m3
from rewriter.plugins.mxfp4 import E2M1, MXFP4, _round_e2m1
from rewriter.rounding import Rounding


def test_e2m1_rounds_to_nearest_with_ties_to_even() -> None:
    m = torch.linspace(0, 7, 7001)
    grid = torch.tensor(E2M1)
    distance = (m.unsqueeze(1) - grid).abs()
    nearest = distance == distance.min(1, keepdim=True).values
    even = nearest & (torch.arange(len(E2M1)) % 2 == 0)
    expected = torch.where(nearest.sum(1) > 1, even.int().argmax(1), nearest.int().argmax(1))
    assert torch.equal(_round_e2m1(m).long(), expected)


def test_e4m3_other_neighbour_is_the_adjacent_value_beyond() -> None:
    values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = torch.unique(values[torch.isfinite(values)])
    y = (grid[:-1] + grid[1:]) / 2 + (grid[1:] - grid[:-1]) * 0.1  # just above each midpoint
    near = y.to(torch.float8_e4m3fn)
    other = _other_e4m3(near, near.float(), y).float()
    lo, hi = torch.minimum(near.float(), other), torch.maximum(near.float(), other)
    assert bool(((lo <= y) & (y <= hi)).all())
    step = torch.searchsorted(grid, hi) - torch.searchsorted(grid, lo)
    assert bool(((step == 1) | ((lo == 0) & (hi == 0))).all())


@pytest.mark.parametrize("kind", ["fp8", "mxfp4"])
def test_rounding_keeps_the_direction_out(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "fp8":
        codec, packed, axis = CODECS[0], Packed("w", ("w", "s"), (4096, 256), (), (128, 128)), 0
        like = {"w": torch.empty(4096, 256, dtype=torch.float8_e4m3fn), "s": torch.empty(32, 2)}
    else:  # the effect grows with the width, which moves each element by less: a real width
        codec, packed, axis, like = MXFP4(), Packed("x", ("b", "s"), (256, 4096)), 1, {}
    d = packed.shape[axis]
    r = torch.randn(d, dtype=torch.float64)
    r /= r.norm()
    planted = (torch.randn(packed.shape[1 - axis], dtype=torch.float64) * 0.02).unsqueeze(axis) * r.unsqueeze(1 - axis)
    w = codec.decode(packed, codec.encode(packed, (torch.randn(packed.shape) * 0.02 + planted).float(), like))
    moved = w.double().movedim(axis, -1)
    edited = (moved - (moved @ r).unsqueeze(-1) * r).movedim(-1, axis).float()

    def left(x: torch.Tensor) -> float:
        return float(torch.tensordot(x.double().movedim(axis, -1), r, dims=1).abs().mean())

    nearest = codec.decode(packed, codec.encode(packed, edited, like))
    kept = codec.decode(packed, codec.encode(packed, edited, like, Rounding(r, axis)))
    assert left(nearest) > 0.2 * left(w)  # rounding to nearest undoes much of the edit
    assert left(kept) < 0.01 * left(w)
    error = float(torch.linalg.vector_norm(kept - edited) / torch.linalg.vector_norm(edited))
    nearest_error = float(torch.linalg.vector_norm(nearest - edited) / torch.linalg.vector_norm(edited))
    assert error < 1.3 * nearest_error
