"""Memory sizes and figures: ``--max-memory`` parsed, what the machine has free, what this process holds,
and whether a model's weights fit whole (else measure and evaluate stream them layer by layer)."""
from __future__ import annotations

import re
import resource
from dataclasses import dataclass
from pathlib import Path

from ..errors import AbliterateError

# Decimal units as transformers' and accelerate's max_memory read them; the binary ones spelled out.
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
         "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")
# The whole model is loaded when its weights take at most this share of the budget: the rest is for
# Python, torch, the activations and what loading itself allocates.
WHOLE_MODEL_SHARE = 0.7


def parse_size(text: str) -> int:
    """Bytes in ``text``: ``1GB``, ``512MB``, ``1.5GiB``, ``2000000`` (GB = 10^9, GiB = 2^30)."""
    m = _SIZE.match(text)
    unit = m.group(2).upper() if m else ""
    if not m or unit not in UNITS:
        raise AbliterateError(f"memory size '{text}' is not a number with a unit such as 512MB, 1GB or 1GiB")
    size = int(float(m.group(1)) * UNITS[unit])
    if size <= 0:
        raise AbliterateError(f"memory size '{text}' must be more than zero")
    return size


def human(n: float) -> str:
    """A byte count for a log line (decimal units, as --max-memory reads them)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo: what can be allocated without swapping (None off Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    """Resident memory of this process now (0 where /proc is missing)."""
    return _statm(1)


def address_space_bytes() -> int:
    """Virtual memory (address space) of this process now (0 where /proc is missing)."""
    return _statm(0)


def _statm(field: int) -> int:
    """Field ``field`` of /proc/self/statm, in bytes (0 where /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[field])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * resource.getpagesize()


def peak_rss_bytes() -> int:
    """Highest resident memory of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True)
class MemoryChoice:
    """Whether to stream, and the line that says why."""

    stream: bool
    reason: str


def choose(weights: int, max_memory: int | None) -> MemoryChoice:
    """Stream when the weights in the run dtype exceed 70% of the budget (--max-memory, else MemAvailable)."""
    budget = max_memory if max_memory is not None else available_bytes()
    where = "--max-memory" if max_memory is not None else "available memory"
    if budget is None:
        return MemoryChoice(False, f"weights {human(weights)}; available memory unknown: loading the whole model")
    stream = weights > WHOLE_MODEL_SHARE * budget
    verdict = "streaming the weights layer by layer" if stream else "loading the whole model"
    sign = ">" if stream else "<="
    return MemoryChoice(stream, f"weights {human(weights)} {sign} {WHOLE_MODEL_SHARE:.0%} of {where} "
                                f"{human(budget)}: {verdict}")
