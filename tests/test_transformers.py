"""ffa.transformers on tiny random-weight models of every named architecture (CPU reference path;
GPU cases marked): FFA's greedy tokens equal Hugging Face's, padded batches equal single
sequences, each layer's window, softmax scale, softcap and sinks reach FFA, models FFA cannot run are
refused before any work, and a decode step touches the cache only through FFA's fused append."""

import contextlib
import copy
import importlib.util
import inspect
import json
from pathlib import Path

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import DynamicCache

import ffa
import ffa.transformers as fft
from ffa.transformers.binding import binding_of

transformers.logging.set_verbosity_error()
ROOT = Path(__file__).resolve().parent.parent
VOCAB = 96
PROMPT, NEW = 12, 8


WINDOW = 10  # sliding windows shorter than prompt + new tokens
SOFTCAP = 2.0  # Gemma 2's attention softcap; its tiny model's weights are large enough for the cap to bend logits
PRE_ATTN_SCALAR = 64  # Gemma's query_pre_attn_scalar: softmax scale 1/8, not head_dim's 1/sqrt(32)
GRANITE_SCALE = 0.5  # Granite's attention multiplier: the softmax scale
CHUNK = 5  # Llama 4's attention chunks, shorter than prompt + new tokens
SINK_LOGITS = (-1.0, 2.0, 3.0, 4.0)  # gpt-oss's per-head sinks: from hardly any weight to most of it (tiny())


def tiny_config(arch):
    """The config of a 2-layer model of `arch` (3 layers where noted): head_dim 32, grouped-query
    heads where the architecture has them; sliding-window layers (all of them, or alternating
    with full layers) shorter than the sequence; Gemma's and Granite's own softmax scales, Gemma
    2's softcap, gpt-oss's attention sinks (tiny() sets their logits); hybrid models with
    linear-attention, Mamba or convolution layers before (and after) a full-attention layer."""
    t = transformers
    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2)
    alternating = dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])
    moe = dict(num_experts_per_tok=2)
    linear_full_linear = {**common, "num_hidden_layers": 3,
                          "layer_types": ["linear_attention", "full_attention", "linear_attention"]}
    delta_net = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                     linear_value_head_dim=16)
    mamba = dict(mamba_d_state=8, mamba_expand=2)
    configs = {
        "opt": lambda: t.OPTConfig(
            vocab_size=VOCAB, hidden_size=64, word_embed_proj_dim=64, ffn_dim=128, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=128, pad_token_id=1, bos_token_id=2, eos_token_id=2),
        "gpt2": lambda: t.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=2, n_positions=128, bos_token_id=0, eos_token_id=0,
            pad_token_id=0),
        "gptj": lambda: t.GPTJConfig(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=2, rotary_dim=16, n_positions=128, bos_token_id=0,
            eos_token_id=0, pad_token_id=0),
        "llama": lambda: t.LlamaConfig(**common),
        "mistral": lambda: t.MistralConfig(sliding_window=WINDOW, **common),
        "qwen2": lambda: t.Qwen2Config(**{**common, "num_key_value_heads": 1}),
        # layer 0 full, layer 1 sliding (layers from max_window_layers on slide)
        "qwen3": lambda: t.Qwen3Config(head_dim=32, use_sliding_window=True, sliding_window=WINDOW,
                                       max_window_layers=1, **common),
        "qwen3_moe": lambda: t.Qwen3MoeConfig(head_dim=32, num_experts=4, moe_intermediate_size=64, **moe, **common),
        "gemma": lambda: t.GemmaConfig(head_dim=32, **common),
        "gemma2": lambda: t.Gemma2Config(head_dim=32, query_pre_attn_scalar=PRE_ATTN_SCALAR,
                                         attn_logit_softcapping=SOFTCAP, initializer_range=0.2, **alternating,
                                         **common),
        "gemma3_text": lambda: t.Gemma3TextConfig(head_dim=32, query_pre_attn_scalar=PRE_ATTN_SCALAR, **alternating,
                                                  **common),
        "phi3": lambda: t.Phi3Config(sliding_window=WINDOW, **common),
        "mixtral": lambda: t.MixtralConfig(num_local_experts=4, **moe, **common),
        "olmo2": lambda: t.Olmo2Config(**common),
        "granite": lambda: t.GraniteConfig(attention_multiplier=GRANITE_SCALE, embedding_multiplier=2.0,
                                           residual_multiplier=0.5, logits_scaling=2.0, **common),
        "smollm3": lambda: t.SmolLM3Config(**common),
        "gpt_oss": lambda: t.GptOssConfig(head_dim=32, num_local_experts=4, **moe, **alternating, **common),
        # layers 0 and 1 attend in chunks of CHUNK positions (from a sequence's first token), layer 2 fully
        "llama4_text": lambda: t.Llama4TextConfig(head_dim=32, num_local_experts=2, intermediate_size_mlp=128,
                                                  attention_chunk_size=CHUNK, no_rope_layer_interval=3,
                                                  **{**common, "num_hidden_layers": 3}),
        # Hybrid models: FFA attends in the full-attention layers, transformers' layers keep their states.
        "qwen3_next": lambda: t.Qwen3NextConfig(head_dim=32, num_experts=4, moe_intermediate_size=64,
                                                shared_expert_intermediate_size=64, **moe, **delta_net,
                                                **linear_full_linear),
        "qwen3_5_text": lambda: t.Qwen3_5TextConfig(head_dim=32, **delta_net, **linear_full_linear),
        "olmo_hybrid": lambda: t.OlmoHybridConfig(layer_types=["linear_attention", "full_attention"], **common),
        "lfm2": lambda: t.Lfm2Config(layer_types=["conv", "full_attention"],
                                     **{k: v for k, v in common.items() if k != "intermediate_size"}),
        "jamba": lambda: t.JambaConfig(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                                       expert_layer_offset=1, num_experts=2, **mamba, **common),
        "bamba": lambda: t.BambaConfig(attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=32, **mamba, **common),
        "granitemoehybrid": lambda: t.GraniteMoeHybridConfig(layer_types=["mamba", "attention"], mamba_n_heads=8,
                                                             mamba_d_head=32, num_local_experts=2, **mamba, **common),
        "nemotron_h": lambda: t.NemotronHConfig(layer_types=["linear_attention", "full_attention", "mlp"],
                                                mamba_num_heads=8, mamba_head_dim=16, ssm_state_size=8, n_groups=1,
                                                **{**common, "num_hidden_layers": 3}),
    }
    return configs[arch]()


