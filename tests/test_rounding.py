"""Requantization after an edit: the grids are rounded to correctly, and the rounding that keeps
the direction out does so where rounding to nearest puts much of it back."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from rewriter.codec import Packed
from rewriter.errors import AbliterateError
from rewriter.plugins.fp8 import CODECS, _other_e4m3
from rewriter.plugins.mxfp4 import E2M1, MXFP4, _magnitude, _other_code, _power_of_two, _round_e2m1
from rewriter import compiled, rounding
from rewriter.rounding import Choose, Rounding, pick, sort_key


def test_e2m1_rounds_to_nearest_with_ties_to_even() -> None:
    """Against the grid itself: each magnitude's nearest value, the even code at a tie. Every
    midpoint (a tie) and the float32 on either side of it are checked, and values past 6."""
    grid = torch.tensor(E2M1)
    ties = torch.cat([(grid[:-1] + grid[1:]) / 2, grid, torch.tensor([6.5, 7.0, 1e3])])
    m = torch.cat([torch.linspace(0, 7, 7001), ties, torch.nextafter(ties, torch.tensor(0.0)),
                   torch.nextafter(ties, torch.tensor(1e9))])
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


def test_e2m1_values_are_the_table() -> None:
    """Every 4-bit code decodes to its table value, sign (of zero too) included, as a lookup did."""
    table = torch.tensor([*E2M1, *(-v for v in E2M1)])
    values = _magnitude(torch.arange(16, dtype=torch.uint8))
    assert torch.equal(values, table) and torch.equal(torch.signbit(values), torch.signbit(table))


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

    nearest = codec.decode(packed, codec.encode(packed, edited, like))
    kept = codec.decode(packed, codec.encode(packed, edited, like, Rounding(r, axis)))
    assert _left(nearest, r, axis) > 0.2 * _left(w, r, axis)  # rounding to nearest undoes much of the edit
    assert _left(kept, r, axis) < 0.01 * _left(w, r, axis)
    assert _error(kept, edited) < 1.3 * _error(nearest, edited)


def _reference_choose(r: torch.Tensor, axis: int, wanted: torch.Tensor, nearest: torch.Tensor,
                      other: torch.Tensor) -> torch.Tensor:
    """The rounding as first written (a full sort of every column's candidates, the residual
    in one float64 product): what the faster one must match."""
    rows = torch.topk(r.abs(), max(1, r.numel() // 4)).indices
    d, k = wanted.shape[axis], len(rows)
    x, q = (t.movedim(axis, 0).reshape(d, -1) for t in (wanted, nearest))
    o = other.movedim(axis, 0).reshape(k, -1)
    residual = r @ (q - x).double()
    xt, qt, ot = (t.t().contiguous() for t in (x[rows], q[rows], o))
    rf = r[rows].to(xt.dtype).unsqueeze(0)
    flip = ot - qt
    gain = rf * flip
    cost = (ot + qt - 2 * xt) * flip.sign() / rf.abs().clamp_min(torch.finfo(xt.dtype).tiny)
    want = residual.to(xt.dtype).unsqueeze(1)
    cost.masked_fill_(gain * want >= 0, torch.inf)
    best, idx = torch.sort(cost, dim=1, stable=True)  # ties: the lower candidate first
    g = gain.gather(1, idx).abs_().masked_fill_(torch.isinf(best), 0)
    before = g.cumsum(1) - g
    take = (before + g / 2 < want.abs()) & (g > 0)
    chosen = qt.scatter(1, idx, torch.where(take, ot.gather(1, idx), qt.gather(1, idx))).t()
    return chosen.reshape(other.movedim(axis, 0).shape).movedim(0, axis)


def _reference_fp8(packed: Packed, tensor: torch.Tensor, like: dict[str, torch.Tensor], r: torch.Tensor,
                   axis: int) -> torch.Tensor:
    """Block FP8 re-encoded as first written: the whole nearest tensor decoded, then chosen."""
    codec = CODECS[0]
    parts = codec.encode(packed, tensor, like)
    q, grid = parts["w"], parts["s"]
    nearest = q.to(torch.float32) * grid.repeat_interleave(128, 0).repeat_interleave(128, 1)
    rows = torch.topk(r.abs(), max(1, r.numel() // 4)).indices
    scale = grid.repeat_interleave(128, 0).repeat_interleave(128, 1).index_select(axis, rows)
    codes = q.index_select(axis, rows)
    y = (tensor.index_select(axis, rows) / scale).clamp_(-448, 448)
    other = _other_e4m3(codes, codes.to(torch.float32), y).to(torch.float32) * scale
    chosen = _reference_choose(r, axis, tensor, nearest, other)
    q.view(torch.uint8).index_copy_(axis, rows, (chosen / scale).clamp_(-448, 448).to(torch.float8_e4m3fn)
                                    .view(torch.uint8))
    return q.to(torch.float32) * grid.repeat_interleave(128, 0).repeat_interleave(128, 1)


def _edited(shape: tuple[int, ...], axis: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(unit r, a weight with a component along r, that weight with r removed in float64)."""
    r = torch.randn(shape[axis], dtype=torch.float64)
    r /= r.norm()
    w = torch.randn(shape) * 0.02 + (torch.randn(shape[1 - axis]) * 0.02).unsqueeze(axis) * r.float().unsqueeze(1 - axis)
    moved = w.double().movedim(axis, -1)
    return r, w, (moved - (moved @ r).unsqueeze(-1) * r).movedim(-1, axis).float()


