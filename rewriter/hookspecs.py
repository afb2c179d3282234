"""Every hook a plugin can implement, in one place (as pytest keeps its hookspecs).

A plugin is any module or object with functions marked ``@hookimpl``. Built-ins are
registered through the ``abliterate`` entry-point group, exactly like a third-party
package, so installing a package is all it takes to add an architecture or a strategy.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .architecture import Architecture
    from .codec import Codec
    from .strategy import Strategy

PROJECT = "abliterate"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def abliterate_architectures() -> list[Architecture]:
    """Return the architecture maps this plugin provides.

    Each map recognises checkpoints (config ``model_type``, tensor names) and names,
    for a decoder layer, every tensor that writes into the residual stream.
    """


@hookspec
def abliterate_strategies() -> list[Strategy]:
    """Return the edit strategies this plugin provides (each with a unique name)."""


@hookspec
def abliterate_codecs() -> list[Codec]:
    """Return the quantized formats this plugin can decode and re-encode (see rewriter.codec)."""
