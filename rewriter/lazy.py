"""torch, imported on its first use rather than at import time.

Commands that touch no tensor (``--help``, ``plugins``, ``inspect``) import the registry,
the plugin modules and the checkpoint reader, and would otherwise pay torch's import (about
2 s) before printing a line. The modules on that path import ``torch`` from here: a stand-in
that imports the real module when one of its attributes is first read. Nothing else
changes: ``sys.modules`` holds only the real torch, and type checkers see the real module.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any


class LazyModule(ModuleType):
    """Stands for the module of its name until an attribute is read, then forwards to it.
    A registry that inspects a plugin module's globals (pluggy does) reads only what is set
    on the stand-in itself, so it does not trigger the import."""

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self.__name__)
        self.__dict__.update(module.__dict__)  # later reads are plain lookups
        return getattr(module, attr)


if TYPE_CHECKING:
    import torch
else:
    torch = LazyModule("torch")
