"""The import line of the original FFA release (FasterTransformer-based), which works verbatim:
`from ff_attention import FastForwardAttn as FFA`."""

from ffa import FastForwardAttn

__all__ = ["FastForwardAttn"]