# Architectures whose prefill reference must be transformers' eager attention: SDPA skips Gemma
# 2's softcap (FFA's prefill then runs the model's eager attention as well; gpt-oss's sinks take
# the same path, and its default attention is eager already).
EAGER_REFERENCE = ("gemma2",)


def tiny(arch):
    """A model of tiny_config(arch) with random weights (seeded), in eval mode, on transformers'
    attention that computes what the model defines (EAGER_REFERENCE, else SDPA). gpt-oss's
    sinks get SINK_LOGITS (its initialization leaves them near 0, where they weigh little)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch)).eval()
    if arch in EAGER_REFERENCE:
        model.set_attn_implementation("eager")
    if arch == "gpt_oss":
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.copy_(torch.tensor(SINK_LOGITS))
    return model


# Hybrid architectures: linear-attention (gated DeltaNet), Mamba or short-convolution layers beside attention.
HYBRID = ["qwen3_next", "qwen3_5_text", "olmo_hybrid", "lfm2", "jamba", "bamba", "granitemoehybrid", "nemotron_h"]
ARCHS = ["opt", "gpt2", "gptj", "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
         "phi3", "mixtral", "olmo2", "granite", "smollm3", "gpt_oss", "llama4_text", *HYBRID]
# Where transformers' own code fixes the dtype at float32: its MoE experts (grouped_mm takes no
# float64), and eager attention, whose float32 softmax turns the fully masked rows of left
# padding into NaN in a float64 model.
FLOAT32_ONLY = ("qwen3_moe", "mixtral", "gemma2", "gpt_oss", "qwen3_next", "jamba", "granitemoehybrid")


def exact_dtype(arch):
    """The most precise dtype the architecture runs in on the CPU."""
    return torch.float32 if arch in FLOAT32_ONLY else torch.float64


ARCH_DTYPES = [(arch, dtype) for arch in ARCHS for dtype in (torch.float32, torch.float64)
               if dtype == torch.float32 or exact_dtype(arch) == torch.float64]


def logits_tolerance(arch, dtype):
    """GPT-J computes attention scores in float32 even in a float64 model, and so do the gated
    DeltaNet layers of Qwen3.5 and OLMo-hybrid (transformers' torch implementation), whose padded
    and unpadded rows then differ by float32 rounding in transformers alone."""
    if dtype == torch.float64:
        return 1e-6 if arch in ("gptj", "qwen3_5_text", "olmo_hybrid") else 1e-10
    return 1e-4


def prompts(model, pads=(0, 3, 5), seed=1):
    """Left-padded prompts of PROMPT positions; row i starts after pads[i] pad tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(pads), PROMPT), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return ids.masked_fill(mask == 0, model.config.pad_token_id), mask


