"""The switch selection of ``rounding._balance``, compiled by numba (the ``fast`` extra).

Eager torch spends most of a quantized edit here: each column's candidates are costed in a
few tensor-sized passes, then selected and ordered by ``topk``. Compiled, the costs take
one pass, and only the switches where a column's residual runs out are ordered. It makes
the very switches of the torch path, which stays the reference (the tests hold the two to
the same bits):

- costs in float32 in the same order of operations (no fast-math: no fused multiply-adds),
  ordered by the same integer keys, ties by candidate index;
- gains in the same integer units of the residual (``rounding.units``), whose totals are
  exact in any order: so the cheapest switches whose gains add up to at most the residual
  are all taken whatever their order, and are found by bucketing the costs by their top
  bits (then a selection by weight within the bucket where the residual runs out), not by
  a sort;
- past those, the switches in key order, tested as torch tests them, until the residual is
  covered.
"""
from __future__ import annotations

import numpy as np
from numba import njit

TINY = np.float32(np.finfo(np.float32).tiny)
NEVER = np.int64(0x7F800000)  # the key of +inf: a switch that may not be made
WHOLE = np.int64(1 << 32)  # as rounding.WHOLE and CAP
CAP = np.int64(4 << 32)
BUCKETS = 4096  # cost keys bucketed by their top 12 bits (sign, exponent, 3 bits of mantissa)
SHIFT = 20
SCAN = 8  # switches near the residual found by a scan each before the rest is sorted


@njit(nogil=True, cache=True)
def balance(x: np.ndarray, q: np.ndarray, o: np.ndarray, r: np.ndarray, residual: np.ndarray,
            out: np.ndarray) -> None:  # pragma: no cover - compiled; its results are tested against torch's
    """``rounding._balance`` on float32 [candidates, columns] arrays (C order; ``r``: [candidates],
    ``residual``: float64 [columns]): ``out`` is ``q`` with the switches to ``o`` made."""
    k, n = x.shape
    cost = np.empty((k, n), np.float32)
    cost_bits = cost.view(np.int32)
    gains = np.empty((k, n), np.float32)
    wanted = np.empty(n, np.float32)
    for j in range(n):
        wanted[j] = np.float32(residual[j])
    for i in range(k):  # along rows: contiguous, as torch's passes go
        scale = max(abs(r[i]), TINY)
        for j in range(n):
            flip = o[i, j] - q[i, j]
            gain = r[i] * flip
            sign = np.float32(1.0) if flip > 0 else (np.float32(-1.0) if flip < 0 else np.float32(0.0))
            c = (o[i, j] + q[i, j] - np.float32(2.0) * x[i, j]) * sign / scale
            cost[i, j] = np.float32(np.inf) if gain * wanted[j] >= np.float32(0.0) else c
            gains[i, j] = abs(gain)
            out[i, j] = q[i, j]
    keys = np.empty(k, np.int64)
    g = np.empty(k, np.int64)
    rest_keys = np.empty(k, np.int64)
    rest_g = np.empty(k, np.int64)
    bucket_sum = np.zeros(BUCKETS, np.int64)
    bucket_count = np.zeros(BUCKETS, np.int64)
    for j in range(n):
        aim = np.float64(abs(wanted[j]))
        m, low, high = 0, BUCKETS, -1
        for i in range(k):
            b = np.int64(cost_bits[i, j])
            if b < 0:
                b ^= np.int64(0x7FFFFFFF)  # as rounding.sort_key: negative floats' order reversed
            if b < NEVER:
                keys[m] = (b << 32) | i
                u = gains[i, j] / aim * WHOLE
                g[m] = np.int64(u) if u < CAP else CAP  # rounding.units (NaN: CAP)
                at = (b >> SHIFT) + BUCKETS // 2
                bucket_sum[at] += g[m]
                bucket_count[at] += 1
                low, high = min(low, at), max(high, at)
                m += 1
        if m == 0:
            continue
        # whole buckets (costs alike in their top bits) of the cheapest that fit in the residual:
        # every switch in them is taken, in whatever order the sort would make them
        total, cut = 0, low
        while cut <= high and total + bucket_sum[cut] <= WHOLE:
            total += bucket_sum[cut]
            cut += 1
        ahead = bucket_count[cut] if cut <= high else 0  # the bucket the residual runs out in first
        near, far = 0, ahead
        for t in range(m):
            at = (keys[t] >> (32 + SHIFT)) + BUCKETS // 2
            if at < cut:
                if g[t] > 0:  # (a gain below one unit is never taken)
                    i = keys[t] & 0xFFFFFFFF
                    out[i, j] = o[i, j]
            elif at == cut:
                rest_keys[near], rest_g[near] = keys[t], g[t]
                near += 1
            else:
                rest_keys[far], rest_g[far] = keys[t], g[t]
                far += 1
        bucket_sum[low : high + 1] = 0
        bucket_count[low : high + 1] = 0
        done, total = _take_surely(rest_keys, rest_g, ahead, WHOLE - total, total)
        for t in range(done):
            if rest_g[t] > 0:
                i = rest_keys[t] & 0xFFFFFFFF
                out[i, j] = o[i, j]
        for t in range(done, far):  # the rest in key order, tested as torch tests them, until the residual is covered
            if total >= WHOLE:
                break
            if t - done < SCAN:  # the next cheapest by a scan: one to three are usually all there is
                least = t
                for u in range(t + 1, far):
                    if rest_keys[u] < rest_keys[least]:
                        least = u
                rest_keys[t], rest_keys[least] = rest_keys[least], rest_keys[t]
                rest_g[t], rest_g[least] = rest_g[least], rest_g[t]
            elif t - done == SCAN:  # many small gains at the residual: sort what is left once
                order = np.argsort(rest_keys[t:far]) + t
                rest_keys[t:far], rest_g[t:far] = rest_keys[order], rest_g[order]
            if 2 * total + rest_g[t] < 2 * WHOLE and rest_g[t] > 0:
                i = rest_keys[t] & 0xFFFFFFFF
                out[i, j] = o[i, j]
            total += rest_g[t]


