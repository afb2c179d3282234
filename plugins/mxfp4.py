"""MXFP4 (OCP microscaling, as gpt-oss ships its experts): ``NAME_blocks`` and ``NAME_scales``.

``NAME_blocks`` is uint8 [..., R, G, 16]: each row's G groups of 32 FP4 (e2m1) values,
two to a byte, the even element in the low nibble. ``NAME_scales`` is uint8 [..., R, G]:
one power-of-two scale per group, as an exponent biased by 127 (e8m0). transformers
loads the pair as ``NAME`` with the last two axes swapped, [..., G * 32, R]: that is the
logical tensor the architecture map names.

Re-encoding picks each group's exponent afresh as the smallest that brings the group's
largest magnitude within 6 (the largest e2m1 value), so that nothing saturates, and rounds
every value to the nearest e2m1 value, ties to even.
"""
from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import Any, NamedTuple

from rewriter import compiled
from rewriter.codec import Packed
from rewriter.engine.threads import run_each
from rewriter.errors import AbliterateError
from rewriter.hookspecs import hookimpl
from rewriter.io.safetensors_io import TensorEntry
from rewriter.lazy import torch
from rewriter.rounding import Choose, Rounding, pick

GROUP = 32
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitudes by 3-bit code; bit 3 is the sign
BIAS = 127
CHUNK = 1 << 18  # elements rounded at once: the temporaries stay in cache
BAND = 4 * GROUP  # logical rows rounded to nearest at once, on the edit threads: a band's temporaries stay in cache