def greedy(model, ids, mask=None, new=NEW, with_logits=False, **kw):
    """The new tokens (and the logits of every step, [steps, batch, vocab], if asked)."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         pad_token_id=model.config.pad_token_id, return_dict_in_generate=True,
                         output_logits=with_logits, **kw)
    tokens = out.sequences[:, ids.shape[1]:]
    return (tokens, torch.stack(out.logits)) if with_logits else tokens


@contextlib.contextmanager
def counting_ffa_calls():
    """Records FastForwardAttn.attention calls (proves the decode steps went through FFA): each
    as (the FastForwardAttn, its arguments by name, positions copied as they were then)."""
    calls = []
    original = ffa.FastForwardAttn.attention
    signature = inspect.signature(original)

    def counted(self, *args, **kwargs):
        arguments = signature.bind(self, *args, **kwargs).arguments
        for name in ("t", "start"):  # views of counters the next step advances
            if isinstance(arguments.get(name), torch.Tensor):
                arguments[name] = arguments[name].clone()
        calls.append((self, arguments))
        return original(self, *args, **kwargs)

    ffa.FastForwardAttn.attention = counted
    try:
        yield calls
    finally:
        ffa.FastForwardAttn.attention = original


def assert_ffa_gives_hugging_face_tokens(model, tolerance):
    """Greedy tokens of a 2-layer model with FFA enabled equal its own, the logits within tolerance."""
    ids, mask = prompts(model)
    expected, expected_logits = greedy(model, ids, mask, with_logits=True)
    fft.enable(model)
    with counting_ffa_calls() as calls:
        got, logits = greedy(model, ids, mask, with_logits=True)
    # NEW - 1 decode steps (the prompt's forward yields the first token) in each attention layer.
    assert len(calls) == (NEW - 1) * len(binding_of(model).generate_cache.attention_layers())
    assert torch.equal(got, expected)
    torch.testing.assert_close(logits, expected_logits, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("arch,dtype", ARCH_DTYPES, ids=str)
def test_greedy_tokens_equal_hugging_face(arch, dtype):
    assert_ffa_gives_hugging_face_tokens(tiny(arch).to(dtype), logits_tolerance(arch, dtype))


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_sdpa_kernel_in_ffa_cache_gives_the_same_tokens(arch):
    """enable(model, kernel="sdpa"), the A/B of bench/hf_generate.py's ffa_sdpa path: FFA's cache
    and loop with SDPA attending instead of FFA's kernel give transformers' tokens; a kernel
    FastForwardAttn lacks is refused."""
    model = tiny(arch).double()
    ids, mask = prompts(model)
    expected = greedy(model, ids, mask)
    fft.enable(model, kernel="sdpa")
    assert torch.equal(greedy(model, ids, mask), expected)
    with pytest.raises(ValueError, match="kernel"):
        fft.enable(model, kernel="cudnn")


# What each tiny model's layers pass to FFA: softmax scale, softcap, and which layers slide (and every
# layer its attention sinks, the module's own tensor, where it has them: gpt-oss).
LAYER_FACTS = {
    "llama": (32 ** -0.5, None, "full"), "mistral": (32 ** -0.5, None, "all sliding"),
    "gpt_oss": (32 ** -0.5, None, "layer_types"), "llama4_text": (32 ** -0.5, None, "layer_types"),
    "phi3": (32 ** -0.5, None, "all sliding"), "qwen3": (32 ** -0.5, None, "layer_types"),
    "gemma2": (PRE_ATTN_SCALAR ** -0.5, SOFTCAP, "layer_types"),
    "gemma3_text": (PRE_ATTN_SCALAR ** -0.5, None, "layer_types"), "granite": (GRANITE_SCALE, None, "full"),
}


@pytest.mark.parametrize("arch", list(LAYER_FACTS))
def test_each_layer_gets_its_window_scale_and_softcap(arch):
    """Layer by layer, FFA attends where the model's attention would: a sliding layer from t -
    window + 1 on (or from its left padding), a chunked layer from the start of t's chunk (chunks
    counted from the padding), a full layer from its padding on, with the model's own softmax scale
    (Gemma's query_pre_attn_scalar, Granite's attention multiplier) and softcap."""
    scale, softcap, sliding = LAYER_FACTS[arch]
    model = fft.enable(tiny(arch).to(exact_dtype(arch)))
    ids, mask = prompts(model)
    with counting_ffa_calls() as calls:
        greedy(model, ids, mask)
    layers = binding_of(model).generate_cache.layers
    types = model.config.layer_types if sliding == "layer_types" else [sliding] * len(layers)
    padding = (mask == 0).sum(-1)
    cut = 0
    for attn, args in calls:
        layer = next(i for i, cache_layer in enumerate(layers) if cache_layer.attn is attn)
        t = args["t"].expand(len(padding))
        first = padding
        if types[layer] in ("sliding_attention", "all sliding"):
            first = torch.maximum(padding, t - WINDOW + 1)
        elif types[layer] == "chunked_attention":
            first = padding + (t - padding) // CHUNK * CHUNK
        cut += int((first > padding).sum())
        assert torch.equal(args["start"], first), (layer, args["start"], first)
        assert args["softmax_scale"] == pytest.approx(scale, rel=1e-12), layer
        assert args.get("softcap") == softcap, layer
        assert args.get("sinks") is getattr(model.model.layers[layer].self_attn, "sinks", None), layer
    assert len(calls) == (NEW - 1) * len(layers)
    assert cut > 0 or sliding == "full", "no window was shorter than the sequence"


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_equals_single_sequences(arch):
    dtype = exact_dtype(arch)
    model = fft.enable(tiny(arch).to(dtype))
    pads = (0, 4)
    ids, mask = prompts(model, pads)
    batch, batch_logits = greedy(model, ids, mask, with_logits=True)
    for row, pad in enumerate(pads):
        single, logits = greedy(model, ids[row:row + 1, pad:], with_logits=True)
        assert torch.equal(single[0], batch[row]), f"row {row} (left padding {pad})"
        tolerance = logits_tolerance(arch, dtype)
        torch.testing.assert_close(logits[:, 0], batch_logits[:, row], rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("arch", ["opt", "mistral"])
def test_compileable_cache_gives_the_same_tokens(arch):
    """With compile=True the cache is static-shaped: generate builds the decode masks before
    the forward (as for its static cache) and FFA is prepared at prefill. On the CPU generate
    does not compile, so this checks that path's logic in eager mode."""
    model = tiny(arch).double()
    ids, mask = prompts(model)
    expected, expected_logits = greedy(model, ids, mask, with_logits=True)
    fft.enable(model, compile=True)
    with counting_ffa_calls() as calls:
        got, logits = greedy(model, ids, mask, with_logits=True)
    assert binding_of(model).generate_cache.is_compileable
    assert len(calls) == (NEW - 1) * 2  # decode steps only: preparing at prefill calls no attention
    layers = binding_of(model).generate_cache.layers
    assert all(layer.attn._configs for layer in layers)  # each layer's launch was fixed at prefill
    assert torch.equal(got, expected)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-10, atol=1e-10)


