"""optimize: plans from trial parameters, the in-memory edit equal to the rewrite's, and the
command end to end on a tiny model (search, resume from the study file, plan, chart)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from rewriter.cli import main
from rewriter.directions import Measurements
from rewriter.io.checkpoint import Checkpoint
from rewriter.lab.evaluate import first_token_logits
from rewriter.lab.inmemory import InMemoryEditor
from rewriter.lab.measure import last_token_states
from rewriter.lab.models import batches, format_prompts, load_model
from rewriter.lab.optimize import Space, heuristic_params, plan_from_params
from rewriter.lab.refusals import first_token_scores, opener_ids, refusal_log_odds
from rewriter.plan import load_plan
from rewriter.edits import plan_edits
from rewriter.registry import Registry

SPACE = Space(num_layers=8, measured=list(range(1, 8)), components=("attention", "mlp"), strategies=("standard",))


def params(**kw: object) -> dict[str, object]:
    p: dict[str, object] = {"measurement": 5, "center": 4.0, "half_width": 2.0, "strategy": "standard"}
    for c in SPACE.components:
        p.update({f"{c}_peak": 1.0, f"{c}_position": 0.5, f"{c}_floor": 0.0, f"{c}_width": 2.0})
    return {**p, **kw}


def test_plan_from_params_is_a_profile_over_the_range() -> None:
    plan, strategy = plan_from_params(params(), SPACE)
    # range 2-6, peak at 4, falling to 0 two layers away: 2 and 6 have nothing left and are dropped
    assert strategy == "standard" and [e.layer for e in plan.entries] == [3, 4, 5]
    scales = [e.scale_for("attention") for e in plan.entries]
    assert scales == [0.5, 1.0, 0.5] and all(e.measurement == 5 for e in plan.entries)
    flat, _ = plan_from_params(params(attention_floor=1.0, mlp_peak=0.25), SPACE)
    assert {e.scale_for("attention") for e in flat.entries} == {1.0}
    assert max(e.scale_for("mlp") for e in flat.entries) == 0.25
    wide = plan_from_params(params(center=0.0, half_width=40.0, attention_floor=1.0), SPACE)[0]
    assert [e.layer for e in wide.entries] == list(range(8))  # clipped to the model


def test_the_heuristic_plan_is_a_point_of_the_search_space(tmp_path: Path) -> None:
    flat = load_plan(load_plan_text(tmp_path, "ablate:\n" + "".join(f"  - {{layer: {n}, measurement: 6}}\n"
                                                                     for n in range(2, 8))))
    again, strategy = plan_from_params(heuristic_params(flat, "standard", SPACE), SPACE)
    assert strategy == "standard" and again.as_dict() == [
        {"layer": n, "measurement": 6, "scale": 1.0, "components": {"attention": 1.0, "mlp": 1.0}} for n in range(2, 8)]


def test_in_memory_edit_equals_the_rewritten_checkpoint(chat_model: tuple[Path, Path], tmp_path: Path) -> None:
    path, directions = chat_model
    plan = load_plan_text(tmp_path, "ablate:\n  - {layer: 1, measurement: 2, components: {mlp: 0.5}}\n"
                                    "  - {layer: 2, measurement: 2}\n")
    out = tmp_path / "out"
    assert CliRunner().invoke(main, ["rewrite", str(path), str(out), "-d", str(directions), "--plan", str(plan),
                                     "-q"]).exit_code == 0
    lm, ckpt, registry = load_model(path), Checkpoint.open(path), Registry()
    editor = InMemoryEditor(lm, ckpt)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    edits = plan_edits(ckpt, registry.architecture_for(ckpt.config, ckpt.names), load_plan(plan),
                       Measurements.load(directions), registry.strategy("norm-preserving"))
    editor.apply(edits)
    written = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    for name in edits:
        assert torch.equal(lm.model.get_parameter(name).detach(), written[name].float()), name
    editor.restore()
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())


def test_first_token_scores_are_the_log_odds_and_the_projection_of_one_pass(chat_model: tuple[Path, Path]) -> None:
    path, directions = chat_model
    lm, meas = load_model(path), Measurements.load(directions)
    prompts = ["a", "bb b", "ccc cc c"]
    openers = opener_ids(lm.tokenizer)
    odds, proj = first_token_scores(lm, prompts, openers, {2: meas.direction(2)}, batch_size=2)
    expected = refusal_log_odds(first_token_logits(lm, prompts, batch_size=2, progress=False), openers)
    assert torch.allclose(odds, expected, atol=1e-5)
    states = torch.cat([last_token_states(lm, enc)[:, 2] for _, enc in
                        batches(lm, format_prompts(lm.tokenizer, prompts, True, None), 8, True)])
    unit = (meas.direction(2) / meas.direction(2).norm()).float()
    assert torch.allclose(proj[2], states @ unit, atol=1e-4)


def load_plan_text(folder: Path, text: str) -> Path:
    (folder / "plan.yml").write_text(text)
    return folder / "plan.yml"


def test_optimize_command_searches_resumes_and_writes_a_plan_rewrite_takes(chat_model: tuple[Path, Path],
                                                                           tmp_path: Path) -> None:
    path, directions = chat_model
    args = ["optimize", str(path), "-d", str(directions), "-o", str(tmp_path / "plan.yml"), "--study",
            str(tmp_path / "study.db"), "--search-prompts", "4", "--max-new-tokens", "3", "--max-kl", "10",
            "--save", str(tmp_path / "answers.jsonl"), "-q"]
    first = CliRunner().invoke(main, [*args, "--trials", "4"])
    assert first.exit_code == 0, first.output
    assert "4 trials in" in first.output and "held-out evaluation: refusals" in first.output
    again = CliRunner().invoke(main, [*args, "--trials", "6", "--no-final-eval"])
    assert again.exit_code == 0, again.output
    assert "6 trials in" in again.output, "the study file resumes: 4 earlier trials and 2 new ones"
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 64
    strategy = again.output.split("--strategy ")[-1].split()[0]
    assert load_plan(tmp_path / "plan.yml").strategy == strategy, "the plan names the strategy it was chosen with"
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["rewrite", "--plan", str(tmp_path / "plan.yml"), str(path), str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "abliteration.json").read_text())["fingerprint"]["strategy"] == strategy


def test_optimize_keeps_a_plan_it_did_not_write(chat_model: tuple[Path, Path], tmp_path: Path) -> None:
    """analyze's plan (or a user's) at --output is refused before the search, unless --overwrite."""
    path, directions = chat_model
    mine = tmp_path / "plan.yml"
    assert CliRunner().invoke(main, ["analyze", str(directions), "--suggest-plan", str(mine)]).exit_code == 0
    before = mine.read_bytes()
    result = CliRunner().invoke(main, ["optimize", str(path), "-d", str(directions), "-o", str(mine), "-q"])
    assert result.exit_code == 1 and "was not written by optimize" in result.output
    assert len(result.output.strip().splitlines()) == 1 and mine.read_bytes() == before


# In a fresh process, where optuna is first imported by the search itself: the model it loaded
# is freed once the caller drops the scorer (optuna keeps the tracebacks of its failed optional
# imports, and with them every frame running at the time: the search's, which held the model).
RELEASED = """
import gc, sys, weakref
from pathlib import Path
from rewriter.lab import optimize
from rewriter.lab.prompts import default_prompts
assert "optuna" not in sys.modules
bad, good = default_prompts("harmful-measure")[:2], default_prompts("harmless-measure")[:2]
outcome, scorer = optimize.optimize(Path(sys.argv[1]), Path(sys.argv[2]), bad, good, trials=1, timeout=None,
                                    max_kl=10.0, strategies=("standard",), study=Path(sys.argv[3]), progress=False)
model = weakref.ref(scorer.lm.model)
del scorer
gc.collect()
print("alive" if model() is not None else "freed")
"""


def test_a_finished_search_keeps_no_model_alive(chat_model: tuple[Path, Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    path, directions = chat_model
    done = subprocess.run([sys.executable, "-c", RELEASED, str(path), str(directions), str(tmp_path / "study.db")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["freed"], "the search's model outlives it"
