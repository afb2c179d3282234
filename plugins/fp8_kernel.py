"""Block FP8's decoding and re-rounding of a group of columns at the candidate rows, compiled
by numba (the ``fast`` extra; the eager torch code in ``fp8`` is the reference, and the tests
hold the two to the same bytes).

In torch, gathering a group's candidates, finding each one's other e4m3 neighbour, scaling
both and storing the chosen codes back take some twenty passes over temporaries; here they
are one pass that feeds ``Rounding.switch_codes`` (``switch_kernel``'s selection and store). (They
are called from Python, not from one compiled function: numba's cache of a function does
not notice a change to another module's function it calls.)
"""
from __future__ import annotations

import numpy as np
from numba import njit

E4M3_MAX = np.float32(448.0)


@njit(nogil=True, cache=True)
def candidates(tensor: np.ndarray, scale: np.ndarray, codes: np.ndarray, rows: np.ndarray, block: tuple[int, int],
               axis: int, start: int, n: int, values: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """The wanted, nearest and other values ([candidates, columns] float32, for ``balance``) and the
    other neighbours' codes of the elements at ``rows`` along ``axis`` in the ``n`` columns from
    ``start`` across it, of the float32 matrix ``tensor`` whose nearest e4m3 codes (uint8) are
    ``codes``, scaled by ``scale`` per ``block``; ``values``: the float32 value of each code."""
    k = rows.shape[0]
    x = np.empty((k, n), np.float32)
    near = np.empty((k, n), np.float32)
    other = np.empty((k, n), np.float32)
    other_code = np.empty((k, n), np.uint8)
    across = np.empty(n, np.int64)  # each column's block across the axis (no division per element)
    for j in range(n):
        across[j] = (start + j) // block[1 - axis]
    for i in range(k):
        along = rows[i] // block[axis]
        for j in range(n):
            row, col = (rows[i], start + j) if axis == 0 else (start + j, rows[i])
            w, code = tensor[row, col], np.int64(codes[row, col])
            s = scale[along, across[j]] if axis == 0 else scale[across[j], along]
            y = w / s
            if y > E4M3_MAX:  # clamped as torch clamps: NaN stays NaN
                y = E4M3_MAX
            elif y < -E4M3_MAX:
                y = -E4M3_MAX
            magnitude = code & 0x7F
            wanted, held = abs(y), abs(values[code])
            step = (1 if wanted > held and magnitude < 0x7E else 0) - (1 if wanted < held else 0)
            sign = (0x80 if np.copysign(np.float32(1.0), y) < 0 else 0) if magnitude == 0 else code & 0x80
            o = np.uint8(sign | ((magnitude + step) & 0xFF))
            x[i, j] = w
            near[i, j] = values[code] * s
            other[i, j] = values[o] * s
            other_code[i, j] = o
    return x, near, other, other_code


@njit(nogil=True, cache=True)
def decode(codes: np.ndarray, scale: np.ndarray, block: tuple[int, int], values: np.ndarray,
           out: np.ndarray) -> None:  # pragma: no cover - compiled
    """The float32 values of e4m3 ``codes`` (uint8 [rows, columns]) times their blocks' ``scale``."""
    for i in range(codes.shape[0]):
        for b in range(scale.shape[1]):
            s = scale[i // block[0], b]
            for j in range(b * block[1], min((b + 1) * block[1], codes.shape[1])):
                out[i, j] = values[codes[i, j]] * s
