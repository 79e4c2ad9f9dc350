"""enable / disable, and the `generate` that enable installs on the model instance."""

import functools
import inspect
import sys

import torch
from transformers import GenerationMixin
from transformers.cache_utils import DYNAMIC_LAYER_TYPE_MAPPING, Cache, CacheLayerMixin, LinearAttentionCacheLayerMixin

from . import loop
from ..attention import KERNELS, FastForwardAttn
from .attention import NAME, OWN_ATTENTION_MODEL_TYPES, own_attn, register
from .binding import Binding, binding_of, find_binding, refuse
from .cache import FFACache

# Attention layer types (config.layer_types) that are a window over the cache (attention.mask_function).
LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
# Layer types without K/V whose cache is a fixed-size state (transformers' LinearAttentionLayer:
# Mamba and gated-DeltaNet layers, short convolutions, MoE/MLP-only layers). In a hybrid model
# FFACache keeps transformers' own layer for them (StateLayer) and FFA attends in the others.
STATE_LAYER_TYPES = tuple(kind for kind, layer in DYNAMIC_LAYER_TYPE_MAPPING.items()
                          if issubclass(layer, LinearAttentionCacheLayerMixin) and not issubclass(layer, CacheLayerMixin))


def is_enabled(model):
    return find_binding(model) is not None


def _refuse(config, feature):
    refuse(config.model_type, feature)


def _layer_types(config):
    """The decoder's config.layer_types, or () where it has none."""
    return tuple(getattr(config.get_text_config(decoder=True), "layer_types", None) or ())


def _attention_modules(model):
    """The self-attention modules of the model's layers (class name ending in Attention, with an
    int layer_idx), by layer index, and the number of layers. Every layer has one, except, in a
    hybrid model, layers of a STATE_LAYER_TYPES type, whose modules (linear attention, such as
    Kimi's delta attention, or none) are the model's own business."""
    config, found = model.config, {}
    types = _layer_types(config)
    states = {i for i, kind in enumerate(types) if kind in STATE_LAYER_TYPES}
    for name, module in model.named_modules():
        idx = getattr(module, "layer_idx", None)
        if type(module).__name__.endswith("Attention") and isinstance(idx, int) and idx not in states:
            leaf = name.rsplit(".", 1)[-1]
            if getattr(module, "is_cross_attention", False) or "cross" in leaf or leaf.startswith("encoder_attn"):
                _refuse(config, f"it has cross-attention ({type(module).__name__} `{name}` of layer {idx})")
            if idx in found:
                _refuse(config, f"two attention modules claim layer {idx}")
            found[idx] = module
    layers = len(types) or getattr(config, "num_hidden_layers", None) or max(found, default=-1) + 1
    if not found:
        _refuse(config, "none of its layers has a self-attention module (a module named ...Attention with a "
                        "layer_idx): a recurrent model, or attention modules of its own")
    missing = sorted(set(range(layers)) - set(found) - states)
    if missing:
        _refuse(config, f"layers {', '.join(map(str, missing))} of {layers} have no self-attention module and no "
                        "layer type of transformers' linear-attention cache (recurrent layers of their own?)")
    return found, layers


def _group(config, modules):
    """Query heads per kv head: the attention modules' own count, else the config's head counts."""
    group = getattr(modules[0], "num_key_value_groups", None)
    if isinstance(group, int) and group > 0:
        return group
    heads = config.num_attention_heads
    return heads // (getattr(config, "num_key_value_heads", None) or heads)