def test_beam_search_equals_hugging_face():
    model = tiny("llama").double()
    ids, mask = prompts(model, (0, 2))
    expected = greedy(model, ids, mask, num_beams=3)
    fft.enable(model)
    assert torch.equal(greedy(model, ids, mask, num_beams=3), expected)


class OpRecorder(TorchDispatchMode):
    """Records the aten ops run outside FastForwardAttn.attention, with whether they touched
    the storage of a given set of tensors."""

    def __init__(self, watched):
        super().__init__()
        self.watched = {t.untyped_storage().data_ptr() for t in watched}
        self.paused = False
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            tensors = [x for x in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(x, torch.Tensor)]
            touches = any(x.untyped_storage().data_ptr() in self.watched for x in tensors)
            self.ops.append((func, touches, out))
        return out


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_decode_step_neither_concatenates_nor_copies_the_cache(arch):
    model = fft.enable(tiny(arch))
    ids, mask = prompts(model)
    cache = fft.FFACache(model, PROMPT + 4)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, past_key_values=cache)
    buffers = [t for layer in cache.layers for t in layer.attn.get_cache()]
    pointers = [t.data_ptr() for t in buffers]
    token = out.logits[:, -1:].argmax(-1)
    recorder = OpRecorder(buffers)
    original = ffa.FastForwardAttn.attention

    def paused(self, *args, **kwargs):
        recorder.paused = True
        try:
            return original(self, *args, **kwargs)
        finally:
            recorder.paused = False

    ffa.FastForwardAttn.attention = paused
    try:
        with torch.no_grad(), recorder:
            for step in range(3):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                out = model(input_ids=token, attention_mask=mask, past_key_values=cache)
                token = out.logits[:, -1:].argmax(-1)
    finally:
        ffa.FastForwardAttn.attention = original
    assert recorder.ops, "the recorder saw nothing"
    touching = [str(func) for func, touches, _ in recorder.ops if touches]
    assert not touching, f"ops outside FFA touched the KV cache: {touching}"
    # A concatenated cache would be [batch, kv_heads, length > 1, head_dim] (RoPE's cats are per token).
    cats = [tuple(out.shape) for func, _, out in recorder.ops
            if func is torch.ops.aten.cat.default and out.dim() == 4 and out.shape[2] > 1]
    assert not cats, f"concatenations along the sequence in a decode step: {cats}"
    assert [t.data_ptr() for t in buffers] == pointers
    assert int(cache.get_seq_length()) == PROMPT + 3


