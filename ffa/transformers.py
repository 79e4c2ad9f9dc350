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
  * Greedy search and sampling run in FFA's own loop (ffa/decode_loop.py): on the GPU each
    decode step (model forward, token choice, end-of-sequence bookkeeping) is replayed from a
    CUDA graph.
  * `enable(model, compile=True)` also compiles that step, and marks the cache compileable
    (static shapes, buffers at static addresses, positions in device memory) so that other
    decoding modes get the step compiled by `generate`, as for its own static cache.
  * Tensor parallelism (`from_pretrained(..., tp_plan="auto")` under torchrun): each rank's
    attention sees only its shard of the heads, so every cache layer takes its head counts and
    device from the K/V it is given, never from the config; nothing else changes.

Architectures: OPT, GPT-2, Llama, Mistral, Qwen2 (through AttentionInterface) and GPT-J, whose
attention module does not use AttentionInterface: its `_attn` method is wrapped per instance
(prefill keeps the model's own eager attention). Left padding only; beam search works (the
cache reorders in place); assisted decoding, chunked prefill and continuing a filled cache
with several new tokens are refused with a ValueError.
"""

import functools
import inspect
import math

import torch
import transformers
from transformers import AttentionInterface, GenerationMixin
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import decode_loop
from .attention import FastForwardAttn

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"ffa.transformers needs transformers >= 5, found {transformers.__version__}")

NAME = "ffa"
SUPPORTED_MODEL_TYPES = ("opt", "gpt2", "llama", "mistral", "qwen2", "gptj")
# Models whose attention modules compute attention themselves (no AttentionInterface): FFA
# wraps their `_attn` method, and their prefill keeps eager attention and eager masks.
OWN_ATTENTION_MODEL_TYPES = ("gptj",)

__all__ = ["FFACache", "enable", "disable", "is_enabled"]


# ---------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------

class _Fill:
    """What a cache holds, shared by its layers: whether a prompt is in (a Python flag, fixed
    during decoding) and how many positions are written (a device counter, so that a
    compiled decode step reads it without recompiling)."""

    def __init__(self):
        self.filled = False
        self.length = None
        self.host_length = 0  # the same count on the host, kept by eager steps only

    def seq_length(self):
        return self.length if self.filled else 0


class FFALayer(CacheLayerMixin):
    """One attention layer's cache: a FastForwardAttn preallocated for `max_len` positions.

    `keys`/`values` are FFA's own cache tensors [batch, kv_heads, max_len, head_dim] and `heads`
    the query heads this layer serves: this rank's share under tensor parallelism, which is why
    both come from the first K/V (times the model's query heads per kv head, `group`)."""

    is_sliding = False

    def __init__(self, max_len, fill, group, compileable):
        super().__init__()
        self.max_len = max_len
        self.fill = fill
        self.group = group
        self.heads = None
        self.is_compileable = compileable
        self.attn = None

    def lazy_initialization(self, key_states, value_states):
        self.attn = FastForwardAttn(key_states, value_states, self.max_len)
        self.keys, self.values = self.attn.get_cache()
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size = key_states.shape[0]
        self.heads = key_states.shape[1] * self.group
        if self.is_compileable:
            # Launch and workspace fixed before torch.compile traces a step (FastForwardAttn
            # has marked its buffers' addresses static for CUDA graphs).
            self.attn.prepare(self.heads)
        self.is_initialized = True

    def _fits(self, key_states):
        return (self.is_initialized and key_states.dtype == self.dtype and key_states.device == self.device
                and key_states.shape[:2] == self.keys.shape[:2] and key_states.shape[3] == self.keys.shape[3])

    def update(self, key_states, value_states, *args, **kwargs):
        """Prefill: store the prompt and return it for SDPA. Decode (one token on a filled
        cache): return the token's k/v untouched; the FFA kernel appends them."""
        if self.fill.filled:
            if key_states.shape[2] != 1:
                raise ValueError(
                    f"FFACache holds a prompt already and got {key_states.shape[2]} new tokens; FFA decodes one token "
                    "per step (chunked prefill, assisted decoding and multi-token continuation are not supported)")
            return key_states, value_states
        length = key_states.shape[2]
        if length > self.max_len:
            raise ValueError(f"the prompt has {length} tokens, more than the cache's max_len={self.max_len}")
        if self._fits(key_states):
            self.keys[:, :, :length] = key_states
            self.values[:, :, :length] = value_states
        else:
            self.lazy_initialization(key_states, value_states)
        return key_states, value_states

    def get_mask_sizes(self, query_length):
        if self.fill.filled:
            return self.max_len, 0
        return query_length, 0

    def get_seq_length(self):
        return self.fill.seq_length()

    def get_max_length(self):
        return self.max_len

    def reorder_cache(self, beam_idx):
        """Beam search: permute the batch in place (the buffers keep their addresses)."""
        if self.is_initialized:
            index = beam_idx.to(self.device)
            self.keys.copy_(self.keys.index_select(0, index))
            self.values.copy_(self.values.index_select(0, index))

    def crop(self, tokens_to_remove):
        raise ValueError("FFACache cannot be cropped (assisted or speculative decoding is not supported)")

    def reset(self):
        self.fill.filled = False


class FFACache(Cache):
    """A transformers Cache whose layers are FastForwardAttn caches of `max_len` positions.

    `FFACache(model, max_len)` for a model passed through `enable`; `generate` on an enabled
    model makes one itself. The buffers are allocated at the first prefill (batch, heads,
    dtype and device come from the prompt) and reused by later prefills of the same shape
    after `reset()`."""

    def __init__(self, model, max_len):
        binding = _binding_of(model)
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        self.max_len = max_len
        self.compileable = binding.compile
        self._binding = binding
        self._fill = _Fill()
        layers = [FFALayer(max_len, self._fill, binding.group, binding.compile) for _ in range(binding.num_layers)]
        super().__init__(layers=layers)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # The attention function finds this cache through the model's binding.
        self._binding.cache = self
        filled = self._fill.filled
        keys, values = self.layers[layer_idx].update(key_states, value_states)
        if layer_idx == 0:
            if filled:
                self._count_step()
            else:
                self._start_fill(key_states)
        if layer_idx == len(self.layers) - 1 and not filled:
            self._fill.filled = True  # every layer holds the prompt: from now on, one token per step
        return keys, values

    def _start_fill(self, key_states):
        length = key_states.shape[2]
        if self._fill.length is None or self._fill.length.device != key_states.device:
            self._fill.length = torch.zeros((), dtype=torch.int64, device=key_states.device)
            if self.compileable:
                torch._dynamo.mark_static_address(self._fill.length, guard=False)
        self._fill.length.fill_(length)
        self._fill.host_length = length

    def _count_step(self):
        # Eager steps also count on the host and refuse to run past max_len (the GPU kernel
        # would return NaN there); compiled steps skip this, so the host count can only lag.
        if not torch.compiler.is_compiling():
            if self._fill.host_length >= self.max_len:
                raise ValueError(f"FFACache is full: max_len={self.max_len} positions are written")
            self._fill.host_length += 1
        self._fill.length.add_(1)

    def reset(self):
        """Forget the contents and keep the buffers, for the next prompt."""
        self._fill.filled = False

    @property
    def is_filled(self):
        return self._fill.filled

    def get_seq_length(self, layer_idx=0):
        return self._fill.seq_length()

    def get_max_length(self, layer_idx=None):
        return self.max_len


# ---------------------------------------------------------------------------------------
# Attention and mask functions registered as "ffa"
# ---------------------------------------------------------------------------------------

def _is_window(mask):
    """Whether `mask` is the decode window made by `_mask` (int64 [2, batch, 1, 1])."""
    return isinstance(mask, torch.Tensor) and mask.dtype == torch.int64 and mask.dim() == 4 and mask.shape[0] == 2


def _mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, local_size=None,
          config=None, device=None, **kwargs):
    """The "ffa" mask: the decode window on a filled cache (its q_offset is a device counter),
    else the mask the prefill attention expects (SDPA, or eager for OWN_ATTENTION models)."""
    if q_length == 1 and isinstance(q_offset, torch.Tensor):
        t = q_offset.reshape(1).to(torch.int64).expand(batch_size)
        if attention_mask is not None:
            start = attention_mask.to(torch.int32).argmax(-1).to(torch.int64)  # first True: left padding
        else:
            start = torch.zeros(batch_size, dtype=torch.int64, device=t.device)
        if local_size is not None:  # sliding window: keys at positions > t - local_size
            start = torch.maximum(start, t - (local_size - 1))
        return torch.stack([start, t]).view(2, batch_size, 1, 1)
    prefill = "eager" if config is not None and config.model_type in OWN_ATTENTION_MODEL_TYPES else "sdpa"
    return ALL_MASK_ATTENTION_FUNCTIONS[prefill](
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        attention_mask=attention_mask, local_size=local_size, config=config, device=device, **kwargs)


