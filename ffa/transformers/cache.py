"""FFACache: a transformers Cache whose attention layers are FastForwardAttn caches.

Prefill (several tokens on an empty cache) copies the prompt's K/V into one FastForwardAttn per
attention layer; a decode step (one token on a filled cache) stores nothing here: `update`
returns the token's K/V and the FFA kernel appends them. The fill state (whether a prompt is in,
and how many positions are written) is shared by all attention layers. A hybrid model's
linear-attention and recurrent layers (enable.STATE_LAYER_TYPES) keep transformers' own
LinearAttentionLayer, whose fixed-size states the model updates in place. The loop (loop.py)
saves and restores the fill state and those states around warm-up steps through `checkpoint` /
`restore`.
"""

import weakref

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, LinearAttentionLayer

from ..attention import FastForwardAttn
from .binding import binding_of, refuse


class _Fill:
    """What a cache holds, shared by its layers: whether a prompt is in (a Python flag, fixed
    during decoding) and how many positions are written (a device counter, so that a
    compiled decode step reads it without recompiling)."""

    def __init__(self):
        self.filled = False
        self.length = None
        self.host_length = 0  # the same count on the host, kept by eager steps only
        self.unchecked = 0  # layers whose prefill attention has not been checked (FFALayer.prompt_handed_on)

    def seq_length(self):
        return self.length if self.filled else 0


class FFALayer(CacheLayerMixin):
    """One attention layer's cache: a FastForwardAttn preallocated for `max_len` positions.

    `keys`/`values` are FFA's own cache tensors [batch, kv_heads, max_len, head_dim] and `heads`
    the query heads this layer serves: this rank's share under tensor parallelism, which is why
    both come from the first K/V (times the model's query heads per kv head, `group`)."""

    is_sliding = False

    def __init__(self, max_len, fill, group, compileable, kernel="ffa"):
        super().__init__()
        self.max_len, self.kernel = max_len, kernel
        self.fill = fill
        self.group = group
        self.heads = None
        self.is_compileable = compileable
        self.attn = None
        self._prompt = None  # weak references to the K/V the last prefill update returned

    def lazy_initialization(self, key_states, value_states):
        self.attn = FastForwardAttn(key_states, value_states, self.max_len, kernel=self.kernel)
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
        """Prefill: store the prompt and return it for the prefill attention. Decode (one token
        on a filled cache): return the token's k/v untouched; the FFA kernel appends them."""
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
        self._prompt = weakref.ref(key_states), weakref.ref(value_states)
        return key_states, value_states

    def prompt_handed_on(self, key, value):
        """Whether this layer's attention in a prefill is handed the very K/V that this layer's
        update returned (FFA's decode steps attend over what the cache stored, so attention over
        anything else, or a layer that stored nothing, could not be continued); None outside a
        prefill of this cache (a forward without it). Each layer of a prefill is checked once."""
        if self._prompt is None and not self.fill.unchecked:
            return None
        self.fill.unchecked = max(0, self.fill.unchecked - 1)
        prompt, self._prompt = self._prompt, None
        return prompt is not None and prompt[0]() is key and prompt[1]() is value

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
        self._prompt = None


def _states(layer):
    """The state tensors a linear-attention layer holds (its conv and recurrent states)."""
    return [x for x in (*layer.conv_states.values(), *layer.recurrent_states.values()) if x is not None]


