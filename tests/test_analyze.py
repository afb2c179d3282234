"""analyze on a direction file whose metrics are computed by hand."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rewriter.lab.analyze import candidates, layer_metrics, suggest_plan
from rewriter.cli import main
from rewriter.directions import Measurements
from rewriter.plan import load_plan


@pytest.fixture()
def known(tmp_path: Path) -> Path:
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    m = Measurements({0: t(3, 4), 1: t(1, 0), 2: t(2, 2)}, {0: t(0, 4), 1: t(0, 1), 2: t(1, 1)}, 3, 3)
    m.save(tmp_path / "known.safetensors")
    return tmp_path / "known.safetensors"


def test_metrics_by_hand(known: Path) -> None:
    x = layer_metrics(Measurements.load(known))
    # layer 0: r = (3, 0); snr = 3 / 5; cos(harmful, harmless) = 16 / 20
    assert x[0].norm == pytest.approx(3) and x[0].snr == pytest.approx(0.6)
    assert x[0].dissimilarity == pytest.approx(0.2) and x[0].quality == pytest.approx(0.12)
    assert x[0].cos_next == pytest.approx(1 / math.sqrt(2))
    # layer 1: r = (1, -1); snr = sqrt(2) / 1; orthogonal means
    assert x[1].snr == pytest.approx(math.sqrt(2)) and x[1].quality == pytest.approx(math.sqrt(2))
    assert x[1].cos_next == pytest.approx(0)
    # layer 2: parallel means: no dissimilarity
    assert x[2].quality == pytest.approx(0) and math.isnan(x[2].cos_next)
    assert candidates(x) == [1]
    plan = suggest_plan(x, 3)
    assert [(e.layer, e.measurement) for e in plan.entries] == [(0, 1), (1, 1)]


def test_analyze_command_table_chart_and_plan(known: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["analyze", str(known), "--chart", str(tmp_path / "c.png"),
                                       "--suggest-plan", str(tmp_path / "plan.yml")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "quality" in lines[0]
    assert lines[2].split()[:5] == ["1", "1.4142", "1.4142", "1.0000", "1.41421"] and "candidate" in lines[2]
    assert lines[3].split()[5] == "-", "undefined cos(r_N, r_N+1) of the last layer is shown as -"
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plan = load_plan(tmp_path / "plan.yml")
    assert [e.layer for e in plan.entries] == [0, 1] and plan.measurements == str(known)
