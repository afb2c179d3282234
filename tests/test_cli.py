"""The command list: every command loads under its name, and what touches no tensor (the list,
every ``--help``, ``plugins``, ``inspect`` of a checkpoint) needs no torch or transformers."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from rewriter.cli import COMMANDS, main
from tests.quantize import CASES, quantized


def test_every_listed_command_loads_under_its_name() -> None:
    ctx = click.Context(main)
    for name, (_, _, summary) in COMMANDS.items():
        command = main.get_command(ctx, name)
        assert command is not None and command.name == name and command.get_short_help_str(80) == summary
    assert main.get_command(ctx, "nonsense") is None


def without_torch(*args: str) -> str:
    """``abliterate ARGS`` in a fresh interpreter; fails if it failed or imported torch or transformers."""
    code = ("import sys; from click.testing import CliRunner; from rewriter.cli import main; "
            f"r = CliRunner().invoke(main, {list(args)!r}); print(r.output); assert r.exit_code == 0, r.output; "
            "print(sorted({'torch', 'transformers'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("[]"), f"'{' '.join(args)}' imported {done.stdout.split()[-1]}"
    return done.stdout


def help_output(*args: str) -> str:
    return without_torch(*args, "--help")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_explains_itself_without_loading_torch(name: str) -> None:
    assert f" {name} [OPTIONS]" in help_output(name)


def test_help_lists_the_pipeline_in_order_without_loading_torch() -> None:
    done = subprocess.CompletedProcess([], 0, help_output())
    listed = [line.split()[0] for line in done.stdout.split("Commands:")[1].splitlines()[1:] if line.startswith("  ")]
    assert listed == list(COMMANDS)
    assert listed.index("optimize") < listed.index("rewrite") < listed.index("verify") < listed.index("push")


def test_unknown_command_is_one_usage_line() -> None:
    result = CliRunner().invoke(main, ["rewirte"])
    assert result.exit_code == 2 and "No such command 'rewirte'" in result.output


def test_plugins_lists_every_kind_without_loading_torch() -> None:
    out = without_torch("plugins")
    assert "norm-preserving" in out and "fp8" in out and "mxfp4" in out and "llama" in out


@pytest.mark.parametrize("case", [c for c in CASES if c.id in ("fp8-block", "compressed-channel", "mxfp4-experts")],
                         ids=lambda c: c.id)
def test_inspect_reads_a_quantized_checkpoint_without_loading_torch(case: object, tmp_path: Path) -> None:
    path, width, layers = quantized(case, tmp_path)  # type: ignore[arg-type]
    out = without_torch("inspect", str(path))
    assert f"decoder layers: {layers}; width: {width}" in out and "quantized:" in out and "MISSING" not in out
    assert "checkpoint:" in without_torch("inspect", str(tmp_path / "float"))