def _left(x: torch.Tensor, r: torch.Tensor, axis: int) -> float:
    """Mean |r . w| over columns."""
    return float(torch.tensordot(x.double().movedim(axis, -1), r, dims=1).abs().mean())


def _error(x: torch.Tensor, edited: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x - edited) / torch.linalg.vector_norm(edited))


@pytest.mark.parametrize("axis", [0, 1])
def test_fast_fp8_rounding_matches_the_reference(axis: int) -> None:
    """Block FP8 rounded by the selecting, band-by-band rounding writes what the sorting one
    did (but for an element or two whose residual sum or cost ties differ), and keeps as
    little along r at no more error."""
    torch.manual_seed(1)
    shape = (1024, 2048)
    packed = Packed("w", ("w", "s"), shape, (), (128, 128))
    like = {"w": torch.empty(shape, dtype=torch.float8_e4m3fn), "s": torch.empty(8, 16)}
    r, w, edited = _edited(shape, axis)
    reference = _reference_fp8(packed, edited, like, r, axis)
    fast = CODECS[0].decode(packed, CODECS[0].encode(packed, edited, like, Rounding(r, axis)))
    assert float((fast != reference).float().mean()) < 1e-4
    assert _left(fast, r, axis) <= _left(reference, r, axis) * 1.01
    assert _error(fast, edited) <= _error(reference, edited) * 1.001
    assert _left(reference, r, axis) < 0.01 * _left(w, r, axis)  # the reference keeps r out: the comparison means something


def _groups(tensor: torch.Tensor) -> torch.Tensor:
    """The logical tensor [..., C, R] as stored rows of groups, [..., R, C / 32, 32]."""
    return tensor.transpose(-1, -2).contiguous().unflatten(-1, (-1, 32))


