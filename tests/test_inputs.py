"""Direction files (ours and the reference tool's), plans, dry runs, inspect, the console scripts."""
from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rewriter.cli import main
from rewriter.directions import CONVENTION, Measurements
from rewriter.errors import AbliterateError
from rewriter.launch import _exit_code, prefetch
from rewriter.plan import load_plan
from tests.helpers import random_measurements, tree


def test_direction_file_round_trip(tmp_path: Path) -> None:
    m = random_measurements(16, 5)
    m.save(tmp_path / "d.safetensors")
    back = Measurements.load(tmp_path / "d.safetensors")
    assert back.layers == [0, 1, 2, 3, 4] and back.width == 16
    assert all(torch.equal(back.harmful[n], m.harmful[n]) for n in m.layers)
    assert back.metadata["convention"] == CONVENTION and back.metadata["model"] == "tiny-random"
    assert back.harmful_count == 10


def test_reference_measurement_file(tmp_path: Path) -> None:
    m = random_measurements(16, 3)
    ref = {"layers": 3}
    for n in range(3):
        ref[f"harmful_{n}"] = m.harmful[n].float()
        ref[f"harmless_{n}"] = m.harmless[n].float()
        ref[f"refuse_{n}"] = (m.harmful[n] - m.harmless[n]).float()
    torch.save(ref, tmp_path / "model.refuse")
    back = Measurements.load(tmp_path / "model.refuse")
    assert back.layers == [0, 1, 2]
    torch.testing.assert_close(back.direction(1), (m.harmful[1].float().double() - m.harmless[1].float().double()))


class Evil:
    def __reduce__(self):  # would run code if unpickled
        return (print, ("pwned",))


def test_pickled_objects_are_never_unpickled(tmp_path: Path) -> None:
    torch.save({"harmful_0": Evil()}, tmp_path / "evil.refuse")
    with pytest.raises(AbliterateError, match="would run code") as caught:
        Measurements.load(tmp_path / "evil.refuse")
    assert "weights_only" not in str(caught.value)  # never advice to run a hostile file's code


def test_reference_plan_yaml(tmp_path: Path) -> None:
    plan_file = tmp_path / "plan.yml"
    plan_file.write_text(
        "model: google/gemma-3-12b-it\nmeasurements: out.refuse\noutput: outdir\nscale: 0.8\nablate:\n"
        + "".join(f"  - layer: {n}\n    measurement: 23\n    sparsity: 0.00\n" for n in range(11, 24))
        + "  - layer: 24\n    measurement: 29\n    scale: 0.5\n    components: {attention: 0.5}\n"
    )
    plan = load_plan(plan_file)
    here = tmp_path.resolve()  # paths in a plan are relative to the plan file; a Hub id stays as it is
    assert plan.model == "google/gemma-3-12b-it"
    assert plan.measurements == str(here / "out.refuse") and plan.output == str(here / "outdir")
    assert [e.layer for e in plan.entries] == list(range(11, 25))
    assert plan.entries[0].scale == 0.8
    # the global scale multiplies each entry's, as in the reference tool
    assert plan.entries[-1].scale_for("attention") == pytest.approx(0.2) and plan.entries[-1].scale_for("mlp") == 0.4
    assert load_plan_roundtrip(plan, tmp_path) == plan.as_dict()


def load_plan_roundtrip(plan, tmp_path: Path) -> list[dict]:
    (tmp_path / "again.yml").write_text(plan.to_yaml())
    return load_plan(tmp_path / "again.yml").as_dict()


def test_plan_file_drives_a_rewrite(checkpoint_factory: Callable[[str], Path], directions_file: Path, tmp_path: Path) -> None:
    src = checkpoint_factory("mistral")
    plan = tmp_path / "plan.yml"
    out = tmp_path / "from-plan"
    plan.write_text(f"model: {src}\nmeasurements: {directions_file}\noutput: {out}\nablate:\n"
                    "  - {layer: 1, measurement: 2, scale: 1.0, components: {attention: 0.0}}\n")
    result = CliRunner().invoke(main, ["rewrite", "--plan", str(plan), "-q"])
    assert result.exit_code == 0, result.output
    assert "tensors edited: 2" in result.output  # the attention scale 0 still passes through the engine
    from safetensors import safe_open

    changed = []
    for shard in src.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as a, safe_open(str(out / shard.name), "pt") as b:
            changed += [k for k in a.keys() if not torch.equal(a.get_tensor(k), b.get_tensor(k))]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]


