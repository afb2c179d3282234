"""The command list: every command loads under its name, and the list itself needs no torch."""
from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from rewriter.cli import COMMANDS, main


def test_every_listed_command_loads_under_its_name() -> None:
    ctx = click.Context(main)
    for name, (_, _, summary) in COMMANDS.items():
        command = main.get_command(ctx, name)
        assert command is not None and command.name == name and command.get_short_help_str(80) == summary
    assert main.get_command(ctx, "nonsense") is None


def help_output(*args: str) -> str:
    """``abliterate ARGS --help`` in a fresh interpreter; fails if that imported torch."""
    code = ("import sys; from click.testing import CliRunner; from rewriter.cli import main; "
            f"r = CliRunner().invoke(main, {[*args, '--help']!r}); print(r.output); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().endswith("False"), f"'{' '.join(args)} --help' imported torch"
    return done.stdout


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
