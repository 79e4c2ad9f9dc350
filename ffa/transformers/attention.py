"""The attention and mask functions that `enable` registers with transformers as "ffa".

In a decode step the mask function builds no mask: it returns the per-sequence window, a tiny
int64 tensor [2, batch, 1, 1] holding (first valid position, write position t), which
transformers hands to every layer untouched. The first valid position comes from the 2-D
attention mask (left padding) and, for sliding-window layers, from the window, or for
chunked-attention layers (Llama 4) from t's chunk, counted from the first valid position
(transformers passes a layer type's window or chunk size as the mask function's `local_size`).
The attention function hands q, k, v and that window to the layer's FastForwardAttn, with the
layer's own softmax scale (`scaling`: Gemma's query_pre_attn_scalar, Granite's attention
multiplier), softcap (Gemma 2) and attention sinks (`s_aux`: gpt-oss). Any other call (prefill)
runs the prefill attention: SDPA, or, for a layer with a softcap or sinks, which SDPA lacks, the
eager attention of the model's own modeling file.
"""

import math
import sys

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .binding import find_binding, refuse

NAME = "ffa"
# Models whose attention modules compute attention themselves (no AttentionInterface): FFA
# wraps their `_attn` method (own_attn), and their prefill keeps eager attention and eager masks.
OWN_ATTENTION_MODEL_TYPES = ("gptj",)


def is_window(mask):
    """Whether `mask` is the decode window made by `mask_function` (int64 [2, batch, 1, 1])."""
    return isinstance(mask, torch.Tensor) and mask.dtype == torch.int64 and mask.dim() == 4 and mask.shape[0] == 2


def is_chunked(config, local_size):
    """Whether transformers asks for the mask of a chunked-attention layer (Llama 4): it passes the
    chunk size as `local_size`, as it passes a sliding layer's window; enable() refuses a model with
    both layer types."""
    return config is not None and "chunked_attention" in (getattr(config, "layer_types", None) or ()) \
        and getattr(config, "attention_chunk_size", None) == local_size


def mask_function(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, local_size=None,
                  config=None, device=None, **kwargs):
    """The "ffa" mask: the decode window on a filled cache (its q_offset is a device counter),
    else the mask the prefill attention expects (SDPA, or eager for OWN_ATTENTION models)."""
    if q_length == 1 and isinstance(q_offset, torch.Tensor):
        t = q_offset.reshape(1).to(torch.int64).expand(batch_size)
        if attention_mask is not None:
            start = attention_mask.to(torch.int32).argmax(-1).to(torch.int64)  # first True: left padding
        else:
            start = torch.zeros(batch_size, dtype=torch.int64, device=t.device)
        if local_size is not None and is_chunked(config, local_size):  # chunks of local_size from the first token
            start = start + (t - start) // local_size * local_size
        elif local_size is not None:  # sliding window: keys at positions > t - local_size
            start = torch.maximum(start, t - (local_size - 1))
        return torch.stack([start, t]).view(2, batch_size, 1, 1)
    prefill = "eager" if config is not None and config.model_type in OWN_ATTENTION_MODEL_TYPES else "sdpa"
    return ALL_MASK_ATTENTION_FUNCTIONS[prefill](
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        attention_mask=attention_mask, local_size=local_size, config=config, device=device, **kwargs)


def _decode(module, query, key, value, window, scaling, dropout, softcap=None, sinks=None):
    """One decode step of one layer through FastForwardAttn; returns [batch, heads, head_dim]."""
    binding = find_binding(module)
    if binding is None:
        raise ValueError("this model uses attn_implementation='ffa' but was not passed through ffa.transformers.enable")
    cache = binding.cache
    if cache is None or key.shape[2] != 1:
        raise ValueError("an FFA-enabled model decodes with an FFACache; got another cache (call "
                         "ffa.transformers.disable(model) to use a different cache)")
    if dropout:
        raise ValueError(f"FFA has no attention dropout (got dropout={dropout}); call model.eval()")
    attn = cache.layers[module.layer_idx].attn
    # .to is a no-op unless the model spans several devices; view + unbind costs a third of
    # indexing the window twice, and this runs for every layer of every step.
    start, t = window.to(query.device).view(2, -1).unbind()
    return attn.attention(query, key, value, scaling, t, start=start, softcap=softcap, sinks=sinks)


