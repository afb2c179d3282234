"""The plugin manager: loads built-in and third-party plugins and answers lookups by name."""
from __future__ import annotations

import importlib
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pluggy

from . import hookspecs
from .architecture import Architecture, Config
from .codec import Codec
from .errors import AbliterateError
from .io.checkpoint import quant_method
from .strategy import Strategy

T = TypeVar("T")
ENTRY_POINT_GROUP = hookspecs.PROJECT
# quant_method -> format name, for formats no codec re-encodes: said by name, with what to do.
UNSUPPORTED_QUANTIZATION = {
    "gptq": "GPTQ", "awq": "AWQ", "bitsandbytes": "bitsandbytes", "aqlm": "AQLM", "hqq": "HQQ", "quanto": "Quanto",
    "exl2": "EXL2", "eetq": "EETQ", "torchao": "torchao", "fbgemm_fp8": "FBGEMM FP8", "gptq_marlin": "GPTQ (Marlin)",
    "awq_marlin": "AWQ (Marlin)", "vptq": "VPTQ", "higgs": "HIGGS", "spqr": "SpQR", "bitnet": "BitNet",
}
DEQUANTIZE_FIRST = ("dequantize it to a float checkpoint first (e.g. load it with transformers, call "
                    "model.dequantize(), save_pretrained) and rewrite that")


@dataclass(frozen=True)
class Provided(Generic[T]):
    """A registered item and where it came from (plugin name, distribution)."""

    item: T
    plugin: str
    origin: str


class Registry:
    """Plugins from the ``abliterate`` entry points plus any named with ``-p``.

    ``-p module.path`` registers an importable module; ``-p no:NAME`` blocks a plugin,
    built-in or not, as pytest's ``-p no:`` does.
    """

    def __init__(self, plugin_args: Sequence[str] = ()) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        modules = []
        for arg in plugin_args:
            if arg.startswith("no:"):
                self.pm.set_blocked(arg[3:])
            else:
                modules.append(arg)
        self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        for name in modules:
            self.register(_import_plugin(name), name)

    def register(self, plugin: Any, name: str | None = None) -> None:
        """Register a plugin object or module (what a test or an embedding program does)."""
        self.pm.register(plugin, name=name)

    def _collect(self, hook_name: str, kind: str) -> dict[str, Provided[Any]]:
        dists = {id(p): f"{d.project_name} {d.version}" for p, d in self.pm.list_plugin_distinfo()}
        found: dict[str, Provided[Any]] = {}
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            origin = dists.get(id(impl.plugin), getattr(impl.plugin, "__file__", None) or repr(impl.plugin))
            for item in impl.function() or ():
                if kind == "architecture" and not isinstance(item, Architecture):
                    missing = [m for m in ("name", "summary", "components", "matches", "num_layers", "hidden_size",
                                           "residual_writers") if not hasattr(item, m)]
                    raise AbliterateError(f"plugin '{impl.plugin_name}': architecture {getattr(item, 'name', item)!r} "
                                          f"lacks {', '.join(missing)} (see rewriter.architecture.Architecture)")
                if item.name in found:
                    raise AbliterateError(
                        f"{kind} '{item.name}' is provided by both plugin '{found[item.name].plugin}' "
                        f"and plugin '{impl.plugin_name}'; block one with -p no:NAME"
                    )
                found[item.name] = Provided(item, impl.plugin_name, origin)
        return found

    def architectures(self) -> dict[str, Provided[Architecture]]:
        return self._collect("abliterate_architectures", "architecture")

    def strategies(self) -> dict[str, Provided[Strategy]]:
        return self._collect("abliterate_strategies", "strategy")

    def codecs(self) -> dict[str, Provided[Codec]]:
        return self._collect("abliterate_codecs", "codec")

    def codec_for(self, quantization: dict[str, Any]) -> Codec:
        """The codec that re-encodes this ``quantization_config``, or a one-line error that says
        which format was found and what to do."""
        method = quant_method(quantization)
        matching = [p.item for p in self.codecs().values() if p.item.matches(quantization)]
        if len(matching) == 1:
            return matching[0]
        if matching:
            raise AbliterateError(f"several codec plugins read quant_method '{method}': "
                                  f"{', '.join(c.name for c in matching)}; block one with -p no:NAME")
        found = UNSUPPORTED_QUANTIZATION.get(method.lower())
        what = f"{found} weights (quant_method '{method}')" if found else f"quant_method '{method}'"
        raise AbliterateError(f"quantized checkpoint: {what} cannot be re-encoded by any codec plugin; "
                              f"{DEQUANTIZE_FIRST}")

    def strategy(self, name: str) -> Strategy:
        known = self.strategies()
        if name not in known:
            raise AbliterateError(f"unknown strategy '{name}'; registered: {', '.join(sorted(known)) or 'none'}")
        return known[name].item

    def architecture_for(self, config: Config, names: Collection[str]) -> Architecture:
        """The one map that recognises this checkpoint, or a clear error."""
        matching = [p for p in self.architectures().values() if p.item.matches(config, names)]
        if len(matching) > 1:
            raise AbliterateError(
                "several architecture plugins match this checkpoint: "
                + ", ".join(f"{p.item.name} (plugin {p.plugin})" for p in matching)
                + "; block one with -p no:NAME"
            )
        if not matching:
            raise AbliterateError(
                f"unknown architecture: model_type '{config.get('model_type')}', "
                f"architectures {list(config.get('architectures') or [])}; no plugin recognises it. "
                "Add one by implementing the hook abliterate_architectures() (see README, 'Plugins')"
            )
        return matching[0].item


def _import_plugin(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise AbliterateError(f"cannot import plugin module '{name}': {exc}") from None


def describe(registry: Registry) -> Iterable[str]:
    """Lines for ``abliterate plugins``."""
    for title, provided in (("architectures", registry.architectures()), ("strategies", registry.strategies()),
                            ("codecs", registry.codecs())):
        yield f"{title}:"
        for name in sorted(provided):
            p = provided[name]
            yield f"  {name:<20} {p.item.summary}  [plugin {p.plugin}; {p.origin}]"
