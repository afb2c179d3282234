"""FP8 weights with a grid of scales: DeepSeek-style block FP8 and compressed-tensors FP8.

Both store a weight as float8_e4m3fn values ``q`` and float scales ``s``, one per block of
``(rows, cols)`` elements over the last two axes (blocks at the edges may be partial), and
the weight is ``q * s``. They differ in the scale's name and in how the block is chosen:

- ``quant_method: fp8`` (DeepSeek-V3/R1, Kimi-K2, GLM-4.5-FP8, MiniMax-M2, Qwen3-FP8):
  ``weight_scale_inv``, blocks of ``weight_block_size`` (128 x 128).
- ``quant_method: compressed-tensors`` in ``float-quantized`` format: ``weight_scale``,
  blocks from the weights' ``strategy``: one per tensor, per output channel, per group of
  ``group_size`` inputs, or ``block_structure``.

Re-encoding computes each block's scale afresh as its largest magnitude over 448 (the
largest finite e4m3 value), stored in the scale's own dtype, and rounds ``w / s`` to the
nearest e4m3 value (ties to even, as torch converts), saturating at +-448.
"""
from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from rewriter import compiled
from rewriter.codec import Packed
from rewriter.engine.threads import run_each
from rewriter.errors import AbliterateError
from rewriter.hookspecs import hookimpl
from rewriter.io.safetensors_io import TensorEntry
from rewriter.lazy import torch
from rewriter.rounding import Choose, Rounding, pick

E4M3_MAX = 448.0
SCALE_DTYPES = ("F32", "BF16", "F16")
BAND_ROWS = 128  # rows handled at once (whole blocks): temporaries stay a band tall
CONVERT = 1 << 20  # elements converted from float8 at once

# (quantization_config, weight rows, weight cols) -> (block rows, block cols)
BlockOf = Callable[[Mapping[str, Any], int, int], "tuple[int, int]"]


