"""Optional numba kernels (the ``fast`` extra): a kernel where numba is installed, else None.

Each kernel has an eager torch twin that stays the reference (the tests hold the two to the
same bytes) and runs where this returns None. ``ABLITERATE_TORCH_ONLY=1`` takes the torch
path with numba installed, to compare the two.
"""
from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from typing import Any


@functools.cache
def kernel(module: str, name: str) -> Callable[..., Any] | None:
    """``module.name`` (a numba-compiled function), or None without numba or with
    ``ABLITERATE_TORCH_ONLY`` set. Imported on first use: numba loads in about 0.4 s."""
    if os.environ.get("ABLITERATE_TORCH_ONLY"):
        return None
    try:
        found: Callable[..., Any] = getattr(importlib.import_module(module), name)
    except (ImportError, RuntimeError):  # no numba, or no writable place for its compiled cache
        return None
    return found
