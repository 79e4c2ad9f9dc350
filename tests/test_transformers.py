"""ffa.transformers on tiny random-weight models of every supported architecture (CPU reference
path; GPU cases marked): FFA's greedy tokens equal Hugging Face's, padded batches equal single
sequences, and a decode step touches the cache only through FFA's fused append."""

import contextlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from transformers import DynamicCache  # noqa: E402

import ffa  # noqa: E402
import ffa.transformers as fft  # noqa: E402
from ffa.transformers.binding import binding_of  # noqa: E402

transformers.logging.set_verbosity_error()
ROOT = Path(__file__).resolve().parent.parent
VOCAB = 96
PROMPT, NEW = 12, 8


def tiny(arch):
    """A 2-layer model of `arch` with random weights (head_dim 32; GQA for the Llama family;
    Mistral with a sliding window shorter than prompt + new tokens)."""
    t = transformers
    llama_like = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)
    configs = {
        "opt": lambda: t.OPTForCausalLM(t.OPTConfig(
            vocab_size=VOCAB, hidden_size=64, word_embed_proj_dim=64, ffn_dim=128, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=128, pad_token_id=1, bos_token_id=2, eos_token_id=2)),
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=2, n_positions=128, bos_token_id=0, eos_token_id=0,
            pad_token_id=0)),
        "gptj": lambda: t.GPTJForCausalLM(t.GPTJConfig(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=2, rotary_dim=16, n_positions=128, bos_token_id=0,
            eos_token_id=0, pad_token_id=0)),
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(num_key_value_heads=2, **llama_like)),
        "mistral": lambda: t.MistralForCausalLM(
            t.MistralConfig(num_key_value_heads=2, sliding_window=10, **llama_like)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(num_key_value_heads=1, **llama_like)),
    }
    torch.manual_seed(0)
    return configs[arch]().eval()


ARCHS = ["opt", "gpt2", "gptj", "llama", "mistral", "qwen2"]


def logits_tolerance(arch, dtype):
    """GPT-J computes attention scores in float32 even in a float64 model."""
    if dtype == torch.float64:
        return 1e-6 if arch == "gptj" else 1e-10
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
    """Counts FastForwardAttn.attention calls (proves the decode steps went through FFA)."""
    calls = []
    original = ffa.FastForwardAttn.attention

    def counted(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    ffa.FastForwardAttn.attention = counted
    try:
        yield calls
    finally:
        ffa.FastForwardAttn.attention = original


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_equal_hugging_face(arch, dtype):
    model = tiny(arch).to(dtype)
    ids, mask = prompts(model)
    expected, expected_logits = greedy(model, ids, mask, with_logits=True)
    fft.enable(model)
    with counting_ffa_calls() as calls:
        got, logits = greedy(model, ids, mask, with_logits=True)
    # NEW - 1 decode steps (the prompt's forward yields the first token) in each of 2 layers.
    assert len(calls) == (NEW - 1) * 2
    assert torch.equal(got, expected)
    tolerance = logits_tolerance(arch, dtype)
    torch.testing.assert_close(logits, expected_logits, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_equals_single_sequences(arch):
    model = fft.enable(tiny(arch).double())
    pads = (0, 4)
    ids, mask = prompts(model, pads)
    batch, batch_logits = greedy(model, ids, mask, with_logits=True)
    for row, pad in enumerate(pads):
        single, logits = greedy(model, ids[row:row + 1, pad:], with_logits=True)
        assert torch.equal(single[0], batch[row]), f"row {row} (left padding {pad})"
        tolerance = logits_tolerance(arch, torch.float64)
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
    with pytest.raises(ValueError, match="not supported"):
        fft.enable(transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)))
    odd = transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=48, word_embed_proj_dim=48, ffn_dim=64, num_hidden_layers=1,
        num_attention_heads=2))
    with pytest.raises(ValueError, match="head_dim 24"):
        fft.enable(odd)
    assert not fft.is_enabled(odd)


@pytest.mark.skipif(not (ROOT / "summarize.py").exists(), reason="summarize.py is not beside tests/ (installed-wheel run)")
def test_summarize_smoke(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # as when run as a script: bench/ beside it is importable
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
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