class FFACache(Cache):
    """A transformers Cache whose attention layers are FastForwardAttn caches of `max_len`
    positions (and, in a hybrid model, whose other layers are transformers' LinearAttentionLayer).

    `FFACache(model, max_len)` for a model passed through `enable`; `generate` on an enabled
    model makes one itself. The buffers are allocated at the first prefill (batch, heads,
    dtype and device come from the prompt) and reused by later prefills of the same shape
    after `reset()`."""

    def __init__(self, model, max_len):
        binding = binding_of(model)
        if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"max_len must be a positive int, got {max_len!r}")
        self.max_len = max_len
        self.compileable = binding.compile
        self._binding = binding
        self._fill = _Fill()
        self._attention = tuple(binding.attention)  # indices of the attention layers, ascending
        layers = [FFALayer(max_len, self._fill, binding.group, binding.compile, binding.kernel)
                  if i in binding.attention else LinearAttentionLayer() for i in range(binding.num_layers)]
        super().__init__(layers=layers)

    def attention_layers(self):
        """The FFALayer of each attention layer, in layer order."""
        return [self.layers[i] for i in self._attention]

    def state_layers(self):
        """The LinearAttentionLayer of each linear-attention or recurrent layer, in layer order."""
        return [layer for layer in self.layers if not isinstance(layer, FFALayer)]

    def storage(self):
        """What a captured step reads and writes in place: the addresses of the first attention
        layer's K/V and of every state tensor (None before the first prefill). A prefill that
        reallocates (another batch size or dtype) changes it."""
        first = self.layers[self._attention[0]]
        return (first.keys.data_ptr() if first.is_initialized else None,
                *(x.data_ptr() for layer in self.state_layers() for x in _states(layer)))

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        # The attention function finds this cache through the model's binding.
        self._binding.cache = self
        filled = self._fill.filled
        keys, values = self.layers[layer_idx].update(key_states, value_states)
        if layer_idx == self._attention[0]:
            if filled:
                self._refuse_unchecked_prefill()
                self._count_step()
            else:
                self._start_fill(key_states)
        if layer_idx == self._attention[-1] and not filled:
            self._fill.filled = True  # every layer holds the prompt: from now on, one token per step
        return keys, values

    def update_conv_state(self, conv_states, layer_idx, state_idx=0, **kwargs):
        self._fit_state_layer(layer_idx, "conv_states", conv_states, state_idx)
        return super().update_conv_state(conv_states, layer_idx, state_idx, **kwargs)

    def update_recurrent_state(self, recurrent_states, layer_idx, state_idx=0, **kwargs):
        self._fit_state_layer(layer_idx, "recurrent_states", recurrent_states, state_idx)
        return super().update_recurrent_state(recurrent_states, layer_idx, state_idx, **kwargs)

    def _fit_state_layer(self, layer_idx, kind, state, state_idx):
        """A prompt of another batch size, dtype or device than a state layer holds gets a new
        layer: a LinearAttentionLayer copies each update into its fixed-shape buffers (decode
        steps bring the buffers' own shapes, a conv state one position instead of its kernel's)."""
        held = getattr(self.layers[layer_idx], kind, {}).get(state_idx)
        if held is not None and (held.shape[:-1] != state.shape[:-1] or held.dtype != state.dtype
                                 or held.device != state.device):
            self.layers[layer_idx] = LinearAttentionLayer()

    def get_mask_sizes(self, query_length, layer_idx):
        """Every attention layer's mask sizes are the same; transformers may ask a state layer."""
        return self.layers[self._attention[0]].get_mask_sizes(query_length)

    def _start_fill(self, key_states):
        length = key_states.shape[2]
        if self._fill.length is None or self._fill.length.device != key_states.device:
            self._fill.length = torch.zeros((), dtype=torch.int64, device=key_states.device)
            if self.compileable:
                torch._dynamo.mark_static_address(self._fill.length, guard=False)
        self._fill.length.fill_(length)
        self._fill.host_length = length
        self._fill.unchecked = len(self._attention)

    def _refuse_unchecked_prefill(self):
        """At the first decode step: every attention layer's prefill went through FFA's attention
        function (FFALayer.prompt_handed_on). A layer that attended elsewhere would, in a decode
        step, attend over the new token alone."""
        if self._fill.unchecked:
            refuse(self._binding.model_type, f"the attention of {self._fill.unchecked} of {len(self._attention)} "
                                             "attention layers did not go through transformers' attention interface "
                                             "in the prefill")

    def _count_step(self):
        # Eager steps also count on the host and refuse to run past max_len (the GPU kernel
        # would return NaN there); compiled steps skip this, so the host count can only lag.
        if not torch.compiler.is_compiling():
            if self._fill.host_length >= self.max_len:
                raise ValueError(f"FFACache is full: max_len={self.max_len} positions are written")
            self._fill.host_length += 1
        self._fill.length.add_(1)

    def reset(self):
        """Forget the contents and keep the buffers, for the next prompt (state layers: zeroed)."""
        self._fill.filled = False
        for layer in self.state_layers():
            layer.reset()

    def checkpoint(self):
        """A copy of how many positions are written (on the device and on the host) and of the
        state layers' states, for `restore`: steps run and then undone (a CUDA graph's warm-up)
        leave no count behind and no recurrent state advanced (K/V written past the count are
        written again before anything reads them)."""
        states = [x.clone() for layer in self.state_layers() for x in _states(layer)]
        return self._fill.length.clone(), self._fill.host_length, states

    def restore(self, checkpoint):
        """Back to a `checkpoint()`, in place (a captured graph keeps reading the same buffers)."""
        length, host_length, states = checkpoint
        self._fill.length.copy_(length)
        self._fill.host_length = host_length
        for x, saved in zip([x for layer in self.state_layers() for x in _states(layer)], states, strict=True):
            x.copy_(saved)

    def count_written(self, length):
        """The host's count of written positions after steps that only the device counted (a
        CUDA graph's replays): `length` positions now hold K/V."""
        self._fill.host_length = length

    @property
    def is_filled(self):
        return self._fill.filled

    def get_seq_length(self, layer_idx=0):
        return self._fill.seq_length()

    def get_max_length(self, layer_idx=None):
        return self.max_len
