"""The built-in strategies (docs/method.md): standard, projected, biprojected, norm-preserving
and householder.

Directions are refined in float64 with two-pass Gram-Schmidt; weight updates run in the
compute dtype (float32 or float64) in place, with rank-1 updates, so that an edit needs
one working copy of the tensor and a few vectors beside it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from rewriter.hookspecs import hookimpl
from rewriter.lazy import torch
from rewriter.strategy import Strategy
from rewriter.tensor_math import column_norms, scale_columns_add_outer_

if TYPE_CHECKING:
    from rewriter.directions import Measurements
    from rewriter.engine.edit import TensorEdit


def _normalize(v: torch.Tensor) -> torch.Tensor:
    return v / torch.linalg.vector_norm(v)  # the means are checked non-zero when read


def remove_component(r: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """r minus its projection on ``unit``, done twice (two-pass Gram-Schmidt)."""
    for _ in range(2):
        r = r - (r @ unit) * unit
    return r


def standard_direction(m: Measurements, measurement: int, target: int) -> torch.Tensor:
    return m.measured_direction(measurement)


def projected_direction(m: Measurements, measurement: int, target: int) -> torch.Tensor:
    """Without the measurement layer's harmless component. A reference file's direction is used
    as its measure.py wrote it: that tool projects at measurement time (``--projected``) or not,
    and its ablation never projects at the measurement layer."""
    r = m.measured_direction(measurement)
    return r if m.reference is not None else remove_component(r, _normalize(m.harmless_mean(measurement)))


def biprojected_direction(m: Measurements, measurement: int, target: int) -> torch.Tensor:
    return remove_component(projected_direction(m, measurement, target), _normalize(m.harmless_mean(target)))


def subtractive(w: torch.Tensor, r: torch.Tensor, scale: float) -> tuple[torch.Tensor, int]:
    """W' = W - scale * r (r^T W), in place; ``w`` is [d_model, columns], ``r`` a unit vector."""
    if scale:
        w.addr_(r, r @ w, alpha=-scale)
    return w, 0


def norm_preserving(w: torch.Tensor, r: torch.Tensor, scale: float) -> tuple[torch.Tensor, int]:
    """Remove ``r`` from each column's direction and give every column back its norm.

    D = W / n; D' = D - scale r (r^T D), with the remainder norms measured in the same
    pass; W' = D' * n / ||D'||. A column left (numerically) parallel to ``r`` cannot keep
    its norm: it becomes zero and is counted.
    """
    if not scale:
        return w, 0
    tiny = torch.finfo(w.dtype).tiny
    norms = column_norms(w)
    inverse = 1.0 / norms.clamp_min(tiny)
    remainder = scale_columns_add_outer_(w, inverse, r, (r @ w) * inverse, -scale)
    degenerate = (remainder < torch.finfo(w.dtype).eps ** 0.5) & (norms > 0)
    factor = torch.where(degenerate, torch.zeros_like(norms), norms / remainder.clamp_min(tiny))
    w.mul_(factor)
    return w, int(degenerate.sum())


def householder(w: torch.Tensor, r: torch.Tensor, scale: float) -> tuple[torch.Tensor, int]:
    """W' = W - 2 scale r (r^T W): at scale 1 the Householder reflection (I - 2 r r^T) W, which keeps
    every column norm and turns the component along r around; at scale 1/2 the subtractive edit."""
    return subtractive(w, r, 2 * scale)


def removes_direction(edit: TensorEdit, before: torch.Tensor, after: torch.Tensor, tol: float) -> str | None:
    """At scale 1 nothing is written along the direction: |r^T w| / |w| <= tol for every column."""
    if edit.scale != 1.0 or not after.numel():
        return None
    return _along(edit, before, after, 0.0, tol)


def _along(edit: TensorEdit, before: torch.Tensor, after: torch.Tensor, factor: float, tol: float) -> str | None:
    """|r^T w' - factor r^T w| / |w'| <= tol for every column."""
    r = edit.direction.to(after.dtype)
    off = ((r @ after) - factor * (r @ before)).abs()
    worst = float((off / column_norms(after).clamp_min(1e-30)).max())
    if worst <= tol:
        return None
    if factor == 0:
        return f"still writes along the direction (|r^T w| / |w| up to {worst:.2e})"
    return f"its component along the direction is not {factor:g} times the source's (off by up to {worst:.2e} of |w|)"


def subtracts_along(edit: TensorEdit, before: torch.Tensor, after: torch.Tensor, tol: float) -> str | None:
    """A subtractive edit leaves (1 - scale) of each column's component along r, at any scale
    (a negative one, --invert, adds)."""
    return _along(edit, before, after, 1.0 - edit.scale, tol) if after.numel() else None


def reflects_along(edit: TensorEdit, before: torch.Tensor, after: torch.Tensor, tol: float) -> str | None:
    """A Householder edit leaves (1 - 2 scale) of each column's component along r."""
    return _along(edit, before, after, 1.0 - 2.0 * edit.scale, tol) if after.numel() else None


def keeps_column_norms(edit: TensorEdit, before: torch.Tensor, after: torch.Tensor, tol: float) -> str | None:
    """Every weight column keeps its norm, except those zeroed for being parallel to r (counted by
    rewrite): always for norm-preserving, at scale 1 (a reflection) for householder."""
    if not after.numel() or not (edit.update is norm_preserving or (edit.update is householder and edit.scale == 1)):
        return None
    old, new = column_norms(before), column_norms(after)
    kept = new > 0
    worst = float(((new - old).abs()[kept] / old[kept].clamp_min(1e-30)).max()) if kept.any() else 0.0
    return f"column norms changed (relative change up to {worst:.2e})" if worst > tol else None


BUILTIN = (
    Strategy("standard", "r = harmful - harmless mean; W -= r r^T W", standard_direction, subtractive, subtractive,
             (subtracts_along,)),
    Strategy(
        "projected",
        "r without its harmless component at the measurement layer; subtractive",
        projected_direction,
        subtractive,
        subtractive,
        (subtracts_along,),
    ),
    Strategy(
        "biprojected",
        "r also without the target layer's harmless component; subtractive",
        biprojected_direction,
        subtractive,
        subtractive,
        (subtracts_along,),
    ),
    Strategy(
        "norm-preserving",
        "biprojected r; column directions edited, column norms kept",
        biprojected_direction,
        norm_preserving,
        subtractive,
        (removes_direction, keeps_column_norms),
    ),
    Strategy(
        "householder",
        "biprojected r; W -= 2 r r^T W, the reflection that keeps column norms (llm-abliteration --householder)",
        biprojected_direction,
        householder,
        householder,
        (reflects_along, keeps_column_norms),
    ),
)


@hookimpl
def abliterate_strategies() -> list[Strategy]:
    return list(BUILTIN)
