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
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import Any

from rewriter.codec import Packed
from rewriter.errors import AbliterateError
from rewriter.hookspecs import hookimpl
from rewriter.io.safetensors_io import TensorEntry
from rewriter.lazy import torch
from rewriter.rounding import Rounding

GROUP = 32
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitudes by 3-bit code; bit 3 is the sign
BIAS = 127
CHUNK = 1 << 18  # elements rounded at once: the temporaries stay in cache


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
        # each byte's two values at once, as one int64 of two float32 (the low nibble's first,
        # as the bytes lie): one lookup with int32 indices, 2x as fast as decoding each nibble
        values = _pairs().index_select(0, blocks.reshape(-1).to(torch.int32)).view(torch.float32)
        values = values.view(*blocks.shape[:-1], GROUP)
        values *= _power_of_two(scales.to(torch.int32) - BIAS)
        return out.copy_(values.flatten(-2).transpose(-1, -2))

    def encode(self, packed: Packed, tensor: torch.Tensor, like: Mapping[str, torch.Tensor],
               rounding: Rounding | None = None) -> dict[str, torch.Tensor]:
        rows = _groups(tensor)
        amax = torch.maximum(rows.amax(-1), rows.amin(-1).neg_())  # no tensor-sized temporary of |rows|
        exponent = torch.where(amax > 0, torch.ceil(torch.log2(amax / E2M1[-1])), torch.full_like(amax, -BIAS))
        exponent = exponent.clamp_(-BIAS, BIAS).to(torch.int32)
        scale, unscale = _power_of_two(exponent), _power_of_two(-exponent)
        scaled = rows * unscale
        codes, negative = _round_e2m1(scaled), _negative(scaled)
        if rounding is not None and rounding.axis % tensor.dim() == tensor.dim() - 1:
            _round_rows(tensor, rows, scaled, codes, negative, scale, unscale, rounding)
        elif rounding is not None:  # the other neighbour of every element, then the choice at the candidates
            sign = torch.where(torch.signbit(scaled), -scale, scale)
            nearest, other = (_logical(_magnitude(c) * sign, tensor.shape) for c in (codes, _other_code(codes, scaled.abs())))
            axis = rounding.axis % tensor.dim()
            chosen = nearest.index_copy_(axis, rounding.rows,
                                         rounding.choose(tensor, nearest, other.index_select(axis, rounding.rows)))
            scaled = _groups(chosen) * unscale
            codes, negative = _round_e2m1(scaled), _negative(scaled)
        codes |= negative
        blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
        return {packed.parts[0]: blocks.contiguous(), packed.parts[1]: (exponent + BIAS).to(torch.uint8)}


def _round_rows(tensor: torch.Tensor, rows: torch.Tensor, scaled: torch.Tensor, codes: torch.Tensor,
                negative: torch.Tensor, scale: torch.Tensor, unscale: torch.Tensor, rounding: Rounding) -> None:
    """Re-round ``codes`` (nearest, [..., R, G, 32]) where ``r`` runs along the stored rows (the
    logical last axis: gpt-oss's ``down_proj``): the candidates are whole stored rows, so only
    they are gathered and get their other neighbour, in the stored layout, while what rounding
    to nearest added along ``r`` is summed from the whole tensor's nearest values once. The
    same choices as rounding the whole logical tensor both ways (which took 2.5x as long)."""
    residual = rounding.residual(tensor)
    rounding.add_band(residual, _logical(_magnitude(codes | negative).mul_(scale).sub_(rows), tensor.shape), 0)
    at = rounding.rows
    wanted, near, negative, magnitude, scale = (t.index_select(-3, at) for t in (rows, codes, negative, scaled, scale))
    other = _magnitude(_other_code(near, magnitude.abs_()) | negative).mul_(scale)
    shape = (*tensor.shape[:-1], len(at))
    chosen = rounding.choose_at(residual, *(_logical(t, shape) for t in (wanted, _magnitude(near | negative).mul_(scale),
                                                                          other)))
    chosen = chosen.transpose(-1, -2).unflatten(-1, (-1, GROUP))
    codes.index_copy_(-3, at, _round_e2m1(chosen.mul_(unscale.index_select(-3, at))))


@functools.cache
def _pairs() -> torch.Tensor:
    """[256] int64: the float32 values of a byte's two codes, low nibble then high, in one int64."""
    byte = torch.arange(256, dtype=torch.uint8)
    return torch.stack([_magnitude(byte & 0x0F), _magnitude(byte >> 4)], -1).view(torch.int64).squeeze(1)


def _power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """2 ** exponent per group, broadcast over its 32 values (exact: a power of two, subnormal at -127)."""
    return torch.exp2(exponent.to(torch.float32)).unsqueeze(-1)


def _groups(tensor: torch.Tensor) -> torch.Tensor:
    """The logical tensor [..., C, R] as stored rows of groups, [..., R, C / 32, 32]."""
    return tensor.transpose(-1, -2).contiguous().unflatten(-1, (-1, GROUP))


def _logical(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return rows.flatten(-2).transpose(-1, -2).reshape(shape)


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
