"""MXFP4's coding compiled by numba (the ``fast`` extra; the eager torch code in ``mxfp4`` is
the reference, and the tests hold the two to the same bytes).

In torch, rounding a group of 32 values takes some twenty passes over temporaries (its
largest magnitude, the exponent, the scaled values, the code's bit tricks, the sign, the
rounded value for the residual); here it is two passes over each band of 32 logical rows
(a group down each column, one scale), both along the logical rows, as the edit left them:
no transposed copy of the tensor is made.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

GROUP = 32
BIAS = 127
E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)  # as mxfp4.E2M1
VALUE = np.concatenate((E2M1, -E2M1))  # by 4-bit code, bit 3 the sign
# 2^(s - 127) by e8m0 byte s (exact, subnormal at 0; inf at 255): an exponent e's scale at e + 127
POWER = np.array([math.ldexp(1.0, s - BIAS) if s < 255 else np.inf for s in range(256)], np.float32)


@njit(nogil=True, cache=True)
def _exponent(amax: np.float32, nan: bool) -> int:  # pragma: no cover - compiled
    """The smallest exponent e with ``amax <= 6 * 2^e`` (as ``mxfp4._exponent``)."""
    if nan or not amax > 0:
        return -BIAS
    if amax == np.inf:
        return BIAS
    mantissa, power = math.frexp(float(amax))
    return max(-BIAS, min(BIAS, power - 3 + (1 if mantissa > 0.75 else 0)))


@njit(nogil=True, cache=True)
def nearest(tensor: np.ndarray, first: int, last: int, codes: np.ndarray, exponent: np.ndarray,
            diff: np.ndarray) -> None:  # pragma: no cover - compiled
    """Groups ``first`` to ``last`` of the logical float32 matrix ``tensor`` [groups * 32, columns]
    (logical rows ``32 * first`` on) rounded to nearest, as ``mxfp4._nearest_torch``: each
    group's exponent into ``exponent`` (int32 [columns, groups]), each value's code, sign in bit
    3, into ``codes`` (uint8, as ``tensor``); where ``diff`` has rows, the rounded values minus
    the values into it ([rows of the band, columns]). Each pass runs along a logical row."""
    width = tensor.shape[1]
    amax, nan = np.empty(width, np.float32), np.empty(width, np.bool_)
    scale, unscale = np.empty(width, np.float32), np.empty(width, np.float32)
    with_diff = diff.shape[0] > 0
    for g in range(first, last):
        amax[:] = 0.0
        nan[:] = False
        for row in range(g * GROUP, (g + 1) * GROUP):
            for i in range(width):
                m = abs(tensor[row, i])
                nan[i] |= math.isnan(m)
                amax[i] = max(amax[i], m)
        for i in range(width):
            e = _exponent(amax[i], nan[i])
            exponent[i, g] = e
            scale[i], unscale[i] = POWER[e + BIAS], POWER[BIAS - e]
        for row in range(g * GROUP, (g + 1) * GROUP):
            for i in range(width):
                v = tensor[row, i]
                y = v * unscale[i]
                m = abs(y)
                # the code counts the midpoints below m (those at 0.25, 1.25, 2.5 and 5 are ties that go
                # down, to an even code; 0.75, 1.75 and 3.5 go up), and so does its value: exact sums
                low = np.int32(m > 0.25) + np.int32(m >= 0.75) + np.int32(m > 1.25) + np.int32(m >= 1.75)
                high = np.int32(m > 2.5) + np.int32(m >= 3.5)
                top = np.int32(m > 5.0)
                codes[row, i] = (low + high + top) | (np.int32(np.copysign(np.float32(1.0), y) < 0) << 3)
                if with_diff:
                    value = np.float32(0.5) * np.float32(low) + np.float32(high) + np.float32(2.0) * np.float32(top)
                    diff[row - first * GROUP, i] = np.copysign(value, y) * scale[i] - v


@njit(nogil=True, cache=True)
def _candidate(tensor: np.ndarray, codes: np.ndarray, exponent: np.ndarray, row: int,
               col: int) -> tuple[np.float32, np.float32, np.float32, np.uint8]:  # pragma: no cover - compiled
    """The wanted, nearest and other value and the other neighbour's code of one element."""
    e = exponent[col, row // GROUP]
    scale, unscale = POWER[e + BIAS], POWER[BIAS - e]
    w, code = tensor[row, col], codes[row, col]
    magnitude = code & 7
    wanted, held = abs(w * unscale), E2M1[magnitude]
    o = np.uint8((magnitude + ((wanted > held) & (magnitude < 7)) - (wanted < held)) | (code & 8))
    return w, VALUE[code] * scale, VALUE[o] * scale, o


@njit(nogil=True, cache=True)
def candidates(tensor: np.ndarray, codes: np.ndarray, exponent: np.ndarray, at: np.ndarray, across: bool, start: int,
               n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """The wanted, nearest and other values ([candidates, columns] float32, for ``balance``) and the
    other neighbours' codes of the candidates ``at`` in ``n`` columns from ``start``, in the
    logical layout of ``nearest``: logical rows ``at`` and columns from ``start`` (``across``:
    r runs down each group), or logical columns ``at`` and rows from ``start`` (r runs along
    the logical rows)."""
    k = at.shape[0]
    x = np.empty((k, n), np.float32)
    near = np.empty((k, n), np.float32)
    other = np.empty((k, n), np.float32)
    other_code = np.empty((k, n), np.uint8)
    for c in range(k):
        for j in range(n):
            row, col = (at[c], start + j) if across else (start + j, at[c])
            x[c, j], near[c, j], other[c, j], other_code[c, j] = _candidate(tensor, codes, exponent, row, col)
    return x, near, other, other_code


@njit(nogil=True, cache=True)
def decode(blocks: np.ndarray, scales: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """The logical matrix ``out`` (float32 [groups * 32, rows]) of the stored ``blocks`` (uint8
    [rows, groups * 16]) and ``scales`` (uint8 [rows, groups]), as ``MXFP4.decode``: a group at a
    time down all the rows, so that the writes run along 32 logical rows at once."""
    height, groups = scales.shape
    for g in range(groups):
        for i in range(height):
            scale = POWER[scales[i, g]]
            for b in range(GROUP // 2):
                byte = blocks[i, g * 16 + b]
                out[g * GROUP + 2 * b, i] = VALUE[byte & 15] * scale
                out[g * GROUP + 2 * b + 1, i] = VALUE[byte >> 4] * scale


@njit(nogil=True, cache=True)
def pack(codes: np.ndarray, blocks: np.ndarray) -> None:  # pragma: no cover - compiled
    """The codes of the logical layout (uint8 [groups * 32, rows]) two to a byte in the stored one
    (uint8 [rows, groups * 16]), the even one low."""
    for g in range(codes.shape[0] // GROUP):
        for i in range(codes.shape[1]):
            for b in range(GROUP // 2):
                blocks[i, g * 16 + b] = codes[g * GROUP + 2 * b, i] | (codes[g * GROUP + 2 * b + 1, i] << 4)
