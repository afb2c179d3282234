"""``check-architecture``: prove an architecture map, a plugin's included, on a tiny model."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import click

from ..errors import AbliterateError
from .base import command, plugin_option


@command("check-architecture")
@click.argument("model_type")
@click.option("--layout", "layouts", multiple=True, type=click.Choice(["hub", "fused"]),
              help="Only this layout (repeatable): 'hub' as the Hub stores the model (per-expert tensors where it "
                   "has them), 'fused' as transformers holds it. Default: both, where they differ.")
@click.option("--config", "settings", multiple=True, metavar="KEY=VALUE",
              help="Set a key of the tiny decoder config (repeatable; VALUE is JSON, else a string), e.g. "
                   "num_hidden_layers=5 or layers_block_type='[\"moe\", \"mlp\"]'.")
@click.option("--strategy", default="norm-preserving", show_default=True, help="Edit strategy of the rewrite.")
@click.option("--keep", type=click.Path(file_okay=False, path_type=Path),
              help="Write the tiny checkpoints and outputs here and keep them (default: a temporary directory).")
@plugin_option
def check_architecture_cmd(model_type: str, layouts: tuple[str, ...], settings: tuple[str, ...], strategy: str,
                           keep: Path | None, plugins: tuple[str, ...]) -> None:
    """Prove the map that recognises MODEL_TYPE (a transformers model_type) on a tiny random
    model that transformers builds from its own config and model classes, no download.

    The tiny model is saved sharded in each layout, rewritten by the real pipeline with a
    random direction, loaded back and run: tensors outside the plan keep their bytes; in
    every planned layer, each residual write (after its output norm) and the layer's
    update have no component along the direction, with tokens routed to every expert;
    the logits equal those of the same edit done in memory. Load your plugin with -p.
    Exit 1 when any check fails.
    """
    from ..archcheck import LAYOUTS, prove
    from ..registry import Registry

    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        if any(keep.iterdir()):
            raise AbliterateError(f"--keep {keep}: the directory is not empty")
    with tempfile.TemporaryDirectory(prefix="abliterate-check-") as tmp:
        proofs = prove(model_type, keep or Path(tmp), registry=Registry(plugins), overrides=_settings(settings),
                       layouts=layouts or LAYOUTS, strategy=strategy)
    for proof in proofs:
        for line in proof.lines():
            click.echo(line)
    failed = [p.layout for p in proofs if p.problems]
    if failed:
        raise AbliterateError(f"check-architecture: the map for {model_type} fails on the {', '.join(failed)} layout")


def _settings(pairs: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise AbliterateError(f"--config '{pair}': expected KEY=VALUE, e.g. num_hidden_layers=5")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    return out