def _decode(module, query, key, value, window, scaling, dropout):
    """One decode step of one layer through FastForwardAttn; returns [batch, heads, head_dim]."""
    binding = getattr(module, "_ffa_binding", None)
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
    return attn.attention(query, key, value, scaling, t, start=start)


def _refuse_unwindowed_decode(module, query, key):
    """A decode step on a filled FFACache without the "ffa" window (a caller's own 4-D mask)
    would attend over the new token alone: refuse it."""
    binding = getattr(module, "_ffa_binding", None)
    cache = binding.cache if binding is not None else None
    if cache is not None and cache.is_filled and query.shape[2] == 1 and key.shape[2] == 1:
        raise ValueError("a decode step on an FFACache needs the mask made by the 'ffa' mask function; "
                         "pass a 2-D attention_mask (custom 4-D masks are not supported)")


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The "ffa" attention function: FFA for a decode step, SDPA otherwise.
    Returns [batch, q_len, heads, head_dim] and no weights, as transformers expects."""
    if _is_window(attention_mask):
        if scaling is None:
            scaling = 1.0 / math.sqrt(query.shape[-1])
        return _decode(module, query, key, value, attention_mask, scaling, dropout).unsqueeze(1), None
    _refuse_unwindowed_decode(module, query, key)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling,
                                          dropout=dropout, **kwargs)


def _own_attn(module, original, query, key, value, attention_mask=None):
    """Replaces `_attn` of attention modules that do not use AttentionInterface (GPT-J):
    same signature and result layout ([batch, heads, q_len, head_dim], weights)."""
    if _is_window(attention_mask):
        out = _decode(module, query, key, value, attention_mask, 1.0 / module.scale_attn, module.attn_dropout.p
                      if module.training else 0.0)
        return out.unsqueeze(2), None
    _refuse_unwindowed_decode(module, query, key)
    return original(query, key, value, attention_mask)


_registered = False


def _register():
    global _registered
    if not _registered:
        AttentionInterface.register(NAME, _attention)
        AttentionMaskInterface.register(NAME, _mask)
        _registered = True


# ---------------------------------------------------------------------------------------
# enable / disable
# ---------------------------------------------------------------------------------------

class _Binding:
    """What `enable` attached to a model: its attention modules, query heads per kv head, the
    previous attention implementation, the compile flag and the cache in use (set by
    FFACache.update)."""

    def __init__(self, modules, group, previous, compile, decode_loop):
        self.modules = modules
        self.group = group
        self.num_layers = len(modules)
        self.previous = previous
        self.cache = None
        self.configure(compile, decode_loop)

    def configure(self, compile, decode_loop):
        """The options of enable(); forgets what the previous options built."""
        self.compile = compile
        self.decode_loop = decode_loop
        self.generate_cache = None    # the cache generate made, reused by the next call
        self.decode_step = None       # decode_loop.DecodeStep (and its CUDA graph) over that cache
        self.compiled_forward = None  # the model under torch.compile, for the decode loop


def _binding_of(model):
    binding = getattr(model, "_ffa_binding", None)
    if binding is None:
        raise ValueError("model was not passed through ffa.transformers.enable")
    return binding


def is_enabled(model):
    return getattr(model, "_ffa_binding", None) is not None


def _attention_modules(model):
    """The self-attention modules by layer index (class name ending in Attention, with a layer_idx)."""
    found = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if type(module).__name__.endswith("Attention") and isinstance(idx, int):
            if idx in found:
                raise ValueError(f"two attention modules claim layer {idx}; model not supported")
            found[idx] = module
    if sorted(found) != list(range(len(found))) or not found:
        raise ValueError(f"could not find the attention layers 0..n-1 (found {sorted(found)})")
    return [found[i] for i in range(len(found))]


def _head_counts(config):
    """(query heads, kv heads, head_dim) of the whole model, as its config gives them."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return heads, kv_heads, getattr(config, "head_dim", None) or config.hidden_size // heads