@dataclass(frozen=True)
class BlockScaledFP8:
    """An FP8 format with a scale per block; ``block_of`` reads the block size from the config."""

    name: str
    summary: str
    method: str
    scale_suffix: str
    block_of: BlockOf
    formats: tuple[str, ...] = ()  # accepted values of the config's ``format`` (compressed-tensors)

    def matches(self, quantization: Mapping[str, Any]) -> bool:
        if quantization.get("quant_method") != self.method:
            return False
        return not self.formats or quantization.get("format") in self.formats

    def packed(self, quantization: Mapping[str, Any], entries: Mapping[str, TensorEntry]) -> list[Packed]:
        found = []
        for name, scale in entries.items():
            if not name.endswith("." + self.scale_suffix):
                continue
            head = name[: -len(self.scale_suffix)]
            weight = entries.get(head + "weight")
            if weight is None:
                raise AbliterateError(f"{name}: no {head}weight beside this scale")
            block = self._check(quantization, weight, scale)
            attached = tuple(n for n in (head + "input_scale",) if n in entries)
            found.append(Packed(weight.name, (weight.name, scale.name), weight.shape, attached, block))
        return found

    def _check(self, quantization: Mapping[str, Any], weight: TensorEntry, scale: TensorEntry) -> tuple[int, int]:
        """The weight's block shape, once its dtypes and the scale grid's shape are checked."""
        if weight.dtype != "F8_E4M3" or len(weight.shape) < 2:
            raise AbliterateError(f"{weight.name}: {weight.dtype_name} {list(weight.shape)}; {self.name} stores "
                                  "weights as float8_e4m3fn matrices")
        if scale.dtype not in SCALE_DTYPES:
            raise AbliterateError(f"{scale.name}: scales of dtype {scale.dtype_name} are not supported by the "
                                  f"{self.name} codec (float32, bfloat16 or float16)")
        rows, cols = weight.shape[-2:]
        block = self.block_of(quantization, rows, cols)
        grid = (*weight.shape[:-2], -(-rows // block[0]), -(-cols // block[1]))
        if tuple(scale.shape) != grid and not (grid == (1, 1) and tuple(scale.shape) in {(), (1,)}):
            raise AbliterateError(f"{scale.name} has shape {list(scale.shape)}; blocks of {list(block)} over "
                                  f"{list(weight.shape)} need {list(grid)}")
        return block

    def decode(self, packed: Packed, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.decode_into(packed, parts, torch.empty(parts[packed.parts[0]].shape, dtype=torch.float32))

    def decode_into(self, packed: Packed, parts: Mapping[str, torch.Tensor], out: torch.Tensor,
                    pool: Executor | None = None) -> torch.Tensor:
        q, s = parts[packed.parts[0]], parts[packed.parts[1]]
        grid = _as_grid(s, q.shape).to(torch.float32)
        height = _band_height(packed.block[0])

        decode = compiled.kernel("rewriter.plugins.fp8_kernel", "decode")

        def band(item: tuple[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
            index, (rows, grid_rows) = item
            codes = q.narrow(-2, index * height, rows.shape[-2])
            if decode is not None:
                for m in itertools.product(*map(range, rows.shape[:-2])):  # a matrix of a stack at a time
                    decode(codes[m].view(torch.uint8).numpy(), grid_rows[m].contiguous().numpy(), tuple(packed.block),
                           _e4m3_table(), rows[m].numpy())
                return
            _e4m3_values(codes, rows) if rows.is_contiguous() else rows.copy_(_e4m3_values(codes))  # a stack's band
            blocks, scale = _by_block(rows, grid_rows, packed.block)
            blocks.mul_(scale)

        run_each(pool, band, list(enumerate(_bands(out, grid, packed.block[0]))))
        return out

    def encode(self, packed: Packed, tensor: torch.Tensor, like: Mapping[str, torch.Tensor],
               rounding: Rounding | None = None) -> dict[str, torch.Tensor]:
        q_like, s_like = like[packed.parts[0]], like[packed.parts[1]]
        if rounding is not None and rounding.axis % tensor.dim() < tensor.dim() - 2:
            raise AbliterateError(f"{packed.name}: an edit along axis {rounding.axis % tensor.dim()} of a "
                                  f"{tensor.dim()}-D block-FP8 weight; the rounding works along one of its last two")
        grid = torch.empty(_as_grid(s_like, q_like.shape).shape, dtype=s_like.dtype)

        def scale_band(band: tuple[torch.Tensor, torch.Tensor]) -> None:
            rows, grid_rows = band
            amax = _block_amax(rows, packed.block)
            grid_rows.copy_(torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax)))

        pool = rounding.pool if rounding is not None else None  # the edit threads
        run_each(pool, scale_band, _bands(tensor, grid, packed.block[0]))
        q = torch.empty(tensor.shape, dtype=q_like.dtype)
        height = _band_height(packed.block[0])

        def nearest_band(band: tuple[int, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor | None:
            """Round one band to nearest; with a rounding, return what that added along r (while
            the band is in cache)."""
            index, (rows, grid_rows) = band
            q_rows = q.narrow(-2, index * height, rows.shape[-2])
            q_rows.copy_(_scaled(rows, grid_rows, packed.block))
            if rounding is None:
                return None
            blocks, scale = _by_block(_e4m3_values(q_rows), grid_rows, packed.block)
            return rounding.band_total(blocks.mul_(scale).view(rows.shape).sub_(rows), index * height)

        totals = run_each(pool, nearest_band, list(enumerate(_bands(tensor, grid, packed.block[0]))))
        if rounding is not None:
            residual = rounding.residual(tensor)
            for index, total in enumerate(totals):  # in band order: the same bits on any number of threads
                if total is not None:
                    rounding.add_total(residual, total, index * height)
            self._round_candidates(packed, tensor, grid, q, rounding, residual)
        return {packed.parts[0]: q, packed.parts[1]: grid.reshape(s_like.shape)}

    def _round_candidates(self, packed: Packed, tensor: torch.Tensor, grid: torch.Tensor, q: torch.Tensor,
                          rounding: Rounding, residual: torch.Tensor) -> None:
        """Re-round ``q`` (nearest e4m3 codes of ``tensor``) at the rounding's candidate rows, to the
        values it chooses between each element's nearest value and its other neighbour: a group
        of columns at a time (``Rounding.choose_each``), each matrix of a stack on its own."""
        axis = rounding.axis % tensor.dim()
        scale = grid.to(torch.float32)
        for lead in itertools.product(*map(range, tensor.shape[:-2])):
            _round_matrix(tensor[lead], scale[lead], q[lead].view(torch.uint8), packed.block, axis - len(lead),
                          rounding, residual[lead])


def _round_matrix(tensor: torch.Tensor, scale: torch.Tensor, q: torch.Tensor, block: tuple[int, ...], axis: int,
                  rounding: Rounding, residual: torch.Tensor) -> None:
    """``_round_candidates`` of one matrix (``q``: its codes as uint8, ``scale``: its float32 grid):
    each group's candidates are gathered, rounded both ways and stored back while in cache, by
    ``fp8_kernel.candidates`` and ``Rounding.switch_codes`` where numba is installed. Each
    element stores the code of the neighbour chosen (not the chosen value re-rounded, which a
    scale of a float32 subnormal could move)."""
    across, at = 1 - axis, rounding.rows
    gather = compiled.kernel("rewriter.plugins.fp8_kernel", "candidates")

    def work(cols: slice, choose: Choose) -> None:
        if gather is not None and rounding.switches_compiled:
            stored = q.numpy()
            found = gather(tensor.numpy(), scale.numpy(), stored, at.numpy(), tuple(block), axis, cols.start,
                           cols.stop - cols.start, _e4m3_table())
            rounding.switch_codes(stored, axis, cols, residual, *found)
            return
        n = cols.stop - cols.start
        first = cols.start // block[across]
        blocks = -(-cols.stop // block[across]) - first
        s = (scale.index_select(axis, torch.div(at, block[axis], rounding_mode="floor")).narrow(across, first, blocks)
             .repeat_interleave(block[across], across).narrow(across, cols.start - first * block[across], n))
        wanted = tensor.narrow(across, cols.start, n).index_select(axis, at)
        codes = q.narrow(across, cols.start, n).index_select(axis, at)
        near = _e4m3_values(codes)
        other_codes = _other_e4m3(codes.view(torch.float8_e4m3fn), near, (wanted / s).clamp_(-E4M3_MAX, E4M3_MAX))
        other = _e4m3_values(other_codes).mul_(s)
        near.mul_(s)
        # [candidates, columns] for the rounding: the transposed views where the candidates run along rows
        chosen = choose(*(t if axis == 0 else t.t() for t in (wanted, near, other)))
        switched = (chosen if axis == 0 else chosen.t()).view(torch.int32) != near.view(torch.int32)
        q.narrow(across, cols.start, n).index_copy_(axis, at, pick(switched, other_codes.view(torch.uint8), codes))

    rounding.choose_each(residual, tensor.shape[across], work)


def _scaled(rows: torch.Tensor, grid_rows: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
    """``rows`` over their blocks' scales, within the e4m3 range (converted to e4m3 by the caller's copy)."""
    blocks, scale = _by_block(rows, grid_rows, block)
    return (blocks / scale).clamp_(-E4M3_MAX, E4M3_MAX).view(rows.shape)


def _by_block(rows: torch.Tensor, grid_rows: torch.Tensor, block: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """A view of ``rows`` and each element's block scale (float32) that broadcast against each
    other: [..., blocks, rows per block, blocks, columns per block] against a scale per block
    where whole blocks tile a contiguous band (3x faster than widening the scales), else
    ``rows`` itself and the scales widened over it."""
    *lead, height, width = rows.shape
    scale = grid_rows.to(torch.float32)
    if height % block[0] or width % block[1] or not (rows.is_contiguous() and scale.is_contiguous()):
        return rows, _widen(scale, rows.shape, block)
    tiles = (height // block[0], block[0], width // block[1], block[1])
    return rows.view(*lead, *tiles), scale.view(*lead, tiles[0], 1, tiles[2], 1)


def _other_e4m3(near: torch.Tensor, near_value: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The e4m3 value next to ``near`` (of value ``near_value``) on the other side of ``y`` (``near``
    itself where y is on the grid or beyond the largest value): one step of the magnitude code,
    which is monotonic in the magnitude."""
    bits = near.view(torch.uint8)
    magnitude = bits & 0x7F
    wanted, held = y.abs(), near_value.abs()
    away = (wanted > held) & (magnitude < 0x7E)
    step = away.to(torch.uint8) - (wanted < held).to(torch.uint8)  # 1, 0 or 255 (uint8: -1)
    sign = pick(magnitude == 0, torch.signbit(y).to(torch.uint8) << 7, bits & 0x80)
    return (sign | (magnitude + step)).view(torch.float8_e4m3fn)


def _as_grid(scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The scale as [..., grid rows, grid cols] (a per-tensor scale is a 1 x 1 grid)."""
    return scale.reshape(1, 1) if scale.dim() < 2 and len(shape) == 2 else scale


def _bands(t: torch.Tensor, grid: torch.Tensor, height: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Views of ``t`` over bands of whole blocks about ``BAND_ROWS`` tall, with the matching rows of ``grid``."""
    step = _band_height(height)
    blocks = step // height
    return [(t[..., start : start + step, :], grid[..., start // height : start // height + blocks, :])
            for start in range(0, t.shape[-2], step)]


def _band_height(height: int) -> int:
    """Rows in each band of ``_bands``: whole blocks of ``height`` rows, about ``BAND_ROWS`` in all."""
    return height * max(1, BAND_ROWS // height)


@functools.cache
def _e4m3_table() -> Any:
    """The float32 value of each of the 256 e4m3 codes (a numpy array, for the compiled kernel)."""
    return _e4m3_values(torch.arange(256, dtype=torch.uint8)).numpy()


def _e4m3_values(codes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """float8_e4m3fn values as float32 (into ``out``, contiguous, when given), as
    ``codes.to(torch.float32)`` makes them, in a third of its time: each code's bits shifted
    into a float16's (whose exponent is wider, so every e4m3 value, subnormals too, is one
    float16 times 2^8), NaN put back; a slice at a time, so that the integer temporaries
    stay in cache."""
    out = torch.empty(codes.shape, dtype=torch.float32) if out is None else out
    flat, src = out.view(-1), codes.reshape(-1).view(torch.uint8)
    for start in range(0, flat.numel(), CONVERT):
        bits = src[start : start + CONVERT].to(torch.int16)
        half = bits & 0x7F
        nan = int(half.amax()) == 0x7F  # (an ``any`` of a comparison takes 20 times as long)
        half.bitwise_left_shift_(7).bitwise_or_(bits.bitwise_and_(0x80).bitwise_left_shift_(8))
        part = flat[start : start + CONVERT].copy_(half.view(torch.float16)).mul_(256.0)
        if nan:
            part.masked_fill_((src[start : start + CONVERT] & 0x7F) == 0x7F, torch.nan)
    return out


def _widen(grid_rows: torch.Tensor, shape: torch.Size, block: tuple[int, ...]) -> torch.Tensor:
    """Grid values repeated over their blocks, cut to ``shape`` (edge blocks are partial)."""
    rows, cols = shape[-2:]
    return grid_rows.repeat_interleave(block[0], -2)[..., :rows, :].repeat_interleave(block[1], -1)[..., :cols]


def _block_amax(rows: torch.Tensor, block: tuple[int, ...]) -> torch.Tensor:
    """The largest magnitude in each block of a band of whole block rows."""
    # the larger of each column's largest and minus its smallest: no temporary of |rows|
    per_col = torch.stack([torch.maximum(b.amax(-2), b.amin(-2).neg_()) for b in rows.split(block[0], -2)], -2)
    pad = -per_col.shape[-1] % block[1]
    return torch.nn.functional.pad(per_col, (0, pad)).unflatten(-1, (-1, block[1])).amax(-1)


def _fp8_block(quantization: Mapping[str, Any], rows: int, cols: int) -> tuple[int, int]:
    block = quantization.get("weight_block_size")
    if block is None:
        return rows, cols  # one scale per tensor
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise AbliterateError(f"quantization_config: weight_block_size {block!r}; expected [rows, cols]")
    return block[0], block[1]


def _compressed_block(quantization: Mapping[str, Any], rows: int, cols: int) -> tuple[int, int]:
    groups = quantization.get("config_groups")
    weights = [g.get("weights") for g in groups.values() if isinstance(g, dict)] if isinstance(groups, dict) else []
    schemes = {json_key(w) for w in weights if isinstance(w, dict)}
    if len(schemes) != 1:
        raise AbliterateError("quantization_config: compressed-tensors config_groups with "
                              f"{len(schemes) or 'no'} weight schemes; the codec reads one")
    w = next(x for x in weights if isinstance(x, dict))
    if w.get("type") != "float" or w.get("num_bits") != 8 or w.get("symmetric") is False:
        raise AbliterateError(f"quantization_config: compressed-tensors weights {w.get('type')} "
                              f"{w.get('num_bits')}-bit; only symmetric float 8-bit weights can be re-encoded")
    strategy = w.get("strategy")
    if strategy == "tensor":
        return rows, cols
    if strategy == "channel":
        return 1, cols
    if strategy == "group" and isinstance(w.get("group_size"), int) and w["group_size"] > 0:
        return 1, w["group_size"]
    if strategy == "block":
        return _fp8_block({"weight_block_size": w.get("block_structure")}, rows, cols)
    raise AbliterateError(f"quantization_config: compressed-tensors weight strategy {strategy!r} is not supported")


def json_key(value: Mapping[str, Any]) -> str:
    """A hashable, order-independent form of a config object."""
    return json.dumps(value, sort_keys=True, default=str)


CODECS = [
    BlockScaledFP8("fp8", "block-scaled FP8 (DeepSeek-V3/R1, Kimi-K2, GLM-4.5, MiniMax-M2, Qwen3 FP8): "
                   "weight_scale_inv per 128 x 128 block", "fp8", "weight_scale_inv", _fp8_block),
    BlockScaledFP8("compressed-tensors-fp8", "compressed-tensors float-quantized FP8: weight_scale per tensor, "
                   "channel, group or block", "compressed-tensors", "weight_scale", _compressed_block,
                   formats=("float-quantized",)),
]


@hookimpl
def abliterate_codecs() -> list[BlockScaledFP8]:
    return CODECS
