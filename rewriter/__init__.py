"""Streaming directional ablation ("abliteration") of safetensors checkpoints."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("abliterate-rewriter")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