def test_generate_reuses_its_cache_across_calls():
    model = fft.enable(tiny("opt"))
    ids, mask = prompts(model)
    first = greedy(model, ids, mask)
    cache = binding_of(model).generate_cache
    pointers = [t.data_ptr() for layer in cache.layers for t in layer.attn.get_cache()]
    again = greedy(model, ids, mask)
    assert binding_of(model).generate_cache is cache
    assert [t.data_ptr() for layer in cache.layers for t in layer.attn.get_cache()] == pointers
    assert torch.equal(first, again)


def test_hybrid_cache_keeps_transformers_state_layers():
    """In a hybrid model (Qwen3.5: gated DeltaNet, full attention, gated DeltaNet) FFACache holds an
    FFALayer for the attention layer and transformers' LinearAttentionLayer for the others, which
    FFA never calls. checkpoint() / restore() undo a step's advance of the recurrent and conv states
    (as the CUDA graph's warm-up steps need), reset() zeroes them for the next prompt within the
    same buffers (storage() unchanged, so a captured step stays valid), and a prompt of another batch
    size gets new ones."""
    model = fft.enable(tiny("qwen3_5_text").double())
    ids, mask = prompts(model)
    with counting_ffa_calls() as calls:
        first = greedy(model, ids, mask)
    cache = binding_of(model).generate_cache
    assert [type(layer).__name__ for layer in cache.layers] == ["LinearAttentionLayer", "FFALayer",
                                                                "LinearAttentionLayer"]
    assert cache.attention_layers() == [cache.layers[1]]
    assert {id(attn) for attn, _ in calls} == {id(cache.layers[1].attn)}
    storage = cache.storage()
    assert len(storage) == 1 + 4 and None not in storage  # K/V, and a conv and a recurrent state per DeltaNet layer
    assert torch.equal(greedy(model, ids, mask), first) and cache.storage() == storage

    states = [x for layer in cache.state_layers() for x in (layer.conv_states[0], layer.recurrent_states[0])]
    before = [x.clone() for x in states]
    saved = cache.checkpoint()
    with torch.no_grad():
        model(input_ids=first[:, -1:], attention_mask=torch.ones(3, PROMPT + NEW + 1, dtype=torch.long),
              past_key_values=cache)
    assert not all(torch.equal(x, y) for x, y in zip(states, before)), "the step left the states as they were"
    cache.restore(saved)
    assert all(torch.equal(x, y) for x, y in zip(states, before))

    cache.reset()
    assert all(not x.any() for x in states) and cache.storage() == storage
    single = greedy(model, ids[:1], mask[:1])
    assert torch.equal(single, first[:1]) and cache.storage() != storage


def composite(arch):
    """Models made of parts with configs of their own: GOT-OCR2 (an eager vision tower, an SDPA
    language model) and Moshi (audio and depth-decoder parts that never chose an implementation)."""
    t = transformers
    if arch == "got_ocr2":
        config = t.GotOcr2Config(
            text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, pad_token_id=0),
            vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_dim=32,
                               output_channels=32))
    else:
        config = t.MoshiConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=32, ffn_dim=128, max_position_embeddings=128,
                               audio_vocab_size=32, num_codebooks=2)
    torch.manual_seed(0)
    model = t.AutoModelForCausalLM.from_config(config).eval().double()
    model.config.pad_token_id = 0  # what prompts() and greedy() read
    return model


