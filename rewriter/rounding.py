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

from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

from . import compiled, dtypes
from .engine.threads import run_each
from .lazy import torch

ROWS = 4  # a switch is looked for among the 1/ROWS of the rows where |r| is largest: they move r . w most
COLUMNS = 256  # columns handled at once: temporaries stay [d / ROWS, COLUMNS]
SUM = 128  # elements of r per float32 product of the residual (see add_band)
# the share of candidates selected first: enough for two thirds of the columns of a down_proj decoded
# from block FP8 and edited, the rest sorted whole (a half covered them all, no faster, and ordered
# MXFP4's ties in cost otherwise; an eighth, enough for rounding noise alone, fell short in 97%)
FIRST = 1 / 3
WHOLE = 1 << 32  # a column's residual in the units its switches' gains are added in (finer than float32)
CAP = 4 * WHOLE  # gains beyond twice the residual can never be taken

# (wanted, nearest, other) of a group's candidates, [candidates, columns] -> the values to store
Choose = Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor"], "torch.Tensor"]


class Rounding:
    """Keeps ``direction . w`` (over ``axis``) of every column at its wanted value.

    A codec's ``encode`` rounds to nearest, then asks for the other neighbour of the elements
    at indices ``rows`` along ``axis`` only, and stores what ``choose`` returns there. A codec
    that rounds band by band may instead sum what rounding added along ``r`` as it goes
    (``add_band``) and pass only the candidate rows to ``choose_at``: it then never holds a
    second tensor-sized copy of the rounded weight.
    """

    def __init__(self, direction: torch.Tensor, axis: int, pool: Executor | None = None) -> None:
        self.axis = axis
        self._r = direction.to(torch.float64)
        self.rows = torch.topk(self._r.abs(), max(1, self._r.numel() // ROWS)).indices
        self.pool = pool  # the edit threads: a codec may run its own independent passes on them
        self._candidate_r = self._r[self.rows].to(torch.float32).numpy()  # r at ``rows``, for the compiled selection

    def choose(self, wanted: torch.Tensor, nearest: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """The values to store at ``rows``: each that of ``nearest`` or ``other`` (both float32).

        ``wanted`` and ``nearest`` cover the whole (logical) tensor; ``other`` is the other
        neighbour at ``rows`` only, i.e. shaped like ``wanted.index_select(axis, rows)``.
        """
        residual = self.residual(wanted)
        self.add_band(residual, nearest - wanted, 0)
        axis = self.axis % wanted.dim()
        return self.choose_at(residual, *(t.index_select(axis, self.rows) for t in (wanted, nearest)), other)

    def residual(self, like: torch.Tensor) -> torch.Tensor:
        """Zeros (float64) to sum what rounding adds along ``r`` into: one per column, shaped
        like ``like`` without ``axis``."""
        shape = list(like.shape)
        del shape[self.axis % like.dim()]
        return torch.zeros(shape, dtype=torch.float64)

    def add_band(self, residual: torch.Tensor, diff: torch.Tensor, start: int) -> None:
        """Add ``r . diff`` over ``axis`` to ``residual``, for ``diff`` (rounded minus wanted) the
        tensor's rows ``start`` on along axis -2 (all of them: start 0 and the whole tensor)."""
        self.add_total(residual, self.band_total(diff, start), start)

    def band_total(self, diff: torch.Tensor, start: int) -> torch.Tensor:
        """``r . diff`` over ``axis`` of one band (as ``add_band``), to be added by ``add_total``:
        bands computed on several threads are then added in their order, so that the sums'
        bits do not depend on which thread finished first.

        Summed as float32 products of ``SUM`` elements of ``r`` at a time, added up in float64:
        converting ``diff`` to float64 took longer than the rest of the rounding, and these
        sums differ from a float64 product's by less than 1e-7 of a few hundred terms, far
        below the smallest switch (the switches made are the same but for ties)."""
        axis, last = self.axis % diff.dim(), diff.dim() - 1
        r = (self._r[start : start + diff.shape[-2]] if axis == last - 1 else self._r).to(diff.dtype)
        total: torch.Tensor | None = None
        for at in range(0, r.numel(), SUM):
            part, piece = diff.narrow(axis, at, min(SUM, r.numel() - at)), r[at : at + SUM]
            if axis == last:
                product = torch.matmul(part, piece)
            elif axis == last - 1:
                product = torch.matmul(piece, part)
            else:
                product = torch.tensordot(part, piece, dims=([axis], [0]))
            total = product.double() if total is None else total.add_(product)
        assert total is not None
        return total

    def add_total(self, residual: torch.Tensor, total: torch.Tensor, start: int) -> None:
        """Add a ``band_total`` of the band at rows ``start`` on to ``residual``."""
        axis, last = self.axis % (residual.dim() + 1), residual.dim()
        if axis == last:
            residual[..., start : start + total.shape[-1]].add_(total)
        elif axis == last - 1:
            residual.add_(total)
        else:
            residual[..., start : start + total.shape[-2], :].add_(total)

    def choose_at(self, residual: torch.Tensor, wanted: torch.Tensor, nearest: torch.Tensor,
                  other: torch.Tensor) -> torch.Tensor:
        """``choose`` from what rounding to nearest added along ``r`` (``residual``, as
        ``add_band`` sums it) and the candidate rows alone: ``wanted``, ``nearest`` and
        ``other`` all shaped like ``wanted_tensor.index_select(axis, rows)``."""
        k = len(self.rows)
        x, q, o = (t.movedim(self.axis, 0).reshape(k, -1) for t in (wanted, nearest, other))
        chosen = torch.empty_like(q)

        def work(cols: slice, choose: Choose) -> None:
            chosen[:, cols] = choose(x[:, cols], q[:, cols], o[:, cols])

        self.choose_each(residual, x.shape[1], work)
        return chosen.reshape(other.movedim(self.axis, 0).shape).movedim(0, self.axis)

    def choose_each(self, residual: torch.Tensor, columns: int, work: Callable[[slice, Choose], None]) -> None:
        """``choose_at`` a group of ``COLUMNS`` columns at a time, on the pool's threads, for a
        codec that makes each group's candidates itself: ``work(cols, choose)`` computes the
        wanted, nearest and other values ([candidates, columns], columns as ``residual.reshape(-1)``
        orders them) of the columns ``cols``, calls ``choose`` on them and stores what it returns.
        A group's temporaries then stay in cache, where a whole tensor's candidates (a
        [960, 15360] float32 tensor each for a ``down_proj``) were written and read again from memory."""
        r_rows = self._r[self.rows].unsqueeze(1)
        flat = residual.reshape(-1)

        def group(start: int) -> None:
            cols = slice(start, min(start + COLUMNS, columns))

            def choose(x: torch.Tensor, q: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
                out = torch.empty(q.shape, dtype=q.dtype)
                _balance(x, q, o, r_rows.to(x.dtype), flat[cols], out)
                return out

            work(cols, choose)

        run_each(self.pool, group, range(0, columns, COLUMNS))


    @property
    def switches_compiled(self) -> bool:
        """Whether ``switch_codes`` can run (numba's selection and store are there): a codec that
        gathers its candidates with a compiled kernel then hands them over to it."""
        return all(compiled.kernel("rewriter.switch_kernel", f) is not None for f in ("balance", "store"))

    def switch_codes(self, codes: Any, axis: int, cols: slice, residual: torch.Tensor, x: Any, near: Any, other: Any,
                     other_code: Any) -> None:
        """For a ``choose_each`` group ``cols`` whose candidates a codec's compiled kernel gathered
        (``x``, ``near``, ``other``: [candidates, columns] float32 numpy arrays, ``other_code``:
        each one's other code), store ``other_code`` in ``codes`` (a uint8 numpy matrix; the
        candidates at ``rows`` along ``axis``) wherever the selection switches to ``other``."""
        balance, store = (compiled.kernel("rewriter.switch_kernel", f) for f in ("balance", "store"))
        assert balance is not None and store is not None  # (switches_compiled)
        chosen = near.copy()  # (balance writes every element)
        balance(x, near, other, self._candidate_r, residual.reshape(-1)[cols].numpy(), chosen)
        store(codes, self.rows.numpy(), axis, cols.start, chosen, near, other_code)

def _balance(x: torch.Tensor, q: torch.Tensor, o: torch.Tensor, r: torch.Tensor, residual: torch.Tensor,
             out: torch.Tensor) -> None:
    """Write into ``out`` ``q`` with the cheapest useful switches to ``o`` made, for each column
    of these [candidates, columns] tensors (``r``: [candidates, 1]): in order of added squared
    error per unit moved along ``r`` (ties: the lower candidate first), while ``residual`` is
    more than half the next move away. Compiled where numba is installed (float32), else
    ``_balance_torch``: the same values either way."""
    kernel = compiled.kernel("rewriter.switch_kernel", "balance")
    if kernel is None or x.dtype != torch.float32:
        _balance_torch(x, q, o, r, residual, out)
        return
    kernel(*(t.contiguous().numpy() for t in (x, q, o, r.reshape(-1), residual)), out.numpy())


def _balance_torch(x: torch.Tensor, q: torch.Tensor, o: torch.Tensor, r: torch.Tensor, residual: torch.Tensor,
                   out: torch.Tensor) -> None:
    """``_balance`` in eager torch: the reference the compiled kernel is held to.

    Only the switches before the one that covers the residual can be taken, so the cheapest
    ``FIRST`` of the candidates are found by a partial selection (3x faster than a sort),
    and only a column they do not cover is sorted whole: the same switches either way."""
    flip = o - q
    gain = r * flip  # how far a switch moves r . w
    # added squared error (o-x)^2 - (q-x)^2 = flip (o + q - 2x) >= 0, per unit of |gain|
    cost = (o + q - 2 * x).mul_(flip.sign_()).div_(r.abs().clamp_min(torch.finfo(x.dtype).tiny))
    wanted = residual.to(x.dtype)
    # a switch that moves the wrong way, or not at all, is never made
    cost = pick(gain * wanted >= 0, torch.full_like(cost, torch.inf), cost)
    # one column per row from here: selecting along contiguous memory is 1.5x faster, and
    # selecting integers that order as the costs do 1.6x faster than selecting the floats
    order, gain, o, out_t = _indexed(sort_key(cost.t().contiguous())), gain.t(), o.t(), out.t()
    never = _indexed(sort_key(torch.full((1, 1), torch.inf, dtype=cost.dtype)))  # a switch that may not be made
    out_t.copy_(q.t())
    first = min(order.shape[1], max(1, int(order.shape[1] * FIRST)))
    short = _switch(out_t, o, gain, order, never, wanted.abs(), first)
    if first < order.shape[1] and bool(short.any()):
        cols = short.nonzero().squeeze(1)
        redone = out_t[cols]
        _switch(redone, o[cols], gain[cols], order[cols], never, wanted[cols].abs(), order.shape[1])
        out_t[cols] = redone


def _switch(out: torch.Tensor, o: torch.Tensor, gain: torch.Tensor, order: torch.Tensor, never: torch.Tensor,
            wanted: torch.Tensor, first: int) -> torch.Tensor:
    """Make in ``out`` ([columns, candidates], as ``o``, ``gain`` and the costs' ``order``) the
    switches taken among each column's ``first`` cheapest; returns the columns whose residual
    those do not cover (some later switch might be taken)."""
    if first < order.shape[1]:
        best, idx = torch.topk(order, first, dim=1, largest=False, sorted=True)
    else:
        best, idx = torch.sort(order, dim=1)
    g = gain.gather(1, idx).abs_().mul_(best < never)  # no gain from a switch that may not be made
    g = units(g, wanted.unsqueeze(1))
    total = g.cumsum(1)
    take = (2 * (total - g) + g < 2 * WHOLE) & (g > 0)  # the move leaves the total less than half of it short
    out.scatter_(1, idx, pick(take, o.gather(1, idx), out.gather(1, idx)))
    return total[:, -1] < WHOLE


def units(gain: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Each switch's |gain| in integer units of ``WHOLE`` to its column's ``wanted`` |residual|
    (float64, rounded down; at most ``CAP``, which no switch that could be taken reaches).
    Integer totals are exact in any order: the compiled kernel adds the cheapest switches in
    whatever order it finds them and still makes the very switches this does."""
    scaled = gain.double().div_(wanted.double()).mul_(WHOLE).clamp_(max=CAP)
    return scaled.nan_to_num_(nan=CAP).to(torch.int64)


def _indexed(keys: torch.Tensor) -> torch.Tensor:
    """[columns, candidates] keys narrower than 64 bits made unique, ``key << 32 | candidate``: ties
    in cost then go to the lower candidate whatever the selection's own order of equal keys
    (which differs between topk, sort and the compiled kernel)."""
    if keys.element_size() == 8:
        return keys
    wide = torch.empty(keys.shape, dtype=torch.int64).copy_(keys)
    return wide.bitwise_left_shift_(32).bitwise_or_(torch.arange(keys.shape[1]))


def sort_key(x: torch.Tensor) -> torch.Tensor:
    """Signed integers, in place of ``x``'s bits, that order as the floats ``x`` do (-0.0 just
    below +0.0; NaN apart): a float's bits read as an integer order the positive values, and
    flipping all but the sign bit of the negative ones orders those too."""
    bits = x.view(dtypes.BITS[x.element_size()])
    return bits.bitwise_xor_((bits >> (8 * x.element_size() - 1)).bitwise_and_(~(-1 << (8 * x.element_size() - 1))))


def pick(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.where(mask, a, b)`` for same-shaped tensors of one dtype, made of their bits
    (b ^ ((a ^ b) & -mask)): exact for any dtype, and 3x as fast as torch.where and
    masked_fill_, whose CPU kernels here take 4 ns an element."""
    bits = dtypes.BITS[a.element_size()]
    x, y = a.view(bits), b.view(bits)
    return (x ^ y).bitwise_and_(mask.to(bits).neg_()).bitwise_xor_(y).view(a.dtype)
