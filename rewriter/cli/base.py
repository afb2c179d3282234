"""What every command shares: one-line errors, and the options for plugins and plans."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..dtypes import ALIASES, PRECISIONS
from ..errors import AbliterateError
from ..plan import Plan, load_plan, parse_layer_specs

# Characters that would start a new line (str.splitlines breaks on all of them) or drive a terminal.
_UNPRINTABLE = {c: repr(chr(c))[1:-1] for c in [*range(32), 0x7F, 0x85, 0x2028, 0x2029]}


def one_line(text: str) -> str:
    """``text`` with control characters escaped: a message quoting a hostile name stays one line."""
    return text.translate(_UNPRINTABLE)


class Command(click.Command):
    """Turns AbliterateError (and a failed file operation) into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AbliterateError as exc:
            raise click.ClickException(one_line(str(exc))) from None
        except OSError as exc:
            raise click.ClickException(one_line(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))) from None


def command(name: str, **kw: Any) -> Callable[[Callable[..., Any]], click.Command]:
    return click.command(name, cls=Command, **kw)


def plugin_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "-p", "--plugin", "plugins", multiple=True, metavar="MODULE",
        help="Load a plugin module by import path (repeatable); '-p no:NAME' blocks a plugin, built-in ones too.",
    )(f)


def quiet_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("-q", "--quiet", is_flag=True, help="No progress bars.")(f)


_PLAN_OPTIONS = [
    click.option("-d", "--directions", type=click.Path(path_type=Path),
                 help="Direction file from 'measure' (or the reference tool's measurement file)."),
    click.option("--plan", "plan_file", type=click.Path(path_type=Path),
                 help="Plan YAML (llm-abliteration's): model, measurements, output, scale (multiplies every entry's), "
                      "ablate: [{layer, measurement, scale, sparsity, components}]; also ensemble, invert, direction. "
                      "Paths in it are relative to the plan file."),
    click.option("--layers", multiple=True, metavar="FIRST[-LAST]:MEASUREMENT",
                 help="Edit these decoder layers with that measurement layer's direction; repeatable "
                      "(e.g. --layers 11-23:23 --layers 24-41:29)."),
    click.option("--scale", type=float, default=1.0, show_default=True, help="Strength alpha in [0, 2] for --layers (1 removes the direction)."),
    click.option("--component-scale", "component_scales", multiple=True, metavar="NAME=X",
                 help="Extra factor for one component's writers with --layers (repeatable); the names are the "
                      "architecture's (see 'abliterate inspect MODEL'), e.g. attention=0.8 mlp=1 experts=0.5."),
    click.option("--attn-scale", type=float, help="Same as --component-scale attention=X."),
    click.option("--mlp-scale", type=float, help="Same as --component-scale mlp=X."),
    click.option("--strategy", help="Edit strategy: a registered name (list them with 'abliterate plugins'); "
                                    "default the one a --plan file names (optimize and run write it there), else "
                                    "norm-preserving; for verify, the one the output was written with."),
    click.option("--direction", metavar="STRATEGY",
                 help="Refine the direction as STRATEGY does (standard, projected, biprojected, ...) and update the "
                      "weights as --strategy does: e.g. --strategy norm-preserving --direction standard is "
                      "llm-abliteration's --normpreserve without --projected."),
    click.option("--layer-ensemble", "--layerensemble", "ensemble", is_flag=True, default=None,
                 help="Use the mean of the normalized directions of measurements m-1, m, m+1 (llm-abliteration's "
                      "--layerensemble)."),
    click.option("--invert", is_flag=True, default=None,
                 help="Add the direction instead of removing it: every scale is negated (llm-abliteration's --invert)."),
    click.option("--sparsity", type=float, metavar="S",
                 help="Keep only the fraction S of the direction's components with the largest magnitude, in (0, 1] "
                      "(a plan entry's 'sparsity'; 0 keeps all)."),
    click.option("--precision", type=click.Choice([*PRECISIONS, *(a for a, n in ALIASES.items() if n in PRECISIONS)]),
                 help="Dtype of the edit arithmetic: float32 (default) or float64 (fp32/fp64 are accepted too)."),
]


def plan_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The options that say what a rewrite does; rewrite and verify take the same ones."""
    for option in reversed(_PLAN_OPTIONS):
        f = option(f)
    return f


def plan_from_options(ctx: click.Context, plan_file: Path | None, layers: tuple[str, ...], scale: float,
                      component_scales: tuple[str, ...], attn_scale: float | None, mlp_scale: float | None) -> Plan | None:
    """The plan that --plan or --layers describe, with --direction, --layer-ensemble, --invert and
    --sparsity over every entry; None when neither is given."""
    plan = _plan(ctx, plan_file, layers, scale, component_scales, attn_scale, mlp_scale)
    return plan if plan is None else with_option_flags(ctx, plan)


def with_option_flags(ctx: click.Context, plan: Plan) -> Plan:
    """``plan`` with the options the command line sets (the others as the plan has them)."""
    return plan.with_options(**{k: ctx.params.get(k) for k in ("direction", "ensemble", "invert", "sparsity")})


def _plan(ctx: click.Context, plan_file: Path | None, layers: tuple[str, ...], scale: float,
          component_scales: tuple[str, ...], attn_scale: float | None, mlp_scale: float | None) -> Plan | None:
    if plan_file and layers:
        raise AbliterateError("give either --plan or --layers, not both")
    components = _component_scales(component_scales, attn_scale, mlp_scale)
    if plan_file:
        given = [f"--{n.replace('_', '-').rstrip('s')}" for n in ("scale", "component_scales", "attn_scale", "mlp_scale")
                 if ctx.get_parameter_source(n) is click.core.ParameterSource.COMMANDLINE]
        if given:
            raise AbliterateError(f"{', '.join(given)} apply to --layers; put scales in the plan file")
        return load_plan(plan_file)
    if not layers:
        if components or ctx.get_parameter_source("scale") is click.core.ParameterSource.COMMANDLINE:
            raise AbliterateError("scales apply to --layers; give --layers or --plan")
        return None
    return parse_layer_specs(layers, scale, components)


def _component_scales(pairs: tuple[str, ...], attn: float | None, mlp: float | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise AbliterateError(f"--component-scale '{pair}': expected NAME=X, e.g. mlp=0.5")
    for name, value in (("attention", attn), ("mlp", mlp)):
        if value is not None:
            out[name] = value
    return out


def read_card_eval(path: Path | None) -> dict[str, Any] | None:
    """The numbers of 'evaluate --json' for a model card."""
    if path is None:
        return None
    try:
        doc = json.loads(path.read_text())
    except (ValueError, RecursionError):  # RecursionError: nested too deep to parse
        doc = None
    if not isinstance(doc, dict):
        raise AbliterateError(f"{path}: not the JSON that 'evaluate --json' writes")
    return doc