class MXFP4:
    name = "mxfp4"
    summary = "MXFP4 experts (gpt-oss): *_blocks of e2m1 pairs with *_scales, one e8m0 exponent per 32 values"

    def matches(self, quantization: Mapping[str, Any]) -> bool:
        return quantization.get("quant_method") == "mxfp4"

    def packed(self, quantization: Mapping[str, Any], entries: Mapping[str, TensorEntry]) -> list[Packed]:
        found = []
        for name, blocks in entries.items():
            if not name.endswith("_blocks"):
                continue
            head = name[: -len("_blocks")]
            scales = entries.get(head + "_scales")
            if scales is None:
                raise AbliterateError(f"{name}: no {head}_scales beside these blocks")
            if (blocks.dtype, scales.dtype) != ("U8", "U8") or len(blocks.shape) < 4 or blocks.shape[-1] != GROUP // 2 \
                    or tuple(scales.shape) != tuple(blocks.shape[:-1]):
                raise AbliterateError(
                    f"{name}: {blocks.dtype_name} {list(blocks.shape)} with scales {scales.dtype_name} "
                    f"{list(scales.shape)}; MXFP4 stores uint8 [..., rows, groups, 16] with uint8 [..., rows, groups]")
            *lead, rows, groups, _ = blocks.shape
            found.append(Packed(head, (name, scales.name), (*lead, groups * GROUP, rows)))
        return found

    def decode(self, packed: Packed, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        *lead, rows, groups, _ = parts[packed.parts[0]].shape
        return self.decode_into(packed, parts, torch.empty(*lead, groups * GROUP, rows))

    def decode_into(self, packed: Packed, parts: Mapping[str, torch.Tensor], out: torch.Tensor,
                    pool: Executor | None = None) -> torch.Tensor:  # one slice: too small to split
        blocks, scales = parts[packed.parts[0]], parts[packed.parts[1]]
        decode = compiled.kernel("rewriter.plugins.mxfp4_kernel", "decode")
        if decode is not None and out.is_contiguous() and out.dtype == torch.float32:
            for m in itertools.product(*map(range, blocks.shape[:-3])):
                decode(blocks[m].flatten(-2).numpy(), scales[m].numpy(), out[m].numpy())
            return out
        # each byte's two values at once, as one int64 of two float32 (the low nibble's first,
        # as the bytes lie): one lookup with int32 indices, 2x as fast as decoding each nibble
        values = _pairs().index_select(0, blocks.reshape(-1).to(torch.int32)).view(torch.float32)
        values = values.view(*blocks.shape[:-1], GROUP)
        values *= _power_of_two(scales.to(torch.int32) - BIAS).unsqueeze(-1)
        return out.copy_(values.flatten(-2).transpose(-1, -2))

    def encode(self, packed: Packed, tensor: torch.Tensor, like: Mapping[str, torch.Tensor],
               rounding: Rounding | None = None) -> dict[str, torch.Tensor]:
        tensor = tensor.contiguous()
        *lead, height, width = tensor.shape
        across = _across(rounding, tensor.dim())
        kernels = _kernels(rounding)
        codes = torch.empty(tensor.shape, dtype=torch.uint8)  # the logical layout, sign in bit 3
        exponent = torch.empty((*lead, width, height // GROUP), dtype=torch.int32)  # the stored layout
        nearest = _nearest_compiled(kernels.nearest) if kernels is not None else _nearest_torch

        def band(start: int) -> torch.Tensor | None:
            """Round ``BAND`` logical rows to nearest; with a rounding, return what that added along r."""
            diff = nearest(tensor, start, min(start + BAND, height), codes, exponent, rounding is not None)
            return rounding.band_total(diff, start) if rounding is not None and diff is not None else None

        pool = rounding.pool if rounding is not None else None  # the edit threads
        totals = run_each(pool, band, range(0, height, BAND))
        if rounding is not None:
            residual = rounding.residual(tensor)
            for start, total in zip(range(0, height, BAND), totals):  # in band order: the same bits on any threads
                if total is not None:
                    rounding.add_total(residual, total, start)
            if kernels is not None:
                _round_compiled(tensor, codes, exponent, residual, rounding, across, kernels.candidates)
            else:
                _round_torch(tensor, codes, exponent, residual, rounding, across)
        if kernels is not None:
            blocks = torch.empty((*lead, width, height // 2), dtype=torch.uint8)
            for m in itertools.product(*map(range, lead)):
                kernels.pack(codes[m].numpy(), blocks[m].numpy())
        else:
            stored = codes.transpose(-1, -2)
            blocks = (stored[..., 0::2] | (stored[..., 1::2] << 4)).contiguous()
        return {packed.parts[0]: blocks.view(*lead, width, height // GROUP, GROUP // 2),
                packed.parts[1]: (exponent + BIAS).to(torch.uint8)}


def _across(rounding: Rounding | None, dims: int) -> bool:
    """Whether ``r`` runs along the logical axis -2 (down each group: gpt-oss's ``gate_up_proj``),
    not along the logical last axis (the stored rows: its ``down_proj``)."""
    if rounding is None:
        return False
    axis = rounding.axis % dims
    if axis < dims - 2:
        raise AbliterateError(f"MXFP4 keeps a direction out along one of its last two axes, not axis {axis}")
    return axis == dims - 2


def _exponent(amax: torch.Tensor) -> torch.Tensor:
    """Each group's exponent: the smallest e with ``amax <= 6 * 2^e`` (so nothing saturates), exact
    from the float's own exponent (a float32 log2 is not, a few ulps above a power of two);
    -127 for a group of zeros (or NaN), 127 for inf."""
    mantissa, power = torch.frexp(amax)
    # amax = m * 2^k, m in [0.5, 1): 6 * 2^(k-3) = 0.75 * 2^k covers m <= 0.75, 6 * 2^(k-2) the rest
    exponent = power.sub_(3).add_(mantissa > 0.75)
    exponent = torch.where(amax > 0, exponent, -BIAS).masked_fill_(amax == torch.inf, BIAS)
    return exponent.clamp_(-BIAS, BIAS).to(torch.int32)


# (tensor, first row, last row, codes, exponent, with diff) -> rounded minus wanted of those rows, or None
Nearest = Callable[["torch.Tensor", int, int, "torch.Tensor", "torch.Tensor", bool], "torch.Tensor | None"]


def _nearest_torch(tensor: torch.Tensor, start: int, stop: int, codes: torch.Tensor, exponent: torch.Tensor,
                   diff: bool) -> torch.Tensor | None:
    """Round logical rows [start, stop) (whole groups) to nearest into ``codes`` and ``exponent``,
    in eager torch: the reference ``mxfp4_kernel.nearest`` is held to. With ``diff``, return
    the rounded values minus the values ([..., stop - start, columns])."""
    groups = tensor[..., start:stop, :].unflatten(-2, (-1, GROUP))  # [..., groups, 32, columns]
    e = _exponent(torch.maximum(groups.amax(-2), groups.amin(-2).neg_()))  # no band-sized |values|
    exponent[..., start // GROUP : stop // GROUP] = e.transpose(-1, -2)
    scale, unscale = _power_of_two(e).unsqueeze(-2), _power_of_two(-e).unsqueeze(-2)
    scaled = groups * unscale
    band = _round_e2m1(scaled) | _negative(scaled)
    codes[..., start:stop, :] = band.flatten(-3, -2)
    return _magnitude(band).mul_(scale).sub_(groups).flatten(-3, -2) if diff else None


def _nearest_compiled(kernel: Callable[..., Any]) -> Nearest:
    """``_nearest_torch`` by ``mxfp4_kernel.nearest``, a matrix of a stack at a time: the same bits."""
    def nearest(tensor: torch.Tensor, start: int, stop: int, codes: torch.Tensor, exponent: torch.Tensor,
                diff: bool) -> torch.Tensor | None:
        out = torch.empty((*tensor.shape[:-2], stop - start if diff else 0, tensor.shape[-1]))
        for m in itertools.product(*map(range, tensor.shape[:-2])):
            kernel(tensor[m].numpy(), start // GROUP, stop // GROUP, codes[m].numpy(), exponent[m].numpy(),
                   out[m].numpy())
        return out if diff else None

    return nearest


def _candidates(tensor: torch.Tensor, codes: torch.Tensor, exponent: torch.Tensor, at: torch.Tensor,
                across: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The wanted values, nearest codes, scales and unscales of the candidates ``at`` along the
    rounding's axis, each shaped like ``tensor.index_select(axis, at)``."""
    axis = -2 if across else -1
    if across:  # exponent [..., columns, groups] -> [..., k, columns]
        e = exponent.index_select(-1, torch.div(at, GROUP, rounding_mode="floor")).transpose(-1, -2)
    else:  # [..., k, groups] -> [..., rows, k]
        e = exponent.index_select(-2, at).transpose(-1, -2).repeat_interleave(GROUP, -2)
    return tensor.index_select(axis, at), codes.index_select(axis, at), _power_of_two(e), _power_of_two(-e)


def _round_torch(tensor: torch.Tensor, codes: torch.Tensor, exponent: torch.Tensor, residual: torch.Tensor,
                 rounding: Rounding, across: bool) -> None:
    """Re-round ``codes`` (nearest) at the rounding's candidates to the values it chooses between
    each one's nearest and other neighbour: only they are gathered and get their other
    neighbour. Each chosen element stores the code of its chosen neighbour."""
    wanted, near, scale, unscale = _candidates(tensor, codes, exponent, rounding.rows, across)
    near_value = _magnitude(near).mul_(scale)
    other = _other_code(near & 7, wanted.mul(unscale).abs_()) | (near & 8)
    chosen = rounding.choose_at(residual, wanted, near_value, _magnitude(other).mul_(scale))
    switched = chosen.view(torch.int32) != near_value.view(torch.int32)
    codes.index_copy_(-2 if across else -1, rounding.rows, pick(switched, other, near))


def _round_compiled(tensor: torch.Tensor, codes: torch.Tensor, exponent: torch.Tensor, residual: torch.Tensor,
                    rounding: Rounding, across: bool, candidates: Callable[..., Any]) -> None:
    """``_round_torch`` by ``mxfp4_kernel.candidates`` and ``Rounding.switch_codes``, a group of
    columns at a time (``Rounding.choose_each``) and a matrix of a stack at a time: the same bytes."""
    at = rounding.rows.numpy()
    for m in itertools.product(*map(range, tensor.shape[:-2])):
        _round_matrix_compiled(tensor[m].numpy(), codes[m].numpy(), exponent[m].numpy(), residual[m], at, across,
                               rounding, candidates)


def _round_matrix_compiled(values: Any, codes: Any, exponent: Any, residual: torch.Tensor, at: Any, across: bool,
                           rounding: Rounding, candidates: Callable[..., Any]) -> None:
    """``_round_compiled`` of one matrix (numpy views of its values, codes and exponents)."""
    def work(cols: slice, choose: Choose) -> None:
        found = candidates(values, codes, exponent, at, across, cols.start, cols.stop - cols.start)
        rounding.switch_codes(codes, 0 if across else 1, cols, residual, *found)

    rounding.choose_each(residual, residual.numel(), work)


class _Kernels(NamedTuple):
    """``mxfp4_kernel``'s compiled functions."""

    nearest: Callable[..., Any]
    candidates: Callable[..., Any]
    pack: Callable[..., Any]


def _kernels(rounding: Rounding | None) -> _Kernels | None:
    """``mxfp4_kernel``'s kernels, or None where any is missing (no numba, or ``ABLITERATE_TORCH_ONLY``),
    or where the rounding's compiled selection is."""
    found = [compiled.kernel("rewriter.plugins.mxfp4_kernel", name) for name in _Kernels._fields]
    kernels = [k for k in found if k is not None]
    if len(kernels) < len(found) or (rounding is not None and not rounding.switches_compiled):
        return None
    return _Kernels(*kernels)


@functools.cache
def _pairs() -> torch.Tensor:
    """[256] int64: the float32 values of a byte's two codes, low nibble then high, in one int64."""
    byte = torch.arange(256, dtype=torch.uint8)
    return torch.stack([_magnitude(byte & 0x0F), _magnitude(byte >> 4)], -1).view(torch.int64).squeeze(1)


def _power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """2 ** exponent, float32 (exact: a power of two, subnormal at -127)."""
    return torch.exp2(exponent.to(torch.float32))


def _magnitude(codes: torch.Tensor) -> torch.Tensor:
    """The value of each 4-bit code (bit 3 the sign) as float32, 4x as fast as a table lookup
    (whose int64 indices cost more than the rest): an e2m1 code is a float16's bits shifted
    down by 9, sign apart (the same exponent bias but for a factor 2^14, subnormals too)."""
    def values(part: torch.Tensor) -> torch.Tensor:
        bits = part.to(torch.int16)
        bits = ((bits & 0x7) << 9) | ((bits & 0x8) << 12)
        return bits.view(torch.float16).to(torch.float32).mul_(2.0**14)

    return _in_chunks(values, codes, torch.float32)


def _other_code(codes: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """The magnitude code next to ``codes`` on the other side of ``magnitude`` (the same where it is on the grid)."""
    value = _magnitude(codes)
    up = (magnitude > value) & (codes < len(E2M1) - 1)
    # a step up or down, in integer arithmetic (torch.where is slower here)
    return (codes + up).sub_((magnitude < value).to(torch.uint8))


def _round_e2m1(values: torch.Tensor) -> torch.Tensor:
    """The 3-bit code of the e2m1 magnitude nearest each value's magnitude, ties to the even
    code, saturating at 6 (the sign is ``_negative``'s).

    From 1 up, e2m1 is a float with one mantissa bit whose exponent and mantissa fields,
    read together, are the code plus 252 in a float32's top bits: rounding the 22 bits below
    to nearest, ties to even, is an integer add, and the shift gives the code. Below 1 the
    grid is fixed-point (steps of 0.5): twice the magnitude rounded by the float32 add of
    2^23, ties to even, whose low bits are then the code. In chunks, no torch.round or
    torch.where: 2.1x as fast as the three float roundings it replaces, and the same code for every
    float32 from 0 to 16 (checked exhaustively when written; the tests check every tie).
    """
    def codes(part: torch.Tensor) -> torch.Tensor:
        m = part.abs()  # here, in cache: a whole tensor's magnitudes cost an allocation and a pass
        bits = m.view(torch.int32)
        high = (bits >> 22).bitwise_and_(1).add_(bits).add_(0x1FFFFF).bitwise_right_shift_(22)
        low = (m * 2).add_(2.0**23).view(torch.int32).sub_(0x4B000000)
        # low where m < 1, else high: an integer blend, as exact and 6x as fast as torch.where here
        return high.sub_(252).clamp_(max=len(E2M1) - 1).sub_(low).mul_(m >= 1).add_(low)

    return _in_chunks(codes, values, torch.uint8)


def _negative(scaled: torch.Tensor) -> torch.Tensor:
    """Bit 3 of each value's code: its sign."""
    return torch.signbit(scaled).to(torch.uint8) << 3


def _in_chunks(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``f`` of ``x``'s elements, ``CHUNK`` at a time into a ``dtype`` tensor shaped like ``x``: the
    temporaries of an elementwise function of several passes then stay in cache."""
    out = torch.empty(x.shape, dtype=dtype)
    flat, into = x.reshape(-1), out.view(-1)
    for start in range(0, flat.numel(), CHUNK):
        into[start : start + CHUNK] = f(flat[start : start + CHUNK])
    return out


@hookimpl
def abliterate_codecs() -> list[MXFP4]:
    return [MXFP4()]
