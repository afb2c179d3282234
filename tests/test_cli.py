"""The command list: every command loads under its name, and the list itself needs no torch."""
from __future__ import annotations

import subprocess
import sys

import click
from click.testing import CliRunner

from rewriter.cli import COMMANDS, main


def test_every_listed_command_loads_under_its_name() -> None:
    ctx = click.Context(main)
    for name, (_, _, summary) in COMMANDS.items():
        command = main.get_command(ctx, name)
        assert command is not None and command.name == name and command.get_short_help_str(80) == summary
    assert main.get_command(ctx, "nonsense") is None


def test_help_lists_the_pipeline_in_order_without_loading_torch() -> None:
    code = ("import sys; from click.testing import CliRunner; from rewriter.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); print(r.output); print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().endswith("False"), "the command list imported torch"
    listed = [line.split()[0] for line in done.stdout.split("Commands:")[1].splitlines()[1:] if line.startswith("  ")]
    assert listed == list(COMMANDS)
    assert listed.index("optimize") < listed.index("rewrite") < listed.index("verify") < listed.index("push")


def test_unknown_command_is_one_usage_line() -> None:
    result = CliRunner().invoke(main, ["rewirte"])
    assert result.exit_code == 2 and "No such command 'rewirte'" in result.output