@njit(nogil=True, cache=True)
def _take_surely(keys: np.ndarray, g: np.ndarray, m: int, room: int, total: int
                 ) -> tuple[int, int]:  # pragma: no cover - compiled
    """Reorder ``keys[:m]`` (and ``g`` with them) so that the cheapest whose gains add up to at
    most ``room`` come first; returns how many, and ``total`` plus their gains (a quickselect
    by weight)."""
    lo, hi, used = 0, m, 0
    while lo < hi:
        a, b, c = keys[lo], keys[(lo + hi) // 2], keys[hi - 1]  # median of three
        pivot = max(min(a, b), min(max(a, b), c))
        s, below = lo, 0
        for t in range(lo, hi):
            if keys[t] < pivot:
                keys[s], keys[t] = keys[t], keys[s]
                g[s], g[t] = g[t], g[s]
                below += g[s]
                s += 1
        if used + below > room:
            hi = s
            continue
        used += below
        for t in range(s, hi):  # the pivot next, then whether it fits too
            if keys[t] == pivot:
                keys[s], keys[t] = keys[t], keys[s]
                g[s], g[t] = g[t], g[s]
                break
        if used + g[s] > room:
            return s, total + used
        used += g[s]
        lo = s + 1
    return lo, total + used


@njit(nogil=True, cache=True)
def store(codes: np.ndarray, rows: np.ndarray, axis: int, start: int, chosen: np.ndarray, near: np.ndarray,
          other_code: np.ndarray) -> None:  # pragma: no cover - compiled
    """Store in ``codes`` (uint8 [rows, columns]) the other neighbour's code where ``balance`` chose it
    (``chosen`` is not ``near``'s bits): at rows ``rows`` and columns from ``start`` (``axis`` 0),
    or the transpose (``axis`` 1)."""
    switched, kept = chosen.view(np.int32), near.view(np.int32)
    for i in range(rows.shape[0]):
        for j in range(chosen.shape[1]):
            if switched[i, j] != kept[i, j]:
                row, col = (rows[i], start + j) if axis == 0 else (start + j, rows[i])
                codes[row, col] = other_code[i, j]