def _refuse_unwindowed_decode(module, query, key):
    """A decode step on a filled FFACache without the "ffa" window (a caller's own 4-D mask)
    would attend over the new token alone: refuse it."""
    binding = find_binding(module)
    cache = binding.cache if binding is not None else None
    if cache is not None and cache.is_filled and query.shape[2] == 1 and key.shape[2] == 1:
        raise ValueError("a decode step on an FFACache needs the mask made by the 'ffa' mask function; "
                         "pass a 2-D attention_mask (custom 4-D masks are not supported)")


def _refuse_what_decode_cannot_continue(module, key, value, attention_mask, s_aux):
    """At the prefill, before any decode step: a layer whose attention is handed K/V other than
    the ones its FFACache layer returned (differential attention's split values, K/V shared
    from another layer or changed after the cache), a mask other than the one transformers'
    mask function made for SDPA (None or boolean: not a bias the layer computes itself, as in
    Doge's dynamic mask), or attention sinks (a `sinks` parameter) that do not reach the
    attention function as s_aux, attends over something FFA's decode step would not: refuse it."""
    binding = find_binding(module)  # None for a module FFA did not bind (a vision tower's attention)
    cache = binding.cache if binding is not None else None
    if cache is None:
        return
    layer = module.layer_idx
    handed_on = cache.layers[layer].prompt_handed_on(key, value)
    if handed_on is None:  # this forward stored no prompt in the FFACache
        return
    if not handed_on:
        refuse(binding.model_type, f"the attention of layer {layer} ({type(module).__name__}) is handed K/V other "
                                   "than those it stored in the cache (split, shared from another layer or changed "
                                   "after the cache)")
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        refuse(binding.model_type, f"the attention of layer {layer} ({type(module).__name__}) gets a mask of its own "
                                   f"({attention_mask.dtype} {tuple(attention_mask.shape)}), not transformers' causal "
                                   "mask (a bias or dynamic mask computed in the layer)")
    if s_aux is None and getattr(module, "sinks", None) is not None:
        refuse(binding.model_type, f"the attention of layer {layer} ({type(module).__name__}) has attention sinks "
                                   "that it does not pass to the attention function (as s_aux)")


def _eager_attention(module):
    """The eager attention function of the module's modeling file (transformers defines one per
    model, holding all of that model's features), or None."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)


def _additive(mask, query, key):
    """A prefill mask made for SDPA (boolean, or None for plain causal attention) as eager
    attention adds it to the logits: 0 where attended, elsewhere the dtype's minimum, at most
    float32's (eager attention takes its softmax in float32, where float64's minimum is -inf and
    the fully masked rows of left padding would turn into NaN)."""
    if mask is None:
        q, k = query.shape[2], key.shape[2]
        mask = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
        ~mask, max(torch.finfo(query.dtype).min, torch.finfo(torch.float32).min))


def attention_function(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,
                       s_aux=None, **kwargs):
    """The "ffa" attention function: FFA for a decode step, the prefill attention otherwise.
    Returns [batch, q_len, heads, head_dim] and no weights, as transformers expects."""
    if is_window(attention_mask):
        if scaling is None:
            scaling = 1.0 / math.sqrt(query.shape[-1])
        return _decode(module, query, key, value, attention_mask, scaling, dropout, softcap,
                       s_aux).unsqueeze(1), None
    _refuse_unwindowed_decode(module, query, key)
    _refuse_what_decode_cannot_continue(module, key, value, attention_mask, s_aux)
    if softcap is not None or s_aux is not None:
        eager = _eager_attention(module)
        if eager is None:
            raise ValueError(f"{type(module).__name__} caps its logits (softcap) or has attention sinks (s_aux), "
                             "and its modeling file has no eager_attention_forward for FFA's prefill (SDPA has "
                             "neither)")
        return eager(module, query, key, value, _additive(attention_mask, query, key), scaling=scaling,
                     dropout=dropout, softcap=softcap, s_aux=s_aux, **kwargs)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)


def own_attn(module, original, query, key, value, attention_mask=None):
    """Replaces `_attn` of attention modules that do not use AttentionInterface (GPT-J):
    same signature and result layout ([batch, heads, q_len, head_dim], weights)."""
    if is_window(attention_mask):
        out = _decode(module, query, key, value, attention_mask, 1.0 / module.scale_attn, module.attn_dropout.p
                      if module.training else 0.0)
        return out.unsqueeze(2), None
    _refuse_unwindowed_decode(module, query, key)
    _refuse_what_decode_cannot_continue(module, key, value, None, None)
    return original(query, key, value, attention_mask)


_registered = False


def register():
    """Register the "ffa" attention and mask functions with transformers (once)."""
    global _registered
    if not _registered:
        AttentionInterface.register(NAME, attention_function)
        AttentionMaskInterface.register(NAME, mask_function)
        _registered = True
