"""Rounding that keeps an edit's direction out of a requantized weight.

An abliteration edit moves each element by ``r_i * (r . w)``: far less than one step of
an 8- or 4-bit grid. Rounded to the nearest grid value, most elements fall back to where
they were, and the requantized weight keeps much of the component along ``r`` that the
edit removed (measured: about 45% for block FP8, 65% for MXFP4; see docs/method.md). So,
column by column, some elements are rounded to their *other* neighbour instead: those
that move ``r . w`` most towards its value before rounding for the least added squared
error, until that residual is below half a flip.

Switches are only looked for in the candidate rows (where ``|r|`` is largest), so a codec
needs the other neighbour of those elements alone: finding it costs more than anything
else in a quantized edit, and the other rows keep their nearest value.
"""
from __future__ import annotations

from concurrent.futures import Executor

import torch

from .engine.threads import run_each

ROWS = 4  # a switch is looked for among the 1/ROWS of the rows where |r| is largest: they move r . w most
COLUMNS = 256  # columns handled at once: temporaries stay [d / ROWS, COLUMNS]


class Rounding:
    """Keeps ``direction . w`` (over ``axis``) of every column at its wanted value.

    A codec's ``encode`` rounds to nearest, then asks for the other neighbour of the elements
    at indices ``rows`` along ``axis`` only, and stores what ``choose`` returns there.
    """

    def __init__(self, direction: torch.Tensor, axis: int, pool: Executor | None = None) -> None:
        self.axis = axis
        self._r = direction.to(torch.float64)
        self.rows = torch.topk(self._r.abs(), max(1, self._r.numel() // ROWS)).indices
        self._pool = pool

    def choose(self, wanted: torch.Tensor, nearest: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """The values to store at ``rows``: each that of ``nearest`` or ``other`` (both float32).

        ``wanted`` and ``nearest`` cover the whole (logical) tensor; ``other`` is the other
        neighbour at ``rows`` only, i.e. shaped like ``wanted.index_select(axis, rows)``.
        """
        d, k = wanted.shape[self.axis], len(self.rows)
        x, q = (t.movedim(self.axis, 0).reshape(d, -1) for t in (wanted, nearest))
        o = other.movedim(self.axis, 0).reshape(k, -1)
        chosen = q[self.rows]
        r_rows = self._r[self.rows]

        def group(start: int) -> None:
            cols = slice(start, start + COLUMNS)
            residual = self._r @ (q[:, cols] - x[:, cols]).double()  # what rounding added along r
            # one column per row: sorting along contiguous memory is 1.5x faster
            xt, qt, ot = (t.t().contiguous() for t in (x[self.rows, cols], chosen[:, cols], o[:, cols]))
            chosen[:, cols] = _balance(xt, qt, ot, r_rows, residual).t()

        run_each(self._pool, group, range(0, x.shape[1], COLUMNS))
        return chosen.reshape(other.movedim(self.axis, 0).shape).movedim(0, self.axis)


def _balance(x: torch.Tensor, q: torch.Tensor, o: torch.Tensor, r: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``q`` with the cheapest useful switches to ``o`` made, for each column (a row of these
    [columns, candidates] tensors): in order of added squared error per unit moved along ``r``,
    while ``residual`` is more than half the next move away."""
    rf = r.to(x.dtype).unsqueeze(0)
    flip = o - q
    gain = rf * flip  # how far a switch moves r . w
    # added squared error (o-x)^2 - (q-x)^2 = flip (o + q - 2x) >= 0, per unit of |gain|
    cost = (o + q - 2 * x) * flip.sign() / rf.abs().clamp_min(torch.finfo(x.dtype).tiny)
    wanted = residual.to(x.dtype).unsqueeze(1)
    cost.masked_fill_(gain * wanted >= 0, torch.inf)  # a switch that moves the wrong way, or not at all
    best, idx = torch.sort(cost, dim=1)
    g = gain.gather(1, idx).abs_().masked_fill_(torch.isinf(best), 0)
    before = g.cumsum(1) - g
    take = (before + g / 2 < wanted.abs()) & (g > 0)
    return q.scatter(1, idx, torch.where(take, o.gather(1, idx), q.gather(1, idx)))
