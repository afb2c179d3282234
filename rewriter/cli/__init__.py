"""Command line: ``abliterate rewrite|verify|push|inspect|plugins|check-architecture|measure|
analyze|optimize|evaluate|example-model|demo``, and ``rewrite`` as a shortcut for ``abliterate rewrite``.

A user mistake becomes one line on stderr and exit status 1 (2 for bad usage), never a
traceback.
"""
from __future__ import annotations

import click

from .. import __version__
from .arch_cmds import check_architecture_cmd
from .info_cmds import inspect_cmd, plugins_cmd
from .lab_cmds import analyze_cmd, demo_cmd, evaluate_cmd, example_model_cmd, measure_cmd
from .optimize_cmd import optimize_cmd
from .rewrite_cmds import push_cmd, rewrite_cmd, verify_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="abliterate")
def main() -> None:
    """Directional ablation ("abliteration") of safetensors checkpoints, streamed tensor by
    tensor on a CPU, extended by plugins. The usual order: measure, analyze, rewrite,
    verify, evaluate, push."""


for _command in (rewrite_cmd, verify_cmd, push_cmd, inspect_cmd, plugins_cmd, check_architecture_cmd, measure_cmd,
                 analyze_cmd, optimize_cmd, evaluate_cmd, example_model_cmd, demo_cmd):
    main.add_command(_command)


def rewrite_main() -> None:
    """The ``rewrite`` console script: the same command as ``abliterate rewrite``."""
    rewrite_cmd.main(prog_name="rewrite")
