"""The seed's import line: `from ff_attention import FastForwardAttn as FFA`."""

from ffa import FastForwardAttn

__all__ = ["FastForwardAttn"]