def test_dry_run_writes_nothing(checkpoint_factory: Callable[[str], Path], directions_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    result = CliRunner().invoke(main, ["rewrite", str(checkpoint_factory("qwen3")), str(out), "-d", str(directions_file),
                                       "--layers", "0-1:2", "--attn-scale", "0.5", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "layer   0  attention  measurement   2  scale 0.5" in result.output
    assert "layer   1  mlp        measurement   2  scale 1" in result.output
    assert "4 tensors in 2 layers would be edited" in result.output
    assert not out.exists()


def test_inspect(checkpoint_factory: Callable[[str], Path], directions_file: Path) -> None:
    result = CliRunner().invoke(main, ["inspect", str(checkpoint_factory("gemma3")), "--layer", "2"])
    assert result.exit_code == 0, result.output
    assert "architecture: gemma3" in result.output and "decoder layers: 4; width: 64" in result.output
    assert "language_model.model.layers.2.mlp.down_proj.weight  [64, 96] bfloat16" in result.output
    result = CliRunner().invoke(main, ["inspect", str(directions_file)])
    assert result.exit_code == 0 and "layers: 4 (0-3); width: 64" in result.output


def test_console_scripts() -> None:
    for script in ("rewrite", "abliterate"):
        exe = shutil.which(script)
        assert exe, f"console script {script} is not installed"
        done = subprocess.run([exe, "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and "Usage:" in done.stdout
    done = subprocess.run([shutil.which("rewrite"), "--strategy", "x"], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip().startswith("Error:") and "Traceback" not in done.stderr


def test_console_script_rewrites_as_the_command_does(checkpoint_factory: Callable[[str], Path],
                                                     directions_file: Path, tmp_path: Path) -> None:
    """The scripts hint the kernel to read SOURCE ahead before loading torch; the output is the same."""
    src = checkpoint_factory("llama")
    args = [str(src), "-d", str(directions_file), "--layers", "1-2:1", "-q"]
    done = subprocess.run([shutil.which("rewrite"), *args[:1], str(tmp_path / "a"), *args[1:]],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert CliRunner().invoke(main, ["rewrite", *args[:1], str(tmp_path / "b"), *args[1:]]).exit_code == 0
    assert tree(tmp_path / "a") == tree(tmp_path / "b")


EXITING = """
import atexit, pathlib, sys, threading, time
if sys.argv[3] == "torch":
    import torch  # finish ends the process itself only once torch is loaded
from rewriter.launch import finish
out = pathlib.Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))
threading.Thread(target=lambda: (time.sleep(0.3), (out / "thread").write_text("ran"))).start()
sys.stdout.write("buffered")  # a pipe's stdout is block-buffered: only a flush writes this
status = int(sys.argv[2]) if sys.argv[2].isdigit() else sys.argv[2]
finish(lambda: sys.exit(status))
"""


@pytest.mark.parametrize(("status", "torch_loaded", "code"), [("3", "torch", 3), ("a message", "torch", 1),
                                                              ("3", "no", 3)])
def test_console_scripts_exit_as_python_would(tmp_path: Path, status: str, torch_loaded: str, code: int) -> None:
    """``finish`` skips Python's teardown once torch is loaded, and nothing else of its exit: the
    status, the threads that are not daemons, the atexit functions and the buffered output."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # (set here: it would flush each write)
    done = subprocess.run([sys.executable, "-c", EXITING, str(tmp_path), status, torch_loaded],
                          capture_output=True, text=True, env=env)
    assert done.returncode == code, done.stderr
    assert done.stdout == "buffered"
    assert done.stderr == ("a message\n" if code == 1 else "")
    assert (tmp_path / "atexit").read_text() == (tmp_path / "thread").read_text() == "ran"


def test_exit_codes_are_pythons(capsys: pytest.CaptureFixture[str]) -> None:
    assert [_exit_code(s) for s in (None, 0, 2, 256, -1, True)] == [0, 0, 2, 0, 255, 1]
    assert _exit_code("stopped") == 1 and capsys.readouterr().err == "stopped\n"


def test_prefetch_hints_at_most_its_budget_and_never_fails(checkpoint_factory: Callable[[str], Path],
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = checkpoint_factory("llama")
    total = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    assert prefetch(src) == total
    assert prefetch(src, budget=1000) == 1000
    monkeypatch.setattr("rewriter.launch.available_memory", lambda: 4000)
    assert prefetch(src) == 1000  # a quarter of the memory available
    assert prefetch(tmp_path / "missing") == 0
    (tmp_path / "dir.safetensors").mkdir()  # not a file: left alone
    assert prefetch(tmp_path) == 0


def test_inspect_an_output_shows_its_record_and_refuses_a_layer_out_of_range(
        checkpoint_factory: Callable[[str], Path], directions_file: Path, tmp_path: Path) -> None:
    src, out = checkpoint_factory("llama"), tmp_path / "out"
    assert CliRunner().invoke(main, ["rewrite", str(src), str(out), "-d", str(directions_file), "--layers", "1-2:1",
                                     "--component-scale", "mlp=0.5", "-q"]).exit_code == 0
    result = CliRunner().invoke(main, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    assert "rewrite record (complete):" in result.output and "strategy: norm-preserving" in result.output
    assert 'plan: 2 layers: 1-2 from 1 at 1 {"mlp": 0.5}' in result.output
    assert "components: attention, mlp" in result.output
    bad = CliRunner().invoke(main, ["inspect", str(out), "--layer", "9"])
    assert bad.exit_code == 1 and bad.output.strip() == "Error: --layer 9 is out of range: the model has layers 0-3"


def test_direction_files_are_the_same_bytes_from_every_process_and_any_header_length_reads(tmp_path: Path) -> None:
    """The same measurement writes the same bytes (its sha256 goes into records and cards), whatever the
    process; and a header whose length opens with a pickle's protocol mark (0x80 0x02: 640 bytes) is
    still read as the safetensors file it is."""
    import sys

    code = ("import sys; from tests.helpers import random_measurements as r; m = r(64, 4); "
            "m.metadata.update({f'key{i}': str(i) for i in range(12)}); m.save(sys.argv[1])")
    files = [tmp_path / f"{i}.safetensors" for i in range(2)]
    for f in files:
        subprocess.run([sys.executable, "-c", code, str(f)], check=True)
    assert files[0].read_bytes() == files[1].read_bytes()
    m = random_measurements(64, 4)
    for k in range(200):
        m.metadata["pad"] = "x" * k
        m.save(tmp_path / "m.safetensors")
        if (tmp_path / "m.safetensors").read_bytes()[:2] == b"\x80\x02":
            break
    else:
        raise AssertionError("no padding gave a 640-byte header")
    loaded = Measurements.load(tmp_path / "m.safetensors")
    assert loaded.layers == m.layers and torch.equal(loaded.harmful[2], m.harmful[2])
