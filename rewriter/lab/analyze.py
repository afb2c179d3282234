"""analyze: per-layer metrics of a direction file, a chart, and a heuristic plan.

Per measurement layer N (docs/method.md): ||r_N||, snr = ||r|| / max(||harmful||, ||harmless||),
dissimilarity = 1 - cos(harmful, harmless), quality = snr * dissimilarity, and the
stability cos(r_N, r_{N+1}).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..directions import Measurements
from ..errors import AbliterateError
from ..plan import Plan, PlanEntry


@dataclass(frozen=True)
class LayerMetrics:
    layer: int
    norm: float
    snr: float
    dissimilarity: float
    quality: float
    cos_next: float  # nan where undefined: the last layer, or a zero direction


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(a, b); nan when either is zero (e.g. r_0, when every prompt ends in the same token)."""
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na and nb else math.nan


def layer_metrics(m: Measurements) -> list[LayerMetrics]:
    out = []
    for n in m.layers:
        bad, good = m.harmful_mean(n), m.harmless_mean(n)
        r = m.direction(n)
        denom = max(float(bad.norm()), float(good.norm()))
        snr = float(r.norm()) / denom if denom else 0.0
        dissim = 1.0 - _cos(bad, good)  # the means are never zero (checked when read)
        nxt = _cos(r, m.direction(n + 1)) if n + 1 in m.harmful else math.nan
        out.append(LayerMetrics(n, float(r.norm()), snr, dissim, snr * dissim, nxt))
    return out


def candidates(metrics: list[LayerMetrics], count: int = 3) -> list[int]:
    """Measurement-layer candidates: the best local maxima of quality (peaks of the curve)."""
    q = [x.quality for x in metrics]
    peaks = [i for i in range(len(q)) if (i == 0 or q[i] >= q[i - 1]) and (i == len(q) - 1 or q[i] >= q[i + 1])]
    return sorted((metrics[i].layer for i in sorted(peaks, key=lambda i: -q[i])[:count]))


def suggest_plan(metrics: list[LayerMetrics], num_layers: int, *, min_cos: float = 0.6, scale: float = 1.0,
                 skip_last: int = 1) -> Plan:
    """A simple heuristic, made explicit (docs/method.md).

    1. The measurement layer m is the layer of highest quality, leaving out the last
       ``skip_last`` layers (directions there mostly describe the output vocabulary).
    2. The edited range grows from m towards earlier layers while consecutive directions
       stay aligned (cos(r_N, r_N+1) >= min_cos), and towards later ones likewise, never
       past the last decoder layer.
    Every layer in the range uses m's direction at ``scale``.
    """
    by_layer = {x.layer: x for x in metrics}
    pool = [x for x in metrics if x.layer < num_layers - skip_last] or metrics
    if not pool:
        raise AbliterateError("the direction file has no layers")
    m = max(pool, key=lambda x: x.quality).layer
    lo = m
    while lo - 1 in by_layer and by_layer[lo - 1].cos_next >= min_cos:
        lo -= 1
    hi = m
    while hi + 1 < num_layers and hi in by_layer and by_layer[hi].cos_next >= min_cos:
        hi += 1
    return Plan(tuple(PlanEntry(n, m, scale) for n in range(lo, hi + 1)))


def table(metrics: list[LayerMetrics]) -> Iterable[str]:
    """The metrics, one row per layer, in fixed precision; '-' where a value is undefined."""
    marks = set(candidates(metrics))
    yield f"{'layer':>5} {'|r|':>10} {'snr':>8} {'1-cos':>8} {'quality':>9} {'cos(r,r+1)':>10}"
    for x in metrics:
        flag = "  <- candidate" if x.layer in marks else ""
        yield (f"{x.layer:>5} {x.norm:>10.4f} {x.snr:>8.4f} {x.dissimilarity:>8.4f} {x.quality:>9.5f} "
               f"{_fixed(x.cos_next, 10, 3)}{flag}")


def _fixed(value: float, width: int, places: int) -> str:
    return f"{'-':>{width}}" if math.isnan(value) else f"{value:>{width}.{places}f}"


def chart(metrics: list[LayerMetrics], path: Path, title: str = "", plan: Plan | None = None,
          plan_label: str = "plan") -> None:
    """Four curves per layer (quality, snr, dissimilarity, adjacent-layer cosine), the candidate
    measurement layers dashed, and a plan's measurement layer and edited range marked, named
    ``plan_label`` in the legend (say which plan: the one applied, or a suggestion)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AbliterateError("--chart needs matplotlib: pip install -e '.[charts]'") from None
    layers = [x.layer for x in metrics]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    series = [("quality = snr x (1 - cos)", [x.quality for x in metrics]), ("snr", [x.snr for x in metrics]),
              ("dissimilarity 1 - cos(harmful, harmless)", [x.dissimilarity for x in metrics]),
              ("stability cos(r_N, r_N+1)", [x.cos_next for x in metrics])]
    marks = candidates(metrics)
    for ax, (name, ys) in zip(axes.flat, series):
        ax.plot(layers, ys, marker="o", markersize=3, label=name.split(" ")[0])
        if plan is not None:  # under the candidates: a wide pale line, so that a dashed candidate on it shows
            edited = [e.layer for e in plan.entries]
            ax.axvspan(min(edited) - 0.5, max(edited) + 0.5, color="tab:green", alpha=0.1,
                       label=f"edited layers ({plan_label})")
            ax.axvline(plan.entries[0].measurement, color="tab:green", linewidth=4, alpha=0.45, zorder=1,
                       label=f"measurement layer ({plan_label})")
        for i, c in enumerate(marks):
            ax.axvline(c, color="tab:red", alpha=0.7, linestyle="--", zorder=3,
                       label="candidate measurement layer" if i == 0 else None)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8, loc="best")
    for ax in axes[1]:
        ax.set_xlabel("measurement layer N (hidden_states[N])")
    fig.suptitle(f"refusal direction by layer: {title}" if title else "refusal direction by layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