@pytest.mark.parametrize("arch,parts", [("got_ocr2", {"": "eager", "text_config": "sdpa", "vision_config": "eager"}),
                                        ("moshi", {"": "sdpa", "audio_encoder_config": None,
                                                   "depth_decoder_config": None})])
def test_disable_restores_each_part_of_a_composite_model(arch, parts):
    """Each part gets its own attention implementation back (or keeps none); FFA's tokens equal
    the model's own, before and after."""
    model = composite(arch)
    config = model.config
    implementations = lambda: {"": config._attn_implementation,
                               **{k: getattr(config, k)._attn_implementation for k in config.sub_configs}}
    assert implementations() == parts
    ids, mask = prompts(model)
    expected = greedy(model, ids, mask)
    fft.enable(model)
    assert torch.equal(greedy(model, ids, mask), expected)
    fft.disable(model)
    assert implementations() == parts
    assert torch.equal(greedy(model, ids, mask), expected)


def test_disable_restores_hugging_face():
    model = tiny("opt")
    before = model.config._attn_implementation
    fft.enable(model)
    assert fft.is_enabled(model) and model.config._attn_implementation == "ffa"
    fft.disable(model)
    assert not fft.is_enabled(model)
    assert model.config._attn_implementation == before
    assert "generate" not in vars(model)
    ids, mask = prompts(model)
    with counting_ffa_calls() as calls:
        greedy(model, ids, mask)
    assert not calls


def test_bad_use_is_refused_with_clear_errors():
    model = fft.enable(tiny("opt"))
    ids, mask = prompts(model)
    with pytest.raises(ValueError, match="left padding"):
        greedy(model, ids, mask.flip(1))
    with pytest.raises(ValueError, match="cache_implementation"):
        greedy(model, ids, mask, cache_implementation="static")
    with pytest.raises(ValueError, match="DynamicCache"):
        greedy(model, ids, mask, past_key_values=DynamicCache())
    with pytest.raises(ValueError, match="max_len"):
        fft.FFACache(model, 0)
    cache = fft.FFACache(model, PROMPT + 4)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        with pytest.raises(ValueError, match="one token"):
            model(input_ids=ids[:, :2], attention_mask=torch.ones(3, PROMPT + 2, dtype=torch.long),
                  past_key_values=cache)
    with torch.no_grad():
        cache = fft.FFACache(model, PROMPT + 1)
        model(input_ids=ids, attention_mask=mask, past_key_values=cache)
        step = dict(input_ids=ids[:, :1], past_key_values=cache)
        model(attention_mask=torch.ones(3, PROMPT + 1, dtype=torch.long), **step)
        with pytest.raises(ValueError, match="full"):
            model(attention_mask=torch.ones(3, PROMPT + 2, dtype=torch.long), **step)
    with pytest.raises(ValueError, match="not passed through"):
        fft.FFACache(tiny("gpt2"), 8)
    with pytest.raises(TypeError, match="model"):
        fft.enable(torch.nn.Linear(2, 2))


