"""Rounding that keeps an edit's direction out of a requantized weight.

An abliteration edit moves each element of a weight by ``r_i * (r . w)``: far less than one
step of an 8- or 4-bit grid. Rounded to the nearest grid value, most elements fall back
to where they were, and the requantized weight keeps much of the component along ``r``
that the edit removed (measured: about 45% for block FP8, 65% for MXFP4; see
docs/method.md). So, column by column, some elements are rounded to their *other*
neighbour instead: those that move ``r . w`` most towards its value before rounding for
the least added squared error, until that residual is below half a flip.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

# (wanted values, nearest grid values, other neighbours; all in the logical layout, float32) -> chosen values
Rounding = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

ROWS = 4  # a switch is looked for among the 1/ROWS of the rows where |r| is largest: they move r . w most
COLUMNS = 256  # columns handled at once: temporaries stay [d / ROWS, COLUMNS]


def along(direction: torch.Tensor, axis: int) -> Rounding:
    """Rounding that keeps ``direction . w`` (over ``axis``) of every column at its wanted value."""
    r = direction.to(torch.float64)
    rows = torch.topk(r.abs(), max(1, r.numel() // ROWS)).indices

    def choose(wanted: torch.Tensor, nearest: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        d = wanted.shape[axis]
        x, q, o = (t.movedim(axis, 0).reshape(d, -1) for t in (wanted, nearest, other))
        chosen = q.clone()
        for start in range(0, x.shape[1], COLUMNS):
            cols = slice(start, start + COLUMNS)
            residual = r @ (q[:, cols] - x[:, cols]).double()  # what rounding added along r
            chosen[rows, cols] = _balance(x[rows, cols], q[rows, cols], o[rows, cols], r[rows], residual)
        return chosen.reshape(wanted.movedim(axis, 0).shape).movedim(0, axis)

    return choose


def _balance(x: torch.Tensor, q: torch.Tensor, o: torch.Tensor, r: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``q`` with the cheapest useful switches to ``o`` made, column by column: in order of added
    squared error per unit moved along ``r``, while ``residual`` is more than half the next move away."""
    rf = r.to(x.dtype).unsqueeze(1)
    flip = o - q
    gain = rf * flip  # how far a switch moves r . w
    # added squared error (o-x)^2 - (q-x)^2 = flip (o + q - 2x) >= 0, per unit of |gain|
    cost = (o + q - 2 * x) * flip.sign() / rf.abs().clamp_min(torch.finfo(x.dtype).tiny)
    cost.masked_fill_(gain * residual.to(x.dtype) >= 0, torch.inf)  # a switch that moves the wrong way, or not at all
    best, idx = torch.sort(cost, dim=0)
    g = gain.gather(0, idx).abs_().masked_fill_(torch.isinf(best), 0)
    before = g.cumsum(0) - g
    take = (before + g / 2 < residual.abs().to(x.dtype).unsqueeze(0)) & (g > 0)
    return q.scatter_(0, idx, torch.where(take, o.gather(0, idx), q.gather(0, idx)))