def _logical(rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return rows.flatten(-2).transpose(-1, -2).reshape(shape)


def _reference_mxfp4(tensor: torch.Tensor, r: torch.Tensor, axis: int, choose: Choose) -> torch.Tensor:
    """MXFP4 re-encoded as first written, decoded: every element's nearest and other value as
    whole logical tensors, then ``choose`` at the candidate rows."""
    exponent = MXFP4().encode(Packed("x", ("b", "s"), tuple(tensor.shape)), tensor, {})["s"].to(torch.int32) - 127
    scale, unscale = _power_of_two(exponent).unsqueeze(-1), _power_of_two(-exponent).unsqueeze(-1)
    scaled = _groups(tensor) * unscale
    codes = _round_e2m1(scaled.abs())
    sign = torch.where(torch.signbit(scaled), -scale, scale)
    nearest, other = (_logical(_magnitude(c) * sign, tensor.shape) for c in (codes, _other_code(codes, scaled.abs())))
    rows = torch.topk(r.abs(), max(1, r.numel() // 4)).indices
    return nearest.index_copy_(axis, rows, choose(tensor, nearest, other.index_select(axis, rows)))


@pytest.mark.parametrize("shape, axis", [((512, 4096), 1), ((3, 640, 96), 2)])
def test_mxfp4_rows_rounding_chooses_as_the_whole_tensor_rounding(shape: tuple[int, ...], axis: int) -> None:
    """Where r runs along the stored rows (gpt-oss's down_proj), only the candidate rows are
    rounded both ways: the values are exactly those of rounding the whole tensor both ways
    and choosing among the same candidates."""
    torch.manual_seed(5)
    r = torch.randn(shape[axis], dtype=torch.float64)
    r /= r.norm()
    w = torch.randn(shape) * 0.02
    codec, packed = MXFP4(), Packed("x", ("b", "s"), shape)
    rows = codec.decode(packed, codec.encode(packed, w, {}, Rounding(r, axis)))
    assert torch.equal(rows, _reference_mxfp4(w, r, axis, Rounding(r, axis).choose))
    assert not torch.equal(rows, codec.decode(packed, codec.encode(packed, w, {})))  # some switches were made


@pytest.mark.parametrize("axis", [0, 1])
def test_fast_mxfp4_rounding_is_as_good_as_the_reference(axis: int) -> None:
    """MXFP4's grid is coarse, so candidates often tie in cost, and the selection may order
    ties otherwise than the sort did: the switches differ, but as little is left along r
    at no more error."""
    torch.manual_seed(3)
    shape = (512, 4096) if axis == 1 else (4096, 512)
    r, w, edited = _edited(shape, axis)

    def choose(wanted: torch.Tensor, nearest: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return _reference_choose(r, axis, wanted, nearest, other)

    codec, packed = MXFP4(), Packed("x", ("b", "s"), shape)
    reference = _reference_mxfp4(edited, r, axis, choose)
    fast = codec.decode(packed, codec.encode(packed, edited, {}, Rounding(r, axis)))
    assert float((fast != reference).float().mean()) < 1e-3
    assert _left(fast, r, axis) <= _left(reference, r, axis) * 1.05
    assert _error(fast, edited) <= _error(reference, edited) * 1.001
    assert _left(reference, r, axis) < 0.01 * _left(w, r, axis)


def test_selection_makes_the_switches_of_a_full_sort() -> None:
    """The partial selection with its fallback chooses exactly as a sort of every candidate,
    also where a column needs more switches than the first selection holds."""
    torch.manual_seed(2)
    r = torch.randn(512, dtype=torch.float64)
    r /= r.norm()
    x = torch.randn(512, 300)
    step = torch.full_like(x, 0.25)
    nearest = torch.round(x / step) * step
    rows = torch.topk(r.abs(), 128).indices
    other = nearest[rows] + torch.where(x[rows] > nearest[rows], step[rows], -step[rows])
    nearest[:, :50] += 0.1 * r.float().unsqueeze(1) * 40  # columns far from their wanted value: many switches
    rounding = Rounding(r, 0)
    assert torch.equal(rounding.choose(x, nearest, other), _reference_choose(r, 0, x, nearest, other))


@pytest.mark.parametrize("axis", [1, 2])
def test_fp8_stack_rounds_each_matrix_as_alone(axis: int) -> None:
    """A block-FP8 weight with a leading axis is rounded matrix by matrix, each exactly as it
    would be stored alone (its candidates gathered a column group at a time), and an edit
    along the leading axis is refused."""
    torch.manual_seed(4)
    shape = (2, 384, 640)
    r = torch.randn(shape[axis], dtype=torch.float64)
    r /= r.norm()
    w = torch.randn(shape) * 0.02
    codec = CODECS[0]

    def encoded(t: torch.Tensor, dim: int) -> torch.Tensor:
        packed = Packed("w", ("w", "s"), tuple(t.shape), (), (128, 128))
        like = {"w": torch.empty(t.shape, dtype=torch.float8_e4m3fn),
                "s": torch.empty(*t.shape[:-2], 3, 5)}
        return codec.encode(packed, t, like, Rounding(r, dim))["w"].view(torch.uint8)

    alone = torch.stack([encoded(m, axis - 1) for m in w])
    assert torch.equal(encoded(w, axis), alone)
    assert not torch.equal(alone, encoded(w[0], axis - 1).expand_as(alone))  # the matrices differ: it means something
    r = torch.ones(2, dtype=torch.float64) / 2**0.5
    with pytest.raises(AbliterateError, match="along axis 0"):
        encoded(w, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.uint8, torch.int64])
def test_pick_is_torch_where_bit_for_bit(dtype: torch.dtype) -> None:
    """The bitwise select keeps every bit of the value it picks: -0.0, NaN payloads, inf."""
    torch.manual_seed(4)
    raw = torch.randint(0, 256, (2, 333, 8), dtype=torch.uint8)
    a, b = (raw[i].view(dtype) for i in range(2))
    mask = torch.rand(a.shape) < 0.5
    a_bytes, b_bytes = (t.unsqueeze(-1).view(torch.uint8) for t in (a, b))  # [..., bytes per element]
    expected = torch.where(mask.unsqueeze(-1), a_bytes, b_bytes)
    assert torch.equal(pick(mask, a, b).unsqueeze(-1).view(torch.uint8), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_sort_key_orders_as_the_floats(dtype: torch.dtype) -> None:
    """The integer keys the switch selection sorts compare as the costs do, for every pair of
    values (negatives, subnormals and infinities too); only -0.0 sorts just below +0.0."""
    torch.manual_seed(5)
    x = torch.cat([torch.randn(300) * 10.0 ** torch.randint(-40, 30, (300,)),
                   torch.tensor([0.0, float("inf"), -float("inf"), 1e-45, -1e-45, 3.0, 3.0])]).to(dtype)
    x = x[~((x == 0) & torch.signbit(x))]  # -0.0 from an underflow: the one pair whose order differs
    keys = sort_key(x.clone())
    assert keys.dtype.is_floating_point is False
    assert torch.equal(keys.unsqueeze(0) < keys.unsqueeze(1), x.unsqueeze(0) < x.unsqueeze(1))
    assert torch.equal(keys.unsqueeze(0) == keys.unsqueeze(1), x.unsqueeze(0) == x.unsqueeze(1))


@pytest.mark.parametrize("codec", ["fp8", "fp8-stack", "mxfp4"])
def test_codecs_decode_into_a_used_buffer_what_they_decode_afresh(codec: str) -> None:
    """The engine decodes each weight into one reused buffer (``decode_into``), FP8 band by band
    on the edit threads; what the buffer held before (NaN here) leaves no trace (FP8's
    partial edge blocks and a stack's bands, which are not contiguous, included)."""
    torch.manual_seed(6)
    if codec.startswith("fp8"):
        c, shape = CODECS[0], ((2, 300, 260) if codec == "fp8-stack" else (300, 260))
        packed = Packed("w", ("w", "s"), shape, (), (128, 128))
        parts = {"w": (torch.randn(shape) * 100).clamp(-448, 448).to(torch.float8_e4m3fn),
                 "s": torch.rand(*shape[:-2], 3, 3) + 0.5}
    else:
        c, shape = MXFP4(), (2, 96, 40)  # two experts' [groups * 32, rows]
        packed = Packed("w", ("w_blocks", "w_scales"), shape)
        parts = {"w_blocks": torch.randint(0, 256, (2, 40, 3, 16), dtype=torch.uint8),
                 "w_scales": torch.randint(118, 130, (2, 40, 3), dtype=torch.uint8)}
    used = torch.full(shape, torch.nan)
    with ThreadPoolExecutor(3) as pool:
        into = c.decode_into(packed, parts, used, pool)
    assert into.data_ptr() == used.data_ptr()
    assert torch.equal(into, c.decode(packed, parts))


@pytest.mark.parametrize("kind, axis", [("fp8", 0), ("fp8", 1), ("mxfp4", 0), ("mxfp4", 1)])
def test_compiled_rounding_writes_the_bytes_of_the_torch_one(kind: str, axis: int,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The numba switch selection (the ``fast`` extra, which the tests install) stores what the
    eager torch reference stores, byte for byte, for both codecs and both orientations."""
    assert compiled.kernel("rewriter.switch_kernel", "balance") is not None  # the kernel is under test
    torch.manual_seed(7)
    if kind == "fp8":
        codec, shape = CODECS[0], (1024, 640)
        packed = Packed("w", ("w", "s"), shape, (), (128, 128))
        like = {"w": torch.empty(shape, dtype=torch.float8_e4m3fn), "s": torch.empty(8, 5)}
    else:
        codec, shape, like = MXFP4(), ((512, 2048) if axis == 1 else (2048, 512)), {}
        packed = Packed("x", ("b", "s"), shape)
    r, _, edited = _edited(shape, axis)
    with ThreadPoolExecutor(2) as pool:
        fast = codec.encode(packed, edited, like, Rounding(r, axis, pool))
    monkeypatch.setattr(compiled, "kernel", lambda module, name: None)
    reference = codec.encode(packed, edited, like, Rounding(r, axis))
    assert fast.keys() == reference.keys()
    for name, part in reference.items():
        assert torch.equal(fast[name].view(torch.uint8), part.view(torch.uint8)), name
    assert not torch.equal(fast[packed.parts[0]].view(torch.uint8),
                           codec.encode(packed, edited, like)[packed.parts[0]].view(torch.uint8))  # switches made


def test_mxfp4_exponent_is_the_smallest_that_fits_six() -> None:
    """Each group's exponent is the smallest e with amax <= 6 * 2^e, checked by exact float64
    arithmetic at and one float32 either side of 6 * 2^e over the whole exponent range
    (where a float32 log2 rounded onto e and let amax saturate), subnormals, zero and inf."""
    from rewriter.plugins.mxfp4 import _exponent

    edges = torch.tensor([6.0 * 2.0**e for e in range(-130, 126)], dtype=torch.float64).float()
    edges = edges[edges > 0]
    amax = torch.cat([edges, torch.nextafter(edges, torch.tensor(0.0)), torch.nextafter(edges, torch.tensor(1e38)),
                      torch.tensor([1e-45, 1e-40, 3.0, 4.5, 448.0, 3e38, torch.finfo(torch.float32).max])])
    exponent = _exponent(amax)
    wide, fits = amax.double(), lambda e: amax.double() <= 6 * torch.pow(2.0, e.double())
    inside = (exponent > -127) & (exponent < 127)
    assert bool(fits(exponent)[inside].all()) and not bool(fits(exponent - 1)[inside].any())
    assert bool((wide[exponent == -127] <= 6 * 2.0**-127).all()) and bool((wide[exponent == 127] > 6 * 2.0**126).all())
    special = _exponent(torch.tensor([0.0, torch.inf, torch.nan]))
    assert special.tolist() == [-127, 127, -127]


@pytest.mark.parametrize("case", ["plain", "rounded along rows", "rounded across", "stack"])
def test_compiled_mxfp4_encoding_is_the_torch_bytes(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``mxfp4_kernel`` against the eager torch encoding on hostile values: NaN, inf, groups of
    zeros (-0.0 too), of float32 subnormals, of values at the e2m1 ties, near the largest
    float32, values on the grid; with and without a rounding, and for a stack of experts."""
    from rewriter.plugins.mxfp4 import _kernels

    assert _kernels(None) is not None  # the kernels are under test
    torch.manual_seed(11)
    shape = (3, 256, 96) if case == "stack" else (256, 96)
    packed = Packed("x", ("b", "s"), shape)
    w = torch.randn(shape) * 10.0 ** torch.randint(-3, 2, shape)
    w[..., 1::2] = MXFP4().decode(packed, MXFP4().encode(packed, w, {}))[..., 1::2]  # on the grid: no other neighbour
    group = w[..., :32, :]  # the first group down each column
    group[..., 0], group[..., 2] = 0.0, -0.0
    group[..., 4] = torch.randn(group[..., 4].shape) * 1e-40  # float32 subnormals
    group[..., 6] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0]).repeat(4)  # the e2m1 ties, at scale 1
    group[..., 8] = 3e38
    flat = w.view(-1)
    where = torch.randint(0, w.numel(), (60,))
    flat[where[:20]], flat[where[20:40]], flat[where[40:]] = torch.nan, torch.inf, -torch.inf
    packed = Packed("x", ("b", "s"), shape)
    rounding = None
    if case != "plain":
        axis = -2 if case == "rounded across" else -1
        r = torch.randn(shape[axis], dtype=torch.float64)
        rounding = Rounding(r / r.norm(), axis)
    fast = MXFP4().encode(packed, w, {}, rounding)
    monkeypatch.setattr(compiled, "kernel", lambda module, name: None)
    reference = MXFP4().encode(packed, w, {}, rounding)
    for name in ("b", "s"):
        assert torch.equal(fast[name], reference[name]), name
    assert int(reference["s"].min()) == 0 and int(reference["s"].max()) == 254  # the cases reached both ends


@pytest.mark.parametrize("case", ["plain", "rounded", "stack, bf16 scales", "one scale, partial blocks"])
def test_compiled_fp8_coding_is_the_torch_bytes(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The FP8 codec with ``fp8_kernel`` (decoding, and the re-rounding with ``rounded``) against
    eager torch on hostile values: every e4m3 tie and the float32 on either side of it,
    subnormals, zeros of both signs, values past 448, NaN and inf; a stack with bfloat16
    scales, one scale over partial blocks; the same bits."""
    assert compiled.kernel("rewriter.plugins.fp8_kernel", "decode") is not None
    torch.manual_seed(13)
    shape = (2, 256, 200) if case.startswith("stack") else (300, 260)
    block = (300, 260) if case.startswith("one") else (128, 128)
    grid = [-(-n // b) for n, b in zip(shape[-2:], block)]
    scale_dtype = torch.bfloat16 if "bf16" in case else torch.float32
    like = {"w": torch.empty(shape, dtype=torch.float8_e4m3fn), "s": torch.empty(*shape[:-2], *grid, dtype=scale_dtype)}
    packed = Packed("w", ("w", "s"), shape, (), block)
    grid_values = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid_values = torch.unique(grid_values[torch.isfinite(grid_values)])
    ties = (grid_values[:-1] + grid_values[1:]) / 2
    special = torch.cat([ties, torch.nextafter(ties, torch.tensor(-1e9)), torch.nextafter(ties, torch.tensor(1e9)),
                         grid_values, torch.tensor([0.0, -0.0, 1e-45, -1e-40, 447.9, 460.0, 480.0, 1e30,
                                                    torch.inf, -torch.inf, torch.nan, -torch.nan])])
    w = torch.randn(shape) * 10.0 ** torch.randint(-8, 3, shape)
    flat = w.view(-1)
    flat[: special.numel()] = special
    w[..., 127, 0] = 448.0  # the first block's scale is 1 (its largest magnitude): its ties stay ties
    rounding = None
    if case == "rounded":
        r = torch.randn(shape[0], dtype=torch.float64)
        rounding = Rounding(r / r.norm(), 0)
    codec = CODECS[0]
    fast = codec.encode(packed, w, like, rounding)
    fast_decoded = codec.decode(packed, fast)
    monkeypatch.setattr(compiled, "kernel", lambda module, name: None)
    reference = codec.encode(packed, w, like, rounding)
    for name in ("w", "s"):
        assert torch.equal(fast[name].view(torch.uint8), reference[name].view(torch.uint8)), name
    assert torch.equal(fast_decoded.view(torch.int32), codec.decode(packed, reference).view(torch.int32))
    assert bool(fast_decoded.isnan().any())


def test_compiled_mxfp4_decoding_is_the_torch_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """``mxfp4_kernel.decode`` against torch's: every byte, every scale (255 makes inf, and NaN
    of a zero), a stack of two experts, the same bits."""
    assert compiled.kernel("rewriter.plugins.mxfp4_kernel", "decode") is not None
    torch.manual_seed(12)
    blocks = torch.randint(0, 256, (2, 72, 8, 16), dtype=torch.uint8)
    blocks.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    scales = torch.randint(0, 256, (2, 72, 8), dtype=torch.uint8)
    scales.view(-1)[:4] = torch.tensor([0, 1, 254, 255], dtype=torch.uint8)
    packed, parts = Packed("x", ("b", "s"), (2, 256, 72)), {"b": blocks, "s": scales}
    fast = MXFP4().decode(packed, parts)
    monkeypatch.setattr(compiled, "kernel", lambda module, name: None)
    reference = MXFP4().decode(packed, parts)
    assert torch.equal(fast.view(torch.int32), reference.view(torch.int32))
    assert bool(reference.isnan().any()) and bool(reference.isinf().any())


@pytest.mark.parametrize("case", ["ties", "small gains", "hostile"])
def test_compiled_switches_order_ties_and_totals_as_torch(case: str) -> None:
    """The cases where the kernel's shortcuts could part from torch's full ordering: costs that
    tie (MXFP4's coarse grid makes many: the lower candidate goes first in both), a run of
    gains too small for float32 to resolve right at the residual (each tested as torch tests
    it, past the kernel's first few scans to its sort of the rest), and hostile values (NaN,
    inf, zero residuals, r over 32 decades): the same bits."""
    from rewriter.switch_kernel import balance

    torch.manual_seed(8)
    k, n = 64, 300
    if case == "ties":
        r = torch.where(torch.rand(k, 1) < 0.5, -0.125, 0.125)
        q = torch.randint(-8, 8, (k, n)) * 0.25
        x = q + torch.randint(-8, 9, (k, n)) / 64
        o = q + torch.where(x > q, 0.25, -0.25)
        residual = torch.randn(n, dtype=torch.float64) * 2
    elif case == "hostile":  # NaN and inf weights, values and residuals, gains below a unit of theirs, zeros
        r = torch.randn(k, 1) * 10.0 ** torch.randint(-30, 3, (k, 1))
        q = torch.randint(-8, 8, (k, n)) * 0.25
        x = q + torch.randn(k, n) / 16
        o = q + torch.where(x > q, 0.25, -0.25)
        for t, value in ((x, torch.nan), (q, -torch.nan), (o, torch.inf), (x, -torch.inf)):
            t.view(-1)[torch.randint(0, k * n, (40,))] = value
        residual = torch.randn(n, dtype=torch.float64) * 10.0 ** torch.randint(-12, 3, (n,))
        residual[:4] = torch.tensor([torch.nan, torch.inf, 0.0, -0.0], dtype=torch.float64)
    else:  # costs 1.2^i in candidate order; gains of 1 but for candidates 10-39, 1e-6
        i = torch.arange(k).unsqueeze(1)
        r = torch.where((i >= 10) & (i < 40), 1e-6, 1.0).float()
        q, o = torch.zeros(k, n), torch.ones(k, n)
        x = ((1 - 1.2 ** i.float() * r) / 2).expand(k, n).contiguous()
        residual = -10 * (1 + torch.linspace(0, 3e-6, n, dtype=torch.float64))  # 10 gains of 1, then the small ones
    expected, out = torch.empty(k, n), torch.empty(k, n)
    rounding._balance_torch(x, q, o, r, residual, expected)
    balance(x.numpy(), q.numpy(), o.numpy(), r.reshape(-1).numpy(), residual.numpy(), out.numpy())
    assert torch.equal(out.view(torch.int32), expected.view(torch.int32))
    switched = (expected != q).sum(0)
    assert int(switched.min()) < int(switched.max())  # columns differ in what they take: it means something