def unsupported_models():
    """(label, model builder, words the refusal must hold): one per feature FFA cannot run."""
    t = transformers
    small = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=64)
    causal = t.AutoModelForCausalLM.from_config
    return [
        ("latent attention", lambda: causal(t.DeepseekV3Config(**small)), "multi-head latent attention"),
        ("values of another head_dim", lambda: causal(t.MiMoV2FlashConfig(head_dim=32, v_head_dim=16, **small)),
         "values of another head_dim than the keys"),
        ("bidirectional", lambda: causal(t.Gemma3TextConfig(head_dim=32, use_bidirectional_attention=True, **small)),
         "non-causal"),
        ("encoder-decoder", lambda: t.AutoModelForSeq2SeqLM.from_config(t.BartConfig(
            vocab_size=VOCAB, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2)), "cross-attention"),
        ("decoder of an encoder-decoder", lambda: t.BartForCausalLM(t.BartConfig(
            vocab_size=VOCAB, d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2)), "cross-attention \\(BartAttention `model.decoder.layers.0.encoder_attn`"),
        ("cross-attention layers", lambda: causal(t.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=2,
                                                               add_cross_attention=True)), "cross-attention"),
        ("sliding and chunked layers", lambda: causal(t.Llama4TextConfig(
            head_dim=32, num_local_experts=1, intermediate_size_mlp=64, sliding_window=WINDOW,
            layer_types=["sliding_attention", "chunked_attention"], **small)),
         "both sliding-window and chunked-attention layers"),
        ("another layer type", lambda: causal(t.FalconH1Config(
            head_dim=32, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, **small)),
         "layers of type 'hybrid'"),
        ("linear-attention states in a cache of its own", lambda: causal(t.MiniMaxConfig(
            head_dim=32, num_local_experts=2, **small, layer_types=["linear_attention", "full_attention"])),
         "cache class of its own \\(MiniMaxCache\\)"),
        ("recurrent layers of their own", lambda: causal(t.RecurrentGemmaConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=64, lru_width=64)), "layers 0, 1 of 3 have no self-attention module and no layer type"),
        ("no attention at all", lambda: causal(t.MambaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                             state_size=8)), "none of its layers has a self-attention"),
        ("no attention interface (ALiBi)", lambda: causal(t.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=1,
                                                                        n_head=2)), "attention interface"),
        ("K/V shared across layers", lambda: causal(t.Gemma3nTextConfig(
            head_dim=32, **{**small, "num_hidden_layers": 4}, num_kv_shared_layers=2, laurel_rank=8,
            layer_types=["sliding_attention", "full_attention"] * 2, sliding_window=WINDOW,
            hidden_size_per_layer_input=16, vocab_size_per_layer_input=VOCAB, activation_sparsity_pattern=[0.0] * 4)),
         "K/V shared across layers"),
        ("head_dim 24", lambda: causal(t.OPTConfig(vocab_size=VOCAB, hidden_size=48, word_embed_proj_dim=48,
                                                   ffn_dim=64, num_hidden_layers=1, num_attention_heads=2)),
         "head_dim 24"),
    ]


@pytest.mark.parametrize("label,build,words", unsupported_models(), ids=[m[0] for m in unsupported_models()])
def test_models_ffa_cannot_run_are_refused_before_any_work(label, build, words):
    """One ValueError naming the model type and the feature, at enable(), and the model as it was."""
    torch.manual_seed(0)
    model = build().eval()
    before = model.config._attn_implementation
    with pytest.raises(ValueError, match=f"FFA cannot run this model \\({model.config.model_type}\\): .*{words}"):
        fft.enable(model)
    assert not fft.is_enabled(model) and "generate" not in vars(model)
    assert model.config._attn_implementation == before
    assert not any(hasattr(m, "_ffa_binding") for m in model.modules())


def attention_of_its_own(arch):
    """Models whose layers attend over something other than what their cache stored: DiffLlama
    (each layer attends twice, over halves of its values), Doge (a dynamic mask computed in
    the layer), a Llama whose layer 1 keeps its K/V in a cache of its own (stores nothing
    in the model's cache, as a layer that borrows another layer's K/V does), a Llama whose layer 1
    attends with SDPA whatever the model's attention implementation (found at the first decode
    step: its prefill never reached FFA's attention function), and a Llama whose layer 0 has
    attention sinks that its forward does not pass on (as s_aux)."""
    t = transformers
    small = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama, a layer with a cache of its own":
        model = t.AutoModelForCausalLM.from_config(t.LlamaConfig(**small))
        attention, own = model.model.layers[1].self_attn, {}
        forward = attention.forward

        def keeping_its_own_cache(hidden_states, *args, past_key_values=None, **kwargs):
            if hidden_states.shape[1] > 1:  # a prompt: a new cache
                own["cache"] = DynamicCache()
            return forward(hidden_states, *args, past_key_values=own["cache"], **kwargs)

        attention.forward = keeping_its_own_cache
        return model
    if arch == "llama, a layer outside the attention interface":
        model = t.AutoModelForCausalLM.from_config(t.LlamaConfig(**small))
        attention = model.model.layers[1].self_attn
        attention.config = copy.copy(attention.config)  # keeps "sdpa" when enable() switches the model
        attention.config._attn_implementation = "sdpa"
        return model
    if arch == "llama, sinks not passed on":
        model = t.AutoModelForCausalLM.from_config(t.LlamaConfig(**small))
        model.model.layers[0].self_attn.sinks = torch.nn.Parameter(torch.zeros(small["num_attention_heads"]))
        return model
    config = {"diffllama": t.DiffLlamaConfig, "doge": t.DogeConfig}[arch]
    return t.AutoModelForCausalLM.from_config(config(**small))


