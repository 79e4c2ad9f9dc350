"""FastForwardAttention: decode attention at the memory-bandwidth floor.

    from ffa import FastForwardAttn
"""

from ._lib import FFAError
from ._version import __version__
from .attention import FastForwardAttn
from .launch import LaunchConfig

__all__ = ["FastForwardAttn", "FFAError", "LaunchConfig", "__version__"]