def _head_dim(config, module):
    """The head_dim of a layer's q, k and v: the module's own, else the config's."""
    return (getattr(module, "head_dim", None) or getattr(config, "head_dim", None)
            or config.hidden_size // config.num_attention_heads)


def _calls_attention_interface(module):
    """Whether the module's forward looks its attention up in transformers' attention interface
    (ALL_ATTENTION_FUNCTIONS), as hybrid models' attention layers do without the model declaring
    itself an attention backend (`_supports_attention_backend`). The first decode step checks
    that every attention layer's prefill went through it (FFACache.update)."""
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False


def _own_cache_class(model):
    """A transformers Cache subclass that the model's modeling file defines for itself (MiniMax
    keeps its linear-attention states in one, and refuses any other cache), or None."""
    module = sys.modules.get(type(model).__module__)
    return next((value for value in vars(module).values() if isinstance(value, type) and issubclass(value, Cache)
                 and value.__module__ == module.__name__), None) if module is not None else None


def _implementations(config):
    """The attention implementation of the model ("") and of each of its sub-models (a
    composite model's text and vision parts may differ; None: a part that never chose one)."""
    found = {"": config._attn_implementation}
    for key in getattr(config, "sub_configs", {}):
        sub = getattr(config, key, None)
        if sub is not None:
            found[key] = sub._attn_implementation
    return found


def _restore_implementations(model, previous):
    """Every part back to its implementation of _implementations (set_attn_implementation takes
    the chosen ones; a part that had none gets none again)."""
    model.set_attn_implementation({key: value for key, value in previous.items() if value is not None})
    for key, value in previous.items():
        if value is None:
            getattr(model.config, key)._attn_implementation = None


def _check_features(model, modules, hybrid):
    """Refuse, naming the feature, a model that needs what FFA cannot do (`hybrid`: it has
    linear-attention or recurrent layers). Runs before anything is changed or allocated; the
    head_dim (and dtype) by probing FastForwardAttn with an empty prompt of one kv head on the
    CPU (a tensor-parallel rank holds fewer kv heads than the config says, so only head_dim and
    dtype are probed)."""
    config = model.config
    own_cache = _own_cache_class(model) if hybrid else None
    if own_cache is not None:
        _refuse(config, f"its linear-attention layers keep their state in a cache class of its own "
                        f"({own_cache.__name__}), not in transformers' LinearAttentionLayer")
    if config.model_type not in OWN_ATTENTION_MODEL_TYPES and not (
            type(model).is_backend_compatible() or all(map(_calls_attention_interface, modules))):
        _refuse(config, "its attention does not go through transformers' attention interface (AttentionInterface)")
    if getattr(config, "kv_lora_rank", None) is not None or any(hasattr(m, "kv_lora_rank") for m in modules):
        _refuse(config, "multi-head latent attention (compressed K/V, as in DeepSeek-V3)")
    if any(getattr(m, "v_head_dim", None) not in (None, _head_dim(config, m)) for m in modules):
        _refuse(config, "values of another head_dim than the keys (v_head_dim, as in MiMo-V2-Flash)")
    if any(getattr(m, "is_kv_shared_layer", False) for m in modules):
        _refuse(config, "K/V shared across layers (layers that attend over an earlier layer's K/V, as in Gemma 3n)")
    if any(getattr(m, "is_causal", True) is False for m in modules):
        _refuse(config, "non-causal (bidirectional) attention")
    types = set(_layer_types(config))
    other = sorted(types - set(LAYER_TYPES) - set(STATE_LAYER_TYPES))
    if other:
        _refuse(config, f"layers of type {', '.join(map(repr, other))} (FFA runs full, sliding-window and chunked "
                        "attention, next to transformers' own linear-attention and recurrent layers)")
    if {"sliding_attention", "chunked_attention"} <= types:  # transformers passes both sizes as local_size
        _refuse(config, "both sliding-window and chunked-attention layers")
    if "chunked_attention" in types and not getattr(config, "attention_chunk_size", None):
        _refuse(config, "chunked-attention layers without an attention_chunk_size")
    for module in modules:
        empty = torch.empty(1, 1, 0, _head_dim(config, module), dtype=model.dtype)
        try:
            FastForwardAttn(empty, empty, 1)
        except (TypeError, ValueError) as e:
            _refuse(config, str(e))


def enable(model, *, compile=False, decode_loop=True, kernel="ffa"):
    """Make `model.generate` (and forward calls with an FFACache) use FFA for decode steps.

    Greedy search and sampling (temperature, top-k, top-p) run in FFA's own decode loop
    (ffa/transformers/loop.py: the same ids as transformers' loop; on the GPU each decode step
    is replayed from a CUDA graph, with no host wait between steps). compile=True also compiles
    that step (torch.compile; the first call of each batch size pays the compilation) and makes
    the cache compileable, so that other decoding modes, or decode_loop=False, get the step
    compiled by `generate` as it does with cache_implementation="static". kernel="sdpa" keeps
    FFA's cache and loop but has each decode step attend with two cache copies and torch's SDPA
    instead of FFA's kernel (FastForwardAttn's kernel=), to measure what the kernel contributes
    (bench/hf_generate.py's ffa_sdpa path). Returns the model. Calling it again updates the
    options."""
    if not isinstance(model, GenerationMixin) or not hasattr(model, "config"):
        raise TypeError(f"model must be a transformers generative model, got {type(model).__name__}")
    for name, value in (("compile", compile), ("decode_loop", decode_loop)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(map(repr, KERNELS))}, got {kernel!r}")
    config = model.config
    if is_enabled(model):
        binding_of(model).configure(compile, decode_loop, kernel)
        return model
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False):
        _refuse(config, "it has cross-attention (FFA runs decoder-only models)")
    found, layers = _attention_modules(model)
    modules = [found[i] for i in sorted(found)]
    _check_features(model, modules, hybrid=len(found) < layers)
    register()
    own_attention = config.model_type in OWN_ATTENTION_MODEL_TYPES
    binding = Binding(config.model_type, found, layers, _group(config, modules), _implementations(config),
                      own_attention, compile, decode_loop, kernel)
    binding.attach(model)
    if own_attention:
        for module in modules:
            module._attn = functools.partial(own_attn, module, module._attn)
        # These models cannot switch implementation through set_attn_implementation; the
        # config only decides which mask function runs.
        config._attn_implementation = NAME
    else:
        model.set_attn_implementation(NAME)
    original = type(model).generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        return _generate(model, original, *args, **kwargs)

    model.generate = generate
    return model


def disable(model):
    """Undo `enable`: the previous attention implementation, plain generate. Returns the model."""
    binding = binding_of(model)
    binding.detach(model)
    if binding.own_attention:
        for module in binding.modules:
            del module._attn
        model.config._attn_implementation = binding.previous[""]
    else:
        _restore_implementations(model, binding.previous)
    del model.generate
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
    binding = binding_of(model)
    call = _keywords(generate, model, args, kwargs)
    config, rest = loop.merged_config(model, call)
    if config.cache_implementation is not None:
        raise ValueError(f"cache_implementation={config.cache_implementation!r} cannot be combined with an "
                         "FFA-enabled model; call ffa.transformers.disable(model) first")
    cache = rest.get("past_key_values")
    if cache is not None and not isinstance(cache, FFACache):
        raise ValueError(f"past_key_values is a {type(cache).__name__}; an FFA-enabled model generates with an "
                         "FFACache (or none); call ffa.transformers.disable(model) first")
    inputs = rest.pop("inputs", None)
    inputs = rest.pop("input_ids", None) if inputs is None else inputs
    plan = loop.plan(model, config, inputs, rest) if binding.decode_loop else None
    _check_left_padding(plan.attention_mask if plan is not None else rest.get("attention_mask"))
    if cache is None and config.use_cache is not False:
        limit = config.max_new_tokens
        limit = loop.setting(config, "max_length") if limit is None else limit
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
                return loop.generate(binding, model, cache, plan)
        return generate(model, **call)
    finally:
        binding.cache = None
