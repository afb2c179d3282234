"""The method.md invariants of every built-in strategy, on random matrices of several shapes and dtypes."""
from __future__ import annotations

import pytest
import torch

from rewriter.engine.edit import TensorEdit
from rewriter.plugins.strategies import (
    BUILTIN,
    biprojected_direction,
    norm_preserving,
    projected_direction,
    standard_direction,
    subtractive,
)
from tests.helpers import random_measurements

SHAPES = [(64, 96), (96, 64), (257, 31)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def unit(d: int, seed: int = 0) -> torch.Tensor:
    r = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return r / r.norm()


def edit(update, r: torch.Tensor, scale: float, axis: int = 0) -> TensorEdit:
    return TensorEdit("w", axis, scale, r, update)


@pytest.mark.parametrize("shape", SHAPES)
def test_norm_preserving_keeps_column_norms_and_removes_direction_fp32(shape: tuple[int, int]) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    r = unit(shape[0])
    out, zeroed = norm_preserving(w.clone(), r.float(), 1.0)
    assert zeroed == 0
    torch.testing.assert_close(out.norm(dim=0), w.norm(dim=0), rtol=1e-5, atol=1e-6)
    assert (r.float() @ out).abs().max() < 1e-5 * w.norm(dim=0).max()
    assert not torch.allclose(out, w)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("by_column", [False, True], ids=["row-major", "columns-contiguous"])
def test_norm_preserving_matches_the_textbook_formula(shape: tuple[int, int], by_column: bool) -> None:
    """Also on the transposed view the engine passes for an edit along a tensor's last axis
    (fused experts), which the kernels walk column by column."""
    w = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    r = unit(shape[0], 5)
    alpha = 0.7
    n = w.norm(dim=0, keepdim=True)
    d = w / n
    d2 = d - alpha * torch.outer(r, r @ d)
    expected = d2 / d2.norm(dim=0, keepdim=True) * n
    work = w.T.contiguous().T if by_column else w.clone()
    out, _ = norm_preserving(work, r, alpha)
    assert out.data_ptr() == work.data_ptr() and out.stride() == work.stride()  # in place, layout kept
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", [s.name for s in BUILTIN])
def test_every_strategy_in_every_dtype(shape: tuple[int, int], dtype: torch.dtype, name: str) -> None:
    strategy = next(s for s in BUILTIN if s.name == name)
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(6)) * 0.05).to(dtype)
    r = unit(shape[0], 7)
    out, zeroed = edit(strategy.update_weight, r, 1.0).apply(w)
    assert out.dtype == dtype and out.shape == w.shape and zeroed == 0
    w32, o32 = w.float(), out.float()
    tol = TOL[dtype]
    if name == "householder":  # the reflection: r^T W' = -r^T W, column norms kept
        expected = w32 - 2 * torch.outer(r.float(), r.float() @ w32)
        torch.testing.assert_close(o32, expected.to(dtype).float(), rtol=tol, atol=tol * w32.abs().max())
        torch.testing.assert_close(o32.norm(dim=0), w32.norm(dim=0), rtol=tol * 4, atol=tol * 1e-2)
        return
    # r^T W' = 0 at alpha = 1, to the stored dtype's precision
    assert (r.float() @ o32).abs().max() <= tol * w32.norm(dim=0).max() * 4
    if name == "norm-preserving":
        torch.testing.assert_close(o32.norm(dim=0), w32.norm(dim=0), rtol=tol, atol=tol * 1e-2)
    else:
        expected = w32 - torch.outer(r.float(), r.float() @ w32)
        torch.testing.assert_close(o32, expected.to(dtype).float(), rtol=tol, atol=tol * w32.abs().max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("update", [subtractive, norm_preserving])
def test_alpha_zero_leaves_weights_exactly(dtype: torch.dtype, update) -> None:
    w = torch.randn(48, 40, generator=torch.Generator().manual_seed(8)).to(dtype)
    out, zeroed = edit(update, unit(48), 0.0).apply(w)
    assert torch.equal(out.view(torch.uint8), w.view(torch.uint8)) and zeroed == 0


def test_partial_alpha_leaves_part_of_the_direction() -> None:
    w = torch.randn(32, 20, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    r = unit(32, 10)
    out, _ = subtractive(w.clone(), r, 0.25)
    torch.testing.assert_close(r @ out, 0.75 * (r @ w))


def test_column_parallel_to_direction_is_zeroed_and_counted() -> None:
    r = unit(16, 11).float()
    w = torch.randn(16, 6, generator=torch.Generator().manual_seed(12))
    w[:, 2] = 3.0 * r
    w[:, 4] = -0.5 * r
    w[:, 5] = 0.0  # an all-zero column stays zero and is not counted
    out, zeroed = norm_preserving(w.clone(), r, 1.0)
    assert zeroed == 2
    assert torch.equal(out[:, 2], torch.zeros(16)) and torch.equal(out[:, 4], torch.zeros(16))
    assert torch.equal(out[:, 5], torch.zeros(16))
    keep = [0, 1, 3]
    torch.testing.assert_close(out[:, keep].norm(dim=0), w[:, keep].norm(dim=0))


def test_axis_other_than_zero_edits_the_residual_axis() -> None:
    """A fused expert tensor [E, d_ff, d_model] has the residual on axis 2."""
    d = 24
    w = torch.randn(3, 10, d, generator=torch.Generator().manual_seed(13))
    r = unit(d, 14)
    out, _ = edit(norm_preserving, r, 1.0, axis=2).apply(w)
    assert (out.double() @ r).abs().max() < 1e-5
    torch.testing.assert_close(out.norm(dim=2), w.norm(dim=2))


def test_bias_update_is_subtractive_for_every_strategy() -> None:
    """Biases are updated subtractively, and reflected by householder (so that the whole output
    of the layer, W x + b, is reflected)."""
    b = torch.randn(32, generator=torch.Generator().manual_seed(15))
    r = unit(32, 16)
    for s in BUILTIN:
        out, _ = edit(s.update_bias, r, 1.0).apply(b)
        factor = 2.0 if s.name == "householder" else 1.0
        torch.testing.assert_close(out, b - factor * r.float() * (r.float() @ b))


def test_direction_refinements_follow_method_md() -> None:
    m = random_measurements(40, 6, seed=2)
    r = m.harmful[3] - m.harmless[3]
    assert torch.equal(standard_direction(m, 3, 5), r)
    h3 = m.harmless[3] / m.harmless[3].norm()
    h5 = m.harmless[5] / m.harmless[5].norm()
    p = projected_direction(m, 3, 5)
    assert abs(float(p @ h3)) < 1e-12
    torch.testing.assert_close(p, r - (r @ h3) * h3)
    b = biprojected_direction(m, 3, 5)
    assert abs(float(b @ h5)) < 1e-12
    torch.testing.assert_close(b, p - (p @ h5) * h5)
    torch.testing.assert_close(biprojected_direction(m, 3, 3), projected_direction(m, 3, 3), rtol=0, atol=1e-12)
    assert p.dtype == b.dtype == torch.float64


def test_two_pass_gram_schmidt_survives_near_parallel_vectors() -> None:
    """With harmful and harmless means nearly parallel, one pass leaves a visible harmless component."""
    width = 512
    g = torch.Generator().manual_seed(17)
    harmless = torch.randn(width, generator=g, dtype=torch.float64) * 1e4
    harmful = harmless * 1.001 + torch.randn(width, generator=g, dtype=torch.float64) * 1e-3
    from rewriter.directions import Measurements

    m = Measurements({0: harmful}, {0: harmless})
    p = projected_direction(m, 0, 0)
    h = harmless / harmless.norm()
    assert abs(float(p @ h)) / float(p.norm()) < 1e-12


@pytest.mark.parametrize("axis, shape", [(0, (48, 5000)), (1, (4100, 48)), (0, (48,))])
@pytest.mark.parametrize("name", [s.name for s in BUILTIN])
def test_chunks_on_threads_give_the_bits_of_one_thread(monkeypatch: pytest.MonkeyPatch, axis: int,
                                                       shape: tuple[int, ...], name: str) -> None:
    """Columns are edited in chunks fixed by the shape, so the thread count never changes a bit
    (verify recomputes on one thread), and the chunked edit is the whole-matrix one."""
    from concurrent.futures import ThreadPoolExecutor

    from rewriter.engine import edit as edit_module
    strategy = next(s for s in BUILTIN if s.name == name)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(11), dtype=torch.bfloat16)
    r = unit(shape[axis], 12)
    update = strategy.update_bias if len(shape) == 1 else strategy.update_weight
    e = edit(update, r, 0.9, axis)
    monkeypatch.setattr(edit_module, "COLUMNS", 1000)  # several chunks, the last one partial
    inline, _ = e.apply(w.clone())
    with ThreadPoolExecutor(3) as pool:
        threaded, _ = e.apply(w.clone(), pool=pool)
        in_place, _ = e.apply(w.clone(), in_place=True, pool=pool)
    assert torch.equal(inline, threaded) and torch.equal(inline, in_place)
    whole = w.float().movedim(axis, 0).reshape(shape[axis], -1).clone()
    expected = update(whole, r.float(), 0.9)[0].reshape(w.movedim(axis, 0).shape).movedim(0, axis)
    torch.testing.assert_close(inline.float(), expected.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)
    assert not torch.equal(inline, w)