@pytest.mark.parametrize("arch,words", [("diffllama", "layer 0 .* is handed K/V other than those it stored"),
                                        ("doge", "layer 0 .* gets a mask of its own"),
                                        ("llama, a layer with a cache of its own", "layer 1 .* is handed K/V other"),
                                        ("llama, a layer outside the attention interface",
                                         "1 of 2 attention layers did not go through transformers' attention"),
                                        ("llama, sinks not passed on", "layer 0 .* sinks that it does not pass")])
def test_attention_a_decode_step_cannot_continue_is_refused_at_the_prefill(arch, words):
    """What enable() cannot see in the modules shows in the prefill, before any decode step: one
    ValueError naming the layer and what it does, instead of wrong tokens or a crash."""
    torch.manual_seed(0)
    model = attention_of_its_own(arch).eval().double()
    ids, mask = prompts(model)
    greedy(model, ids, mask)  # transformers runs it
    fft.enable(model)
    with pytest.raises(ValueError, match=f"FFA cannot run this model \\({model.config.model_type}\\): .*{words}"):
        greedy(model, ids, mask)


# Architectures that no one named: decoder-only models whose attention goes through transformers'
# attention interface with the usual (query, key, value) layout take the generic path as they are.
UNNAMED = {
    "gpt_neox": lambda: transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2,
                                                   num_attention_heads=4, intermediate_size=128, pad_token_id=0),
    "starcoder2": lambda: transformers.Starcoder2Config(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=WINDOW, pad_token_id=0),
    "cohere2": lambda: transformers.Cohere2Config(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
        pad_token_id=0),
}


@pytest.mark.parametrize("arch", list(UNNAMED))
def test_unnamed_architectures_take_the_generic_path(arch):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(UNNAMED[arch]()).eval().double()
    assert_ffa_gives_hugging_face_tokens(model, 1e-10)


def test_gemma4_layers_of_head_dim_512_take_the_generic_path():
    """Gemma 4's full-attention layers have head_dim 512 (global_head_dim), its sliding layers the
    config's head_dim: both go through FFA, and the tokens and logits equal transformers'."""
    torch.manual_seed(0)
    config = transformers.Gemma4TextConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"],
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.AutoModelForCausalLM.from_config(config).eval().double()
    assert_ffa_gives_hugging_face_tokens(model, 1e-10)
    assert [layer.attn.head_dim for layer in binding_of(model).generate_cache.layers] == [32, 512]


def summarize_module(monkeypatch):
    """summarize.py as a module, imported as when it runs as a script (bench/ beside it is importable)."""
    if not (ROOT / "summarize.py").exists():
        pytest.skip("summarize.py is not beside tests/ (installed-wheel run)")
    monkeypatch.syspath_prepend(str(ROOT))
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    return summarize


def test_summarize_smoke(tmp_path, capsys, monkeypatch):
    summarize = summarize_module(monkeypatch)
    out = tmp_path / "summary"
    summarize.main(["--hf_model_name", "tiny-opt", "--max_ite", "3", "--output_len", "4", "--prompt_len", "16",
                    "--batch_sizes", "2", "1", "--data_type", "fp32", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "random weights" in printed and "generated token" in printed and "speedup" in printed
    result = json.loads(out.with_suffix(".json").read_text())
    assert [(r["batch_size"], r["batches"]) for r in result["results"]] == [(2, 2), (1, 3)]
    for r in result["results"]:
        assert r["hf_seconds"] > 0 and r["ffa_seconds"] > 0 and r["new_tokens_per_sample"] == 4
        assert r["token_agreement"] == 1.0  # fp32 on the CPU reference path: identical tokens


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True])
def test_gpu_greedy_tokens_equal_hugging_face(compile):
    """The CUDA kernel, eager and inside generate's compiled decode step, in float32."""
    model = tiny("llama").cuda()
    ids, mask = (x.cuda() for x in prompts(model))
    expected = greedy(model, ids, mask, new=16)
    fft.enable(model, compile=compile)
    config = transformers.CompileConfig(fullgraph=True) if compile else None
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    for _ in range(2):  # the second call reuses the cache (and the captured graphs)
        # Counting calls from Python would make the compiled graph guard on the count.
        with (contextlib.nullcontext([]) if compile else counting_ffa_calls()) as calls:
            got = greedy(model, ids, mask, new=16, compile_config=config)
        assert torch.equal(got, expected)
        if not compile:
            assert len(calls) == 15 * 2
    if compile:
        assert counters["stats"]["unique_graphs"] >= 1
