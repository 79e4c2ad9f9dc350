"""Hugging Face drop-in: FFA runs every decode step of a stock `transformers` model.

    import ffa.transformers
    model = ffa.transformers.enable(model)        # returns the model
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=128)

How it fits into transformers 5.x without touching any modeling file:
  * `enable` registers an attention implementation "ffa" (AttentionInterface) and a mask
    function of the same name (AttentionMaskInterface), and switches the model to it.
  * Prefill (several query tokens on an empty cache) runs through SDPA exactly as before;
    `FFACache.update` copies the prompt's K/V once into a `FastForwardAttn` per layer.
  * In a decode step the "ffa" mask function builds no mask. It returns the per-sequence
    attention window instead, a tiny int64 tensor [2, batch, 1, 1] holding (first valid
    position, write position t) that transformers passes through to every layer untouched;
    the first valid position comes from the 2-D attention mask (left padding) and, for
    sliding-window layers, from the window. `FFACache.update` returns the new token's K/V
    without storing them, and the "ffa" attention function hands q, k, v and that window to
    `FastForwardAttn.attention`, whose fused kernel appends k/v in place and attends. Nothing
    concatenates, reallocates or copies the cache.
  * `model.generate` is wrapped (on this instance only) so that it sizes an `FFACache` for the
    call (prompt + new tokens) and reuses it across calls while it is large enough, which
    keeps buffer addresses fixed for CUDA graphs.
  * Greedy search and sampling run in FFA's own loop (loop.py): on the GPU each decode step
    (model forward, token choice, end-of-sequence bookkeeping) is replayed from a CUDA graph.
  * `enable(model, compile=True)` also compiles that step, and marks the cache compileable
    (static shapes, buffers at static addresses, positions in device memory) so that other
    decoding modes get the step compiled by `generate`, as for its own static cache.
  * Tensor parallelism (`from_pretrained(..., tp_plan="auto")` under torchrun): each rank's
    attention sees only its shard of the heads, so every cache layer takes its head counts and
    device from the K/V it is given, never from the config; nothing else changes.

Architectures: any decoder-only model whose attention goes through AttentionInterface with
full, sliding-window or chunked layers (each layer's window or chunk, softmax scale, softcap and
attention sinks reach FFA through the mask and attention functions); GPT-J, whose attention
module does not use AttentionInterface, has its `_attn` method wrapped per instance (prefill
keeps its own eager attention). What FFA cannot run (latent attention, cross-attention, non-causal
attention, other layer types, a head_dim the kernel lacks) is refused by enable() with a
ValueError naming the feature. Left padding only; beam search works (the cache reorders in
place); assisted decoding, chunked prefill and continuing a filled cache with several new
tokens are refused with a ValueError.

The package: cache.py (FFACache), attention.py (the "ffa" attention and mask functions),
enable.py (enable / disable and the wrapped generate), loop.py (FFA's decode loop) and
binding.py (what enable attaches to the model, shared by the others).
"""

import transformers

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"ffa.transformers needs transformers >= 5, found {transformers.__version__}")

from .cache import FFACache  # noqa: E402
from .enable import disable, enable, is_enabled  # noqa: E402

__all__ = ["FFACache", "enable", "disable", "is_enabled"]