def _check_head_dim(config, dtype):
    """Fail at enable() rather than at the first generate when FFA cannot hold this model's
    K/V: probe FastForwardAttn with an empty prompt of one kv head on the CPU (only head_dim
    and dtype matter; a tensor-parallel rank holds fewer kv heads than the config says)."""
    _, _, head_dim = _head_counts(config)
    empty = torch.empty(1, 1, 0, head_dim, dtype=dtype)
    try:
        FastForwardAttn(empty, empty, 1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"FFA cannot run this model ({config.model_type}): {e}") from None


def enable(model, *, compile=False, decode_loop=True):
    """Make `model.generate` (and forward calls with an FFACache) use FFA for decode steps.

    Greedy search and sampling (temperature, top-k, top-p) run in FFA's own decode loop
    (ffa/decode_loop.py: the same ids as transformers' loop; on the GPU each decode step is
    replayed from a CUDA graph, with no host wait between steps). compile=True also compiles
    that step (torch.compile; the first call of each batch size pays the compilation) and makes
    the cache compileable, so that other decoding modes, or decode_loop=False, get the step
    compiled by `generate` as it does with cache_implementation="static". Returns the model.
    Calling it again updates the options."""
    if not isinstance(model, GenerationMixin) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers generative model, got {type(model).__name__}")
    for name, value in (("compile", compile), ("decode_loop", decode_loop)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    config = model.config
    if getattr(config, "is_encoder_decoder", False) or config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model type {config.model_type!r} is not supported; FFA supports "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if is_enabled(model):
        model._ffa_binding.configure(compile, decode_loop)
        return model
    _check_head_dim(config, model.dtype)
    _register()
    modules = _attention_modules(model)
    heads, kv_heads, _ = _head_counts(config)
    binding = _Binding(modules, heads // kv_heads, config._attn_implementation, compile, decode_loop)
    for module in modules:
        module._ffa_binding = binding
    if config.model_type in OWN_ATTENTION_MODEL_TYPES:
        for module in modules:
            module._attn = functools.partial(_own_attn, module, module._attn)
        # These models cannot switch implementation through set_attn_implementation; the
        # config only decides which mask function runs.
        config._attn_implementation = NAME
    else:
        model.set_attn_implementation(NAME)
    model._ffa_binding = binding
    original = type(model).generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        return _generate(model, original, *args, **kwargs)

    model.generate = generate
    return model


def disable(model):
    """Undo `enable`: the previous attention implementation, plain generate. Returns the model."""
    binding = _binding_of(model)
    for module in binding.modules:
        del module._ffa_binding
        if "_attn" in vars(module):
            del module._attn
    if model.config.model_type in OWN_ATTENTION_MODEL_TYPES:
        model.config._attn_implementation = binding.previous
    else:
        model.set_attn_implementation(binding.previous)
    del model.generate
    del model._ffa_binding
    return model


# ---------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------

def _keywords(generate, model, args, kwargs):
    """A generate() call's arguments as keywords (positional ones named by its signature)."""
    signature = inspect.signature(generate)
    call = signature.bind(model, *args, **kwargs).arguments
    call.pop(next(iter(signature.parameters)))  # the model itself
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            call.update(call.pop(name, {}))
    return call


def _check_left_padding(mask):
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        raise ValueError("attention_mask must be a 2-D tensor [batch, length] for an FFA-enabled model")
    keep = mask.bool()
    first = keep.to(torch.int32).argmax(-1, keepdim=True)
    expected = torch.arange(keep.shape[1], device=keep.device)[None, :] >= first
    if not torch.equal(keep, expected):
        raise ValueError("attention_mask: FFA supports left padding only (each row: zeros, then ones)")


def _generate(model, generate, *args, **kwargs):
    """model.generate with an FFACache sized for the call: prompt + max_new_tokens (or
    max_length, which bounds the new tokens in every reading transformers gives it, or
    transformers' default), and FFA's decode loop where it reproduces the call."""
    binding = model._ffa_binding
    call = _keywords(generate, model, args, kwargs)
    config, rest = decode_loop.merged_config(model, call)
    if config.cache_implementation is not None:
        raise ValueError(f"cache_implementation={config.cache_implementation!r} cannot be combined with an "
                         "FFA-enabled model; call ffa.transformers.disable(model) first")
    cache = rest.get("past_key_values")
    if cache is not None and not isinstance(cache, FFACache):
        raise ValueError(f"past_key_values is a {type(cache).__name__}; an FFA-enabled model generates with an "
                         "FFACache (or none); call ffa.transformers.disable(model) first")
    inputs = rest.pop("inputs", None)
    inputs = rest.pop("input_ids", None) if inputs is None else inputs
    plan = decode_loop.plan(model, config, inputs, rest) if binding.decode_loop else None
    _check_left_padding(plan.attention_mask if plan is not None else rest.get("attention_mask"))
    if cache is None and config.use_cache is not False:
        limit = config.max_new_tokens
        limit = decode_loop.setting(config, "max_length") if limit is None else limit
        prompts = [x.shape[1] for x in (inputs, rest.get("inputs_embeds")) if isinstance(x, torch.Tensor)]
        prompt = max(prompts, default=1)
        cache = binding.generate_cache
        if cache is None or cache.max_len < prompt + limit:
            cache = binding.generate_cache = FFACache(model, prompt + limit)
        cache.reset()
        call["past_key_values"] = cache
    try:
        if plan is not None:
            with torch.no_grad():
                return decode_loop.generate(binding, model, cache, plan)
        return generate(model, **call)
    finally:
        binding.cache = None
