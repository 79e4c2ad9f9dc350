"""FastForwardAttention: decode attention at the memory-bandwidth floor.

    from ffa import FastForwardAttn
"""

from ._lib import FFAError
from ._version import __version__
from .attention import FastForwardAttn
from .info import info
from .launch import LaunchConfig

__all__ = ["FastForwardAttn", "FFAError", "LaunchConfig", "info", "__version__"]


def __getattr__(name):
    """`ffa.transformers` is imported on first use: it needs the transformers package."""
    if name == "transformers":
        import importlib
        return importlib.import_module(".transformers", __name__)
    raise AttributeError(f"module 'ffa' has no attribute {name!r}")
