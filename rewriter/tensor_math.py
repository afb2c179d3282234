"""Small numeric kernels shared by strategies and checks.

They walk a [d, n] matrix in blocks that are contiguous in memory, so that each block is
still in cache when its squares are summed and the only temporary is one block: blocks of
rows of a row-major matrix, or blocks of columns where each column is contiguous (the
transposed view the engine passes for an edit along a tensor's last axis).
"""
from __future__ import annotations

from .lazy import torch

ROWS = 32


def column_norms(w: torch.Tensor, rows: int = ROWS) -> torch.Tensor:
    """Euclidean norm of each column of a row-major [d, n] matrix.

    About 20 times faster than ``vector_norm(dim=0)`` on a [3840, 15360] float32 matrix,
    and closer to the float64 result.
    """
    if _by_column(w):
        return torch.cat([torch.linalg.vector_norm(block, dim=1) for block in _blocks(w.T, rows)])
    sums, tmp = _accumulators(w, rows)
    for block in _blocks(w, rows):
        _add_squares(block, sums, tmp)
    return sums.sqrt_()


def scale_columns_add_outer_(w: torch.Tensor, column_scale: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                             alpha: float, rows: int = ROWS) -> torch.Tensor:
    """``w <- w * column_scale + alpha * u v^T`` in place, in one pass; returns the new column norms."""
    if _by_column(w):
        norms = []
        for start, block in enumerate(_blocks(w.T, rows)):  # [columns, d]
            part = slice(start * rows, start * rows + block.shape[0])
            block.mul_(column_scale[part].unsqueeze(1)).addr_(v[part], u, alpha=alpha)
            norms.append(torch.linalg.vector_norm(block, dim=1))
        return torch.cat(norms)
    sums, tmp = _accumulators(w, rows)
    for start, block in enumerate(_blocks(w, rows)):
        block.mul_(column_scale).addr_(u[start * rows : start * rows + block.shape[0]], v, alpha=alpha)
        _add_squares(block, sums, tmp)
    return sums.sqrt_()


def _accumulators(w: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(w.shape[1], dtype=w.dtype), torch.empty(min(rows, w.shape[0]), w.shape[1], dtype=w.dtype)


def _blocks(w: torch.Tensor, rows: int) -> list[torch.Tensor]:
    return [w[start : start + rows] for start in range(0, w.shape[0], rows)]


def _add_squares(block: torch.Tensor, sums: torch.Tensor, tmp: torch.Tensor) -> None:
    sq = tmp[: block.shape[0]]
    torch.mul(block, block, out=sq)
    sums.add_(sq.sum(0))


def _by_column(w: torch.Tensor) -> bool:
    """Whether each column of ``w`` lies contiguous in memory (a transposed row-major matrix)."""
    return w.dim() == 2 and w.shape[0] > 1 and w.stride(0) == 1 and w.T.is_contiguous()
