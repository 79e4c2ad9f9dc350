"""FFA's decode loop (ffa/transformers/loop.py) against transformers' own loop: the same returned
ids for every architecture, with left padding, EOS ids and early stops, minimum lengths, inferred
masks, repetition penalties and stop strings, the same tokens handed to streamers, and for
sampling the same draws; other decoding modes keep transformers' loop. CPU: the
loop's steps run eagerly; GPU (marked): replayed from a CUDA graph, eager or compiled."""

import string
import threading

import pytest
import torch
import transformers

import ffa.transformers as fft
from ffa.transformers import loop as decode_loop
from ffa.transformers.binding import binding_of
from test_transformers import ARCH_DTYPES, ARCHS, PROMPT, VOCAB, counting_ffa_calls, exact_dtype, prompts, tiny

transformers.logging.set_verbosity_error()


def both(model, ids, **kw):
    """(transformers' ids, FFA loop's ids, whether the loop ran) for one generate call."""
    expected = model.generate(ids, do_sample=False, **kw)
    fft.enable(model)
    try:
        got = model.generate(ids, do_sample=False, **kw)
        ran = binding_of(model).decode_step is not None
    finally:
        fft.disable(model)
    return expected, got, ran


def plain_tokens(model, ids, mask, new):
    """The greedy tokens of `new` steps with no EOS: [batch, new]."""
    out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new, eos_token_id=None,
                         pad_token_id=model.config.pad_token_id)
    return out[:, ids.shape[1]:]


def eos_ending_all(model, ids, mask, step):
    """EOS ids that end every row at or before `step`: the tokens the rows generate there."""
    return sorted(set(plain_tokens(model, ids, mask, step + 1)[:, step].tolist()))


def eos_ending_row_0(model, ids, mask, new):
    """An EOS id that row 0 generates within `new` steps and no other row does."""
    tokens = plain_tokens(model, ids, mask, new)
    others = set(tokens[1:].flatten().tolist())
    return next(t for t in tokens[0].tolist() if t not in others)


@pytest.mark.parametrize("arch,dtype", ARCH_DTYPES, ids=str)
def test_same_ids_as_transformers(arch, dtype):
    model = tiny(arch).to(dtype)
    ids, mask = prompts(model)
    pad = model.config.pad_token_id
    for kw in (dict(max_new_tokens=9, min_new_tokens=9), dict(max_new_tokens=20), dict(max_new_tokens=6, min_length=16),
               dict(max_length=PROMPT + 5)):
        expected, got, ran = both(model, ids, attention_mask=mask, pad_token_id=pad, **kw)
        assert ran, kw
        assert torch.equal(got, expected), kw


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_rows_that_finish_are_padded_and_the_call_ends_when_all_have(arch):
    model = tiny(arch).double()
    ids, mask = prompts(model)
    pad = model.config.pad_token_id
    row_0_stops = eos_ending_row_0(model, ids, mask, 12)
    all_stop = eos_ending_all(model, ids, mask, 3)
    for eos, kw in ((row_0_stops, {}), (all_stop, {}), (all_stop, dict(min_new_tokens=6)), (all_stop[:1], {})):
        expected, got, ran = both(model, ids, attention_mask=mask, pad_token_id=pad, eos_token_id=eos,
                                  max_new_tokens=12, **kw)
        assert ran and torch.equal(got, expected), (eos, kw)
        if eos is row_0_stops:  # row 0 ended early and was padded while the others ran on
            assert expected.shape[1] == PROMPT + 12 and expected[0, -1] == pad
        if eos is all_stop and not kw:  # the call ended early
            assert expected.shape[1] <= PROMPT + 4


@pytest.mark.parametrize("loop", [True, False], ids=["ffa-loop", "transformers-loop"])
def test_no_length_given_means_transformers_default(loop):
    """Neither max_new_tokens nor max_length: transformers generates its default max_length
    (20) of new tokens, and so does FFA (this crashed before with a TypeError)."""
    model = tiny("opt").double()
    ids, mask = prompts(model)
    expected = model.generate(ids, attention_mask=mask)
    fft.enable(model, decode_loop=loop)
    assert torch.equal(model.generate(ids, attention_mask=mask), expected)
    assert expected.shape[1] == PROMPT + 20
    # ... capped by the model's positions (128): a 120-token prompt gets 8.
    long_prompt = torch.randint(3, VOCAB, (1, 120), generator=torch.Generator().manual_seed(5))
    fft.disable(model)
    expected = model.generate(long_prompt)
    fft.enable(model, decode_loop=loop)
    assert torch.equal(model.generate(long_prompt), expected)
    assert expected.shape[1] == 128


@pytest.mark.parametrize("loop", [True, False], ids=["ffa-loop", "transformers-loop"])
def test_the_models_settings_fill_what_a_given_config_leaves_unset(loop):
    """The cache is sized from the merged settings: a generation_config without a length (by
    keyword or positionally) takes the model's max_new_tokens, as in transformers."""
    model = tiny("opt").double()
    ids, mask = prompts(model)
    model.generation_config.max_new_tokens = 30
    given = transformers.GenerationConfig(do_sample=False, pad_token_id=model.config.pad_token_id)
    expected = model.generate(ids, generation_config=given, attention_mask=mask)
    fft.enable(model, decode_loop=loop)
    assert torch.equal(model.generate(ids, generation_config=given, attention_mask=mask), expected)
    assert torch.equal(model.generate(ids, given, attention_mask=mask), expected)
    assert expected.shape[1] == PROMPT + 30


def test_mask_inferred_from_padding_and_pad_defaulting_to_eos():
    model = tiny("llama").double()
    ids, mask = prompts(model)
    # No attention_mask: transformers infers it from pad_token_id (0 in the padded rows).
    expected, got, ran = both(model, ids, max_new_tokens=7, pad_token_id=model.config.pad_token_id)
    assert ran and torch.equal(got, expected)
    # No pad_token_id: transformers pads finished rows with the first EOS id.
    eos = eos_ending_all(model, ids[:1], None, 1)
    expected, got, ran = both(model, ids[:1], max_new_tokens=7, pad_token_id=None, eos_token_id=eos)
    assert ran and torch.equal(got, expected)


@pytest.mark.parametrize("arch", ["opt", "llama", "gptj"])
def test_sampling_draws_what_transformers_draws(arch):
    """Same seed, same draws: the loop applies transformers' warpers in its order (temperature,
    top-k with its default of 50, top-p) and draws with torch.multinomial as it does."""
    model = tiny(arch).double()
    ids, mask = prompts(model)
    pad = model.config.pad_token_id
    all_stop = eos_ending_all(model, ids, mask, 3)
    for kw in (dict(), dict(temperature=0.7, top_p=0.9), dict(top_k=5, temperature=1.5), dict(top_k=0),
               dict(eos_token_id=all_stop, top_k=3), dict(min_new_tokens=10, top_k=3)):
        torch.manual_seed(7)
        expected = model.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=10, pad_token_id=pad, **kw)
        fft.enable(model)
        torch.manual_seed(7)
        got = model.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=10, pad_token_id=pad, **kw)
        assert binding_of(model).decode_step.warpers is not None
        fft.disable(model)
        assert torch.equal(got, expected), kw
    # The draws are random: another seed gives other tokens.
    fft.enable(model)
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        runs.append(model.generate(ids, attention_mask=mask, do_sample=True, max_new_tokens=10, pad_token_id=pad))
    assert not torch.equal(runs[0], runs[1])


def test_generation_config_is_merged_as_transformers_merges_it():
    """A generation_config that leaves eos_token_id unset takes the model's, as in transformers."""
    model = tiny("llama").double()
    ids, mask = prompts(model)
    model.generation_config.eos_token_id = eos_ending_all(model, ids, mask, 2)
    config = transformers.GenerationConfig(max_new_tokens=10, pad_token_id=model.config.pad_token_id)
    expected, got, ran = both(model, ids, attention_mask=mask, generation_config=config)
    assert ran and torch.equal(got, expected)
    assert expected.shape[1] <= PROMPT + 3  # the model's EOS ids ended the call


def test_other_decoding_modes_keep_transformers_loop():
    model = tiny("opt").double()
    ids, mask = prompts(model)
    common = dict(attention_mask=mask, max_new_tokens=5, pad_token_id=model.config.pad_token_id)
    for kw in (dict(num_beams=2), dict(no_repeat_ngram_size=2), dict(return_dict_in_generate=True),
               dict(stop_strings=None, max_time=10.0), dict(do_sample=True, min_p=0.1),
               dict(do_sample=True, typical_p=0.9)):
        torch.manual_seed(0)
        expected = model.generate(ids, **common, **kw)
        fft.enable(model, compile=True)
        torch.manual_seed(0)
        with counting_ffa_calls() as calls:
            got = model.generate(ids, **common, **kw)
        assert binding_of(model).decode_step is None, kw
        assert calls, kw  # transformers' loop, still with FFA's attention
        fft.disable(model)
        if isinstance(expected, torch.Tensor):
            assert torch.equal(got, expected), kw
        else:
            assert torch.equal(got.sequences, expected.sequences), kw
    config, rest = decode_loop.merged_config(model, common)
    assert decode_loop.plan(model, config, ids, rest) is not None
    model.hf_device_map = {"model.decoder": 0, "lm_head": 1}  # spread over two devices
    assert decode_loop.plan(model, config, ids, rest) is None
    del model.hf_device_map
    # decode_loop=False hands greedy search back to transformers' loop.
    fft.enable(model, compile=True, decode_loop=False)
    model.generate(ids, **common)
    assert binding_of(model).decode_step is None
    with pytest.raises(TypeError, match="decode_loop"):
        fft.enable(model, decode_loop=1)


def test_the_step_is_reused_while_its_cache_and_batch_hold():
    model = fft.enable(tiny("qwen2").double(), compile=True)
    ids, mask = prompts(model)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=model.config.pad_token_id)
    first = model.generate(ids, attention_mask=mask, **kw)
    step = binding_of(model).decode_step
    assert torch.equal(model.generate(ids, attention_mask=mask, **kw), first)
    assert binding_of(model).decode_step is step
    single = model.generate(ids[:1], attention_mask=mask[:1], **kw)
    assert binding_of(model).decode_step is not step  # another batch size: another step
    assert torch.equal(single, first[:1])


def test_several_eos_ids_each_end_their_rows():
    """EOS ids [a, b]: row 0 ends at a, the other rows at b or later; ids as transformers gives them."""
    model = tiny("llama").double()
    ids, mask = prompts(model)
    tokens = plain_tokens(model, ids, mask, 12)
    first = eos_ending_row_0(model, ids, mask, 12)
    second = next(t for t in tokens[1].tolist() if t != first)
    expected, got, ran = both(model, ids, attention_mask=mask, pad_token_id=model.config.pad_token_id,
                              eos_token_id=[first, second], max_new_tokens=12)
    assert ran and torch.equal(got, expected)
    generated = expected[:, PROMPT:]
    assert (generated[0] == first).any() and (generated[1] == second).any()


@pytest.mark.parametrize("arch", ["opt", "llama", "gemma2"])
def test_repetition_penalty_equals_transformers(arch):
    """Penalties above and below 1, over the prompt (padding included) and the tokens so far,
    in greedy search and sampling, with EOS ids and minimum lengths."""
    model = tiny(arch).to(exact_dtype(arch))
    ids, mask = prompts(model)
    pad = model.config.pad_token_id
    all_stop = eos_ending_all(model, ids, mask, 5)
    plain = plain_tokens(model, ids, mask, 10)
    for kw in (dict(repetition_penalty=1.5), dict(repetition_penalty=0.7), dict(repetition_penalty=3.0, top_k=4),
               dict(repetition_penalty=1.2, eos_token_id=all_stop, min_new_tokens=3)):
        sample = "top_k" in kw
        common = dict(attention_mask=mask, max_new_tokens=10, pad_token_id=pad, do_sample=sample, **kw)
        torch.manual_seed(3)
        expected = model.generate(ids, **common)
        fft.enable(model)
        torch.manual_seed(3)
        got = model.generate(ids, **common)
        assert binding_of(model).decode_step.penalty == kw["repetition_penalty"], kw
        fft.disable(model)
        assert torch.equal(got, expected), kw
    assert not torch.equal(expected[:, PROMPT:], plain)  # the penalty changed the tokens
    fft.enable(model)
    with pytest.raises(ValueError, match="penalty"):  # transformers' own check of the value
        model.generate(ids, attention_mask=mask, max_new_tokens=3, repetition_penalty=-1.0)


def char_tokenizer():
    """A tokenizer of VOCAB ids: pad, bos, eos, then one printable character each."""
    from tokenizers import Tokenizer, decoders, models
    chars = (string.ascii_letters + string.digits + string.punctuation)[:VOCAB - 3]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                                eos_token="</s>")


def test_stop_strings_end_rows_as_in_transformers():
    """Stop strings of two generated tokens, of one token, and one across the end of the prompt;
    with and without EOS ids (without, finished rows are not padded); greedy and sampling."""
    model = tiny("llama").double()
    tokenizer = char_tokenizer()
    ids, mask = prompts(model)
    tokens = plain_tokens(model, ids, mask, 12)
    two = tokenizer.decode(tokens[0, 4:6])
    one = tokenizer.decode(tokens[1, 7:8])
    across = tokenizer.decode([ids[2, -1], tokens[2, 0]])
    pad = model.config.pad_token_id
    cases = [([two], {}), ([two, one], dict(eos_token_id=None)), ([across], {}), ([two, one, across], {}),
             (two, dict(do_sample=True, top_k=3)), ([one], dict(eos_token_id=eos_ending_row_0(model, ids, mask, 12)))]
    lengths = []
    for stop, kw in cases:
        common = dict(attention_mask=mask, max_new_tokens=12, pad_token_id=pad, stop_strings=stop,
                      tokenizer=tokenizer, do_sample=False)
        common.update(kw)
        torch.manual_seed(5)
        expected = model.generate(ids, **common)
        fft.enable(model)
        torch.manual_seed(5)
        got = model.generate(ids, **common)
        assert binding_of(model).decode_step.stop is not None, stop
        fft.disable(model)
        assert torch.equal(got, expected), (stop, kw)
        lengths.append(expected.shape[1] - PROMPT)
    assert lengths[3] <= 8  # with all three strings every row stopped early
    fft.enable(model)
    with pytest.raises(ValueError, match="tokenizer"):  # transformers' loop says what is missing
        model.generate(ids, attention_mask=mask, max_new_tokens=3, stop_strings="ab")


class RecordingStreamer(transformers.generation.streamers.BaseStreamer):
    """Every put (a copy of the ids) and end, in order."""

    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(value.clone())

    def end(self):
        self.calls.append("end")


def same_calls(a, b):
    return len(a) == len(b) and all(x == y if isinstance(x, str) else isinstance(y, torch.Tensor) and
                                    x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("kw", [dict(), dict(eos="all"), dict(eos="row 0", repetition_penalty=1.3)], ids=str)
def test_streamer_gets_what_transformers_gives_it(kw):
    """The prompt, then each step's tokens (finished rows' padding included, none after the
    last step of the output), then end(); a batch of 3 with left padding."""
    model = tiny("opt").double()
    ids, mask = prompts(model)
    kw = dict(kw)
    eos = kw.pop("eos", None)
    if eos is not None:
        kw["eos_token_id"] = eos_ending_all(model, ids, mask, 4) if eos == "all" else eos_ending_row_0(model, ids,
                                                                                                        mask, 10)
    common = dict(attention_mask=mask, max_new_tokens=10, pad_token_id=model.config.pad_token_id, do_sample=False,
                  **kw)
    theirs, ours = RecordingStreamer(), RecordingStreamer()
    expected = model.generate(ids, streamer=theirs, **common)
    fft.enable(model)
    got = model.generate(ids, streamer=ours, **common)
    assert binding_of(model).decode_step is not None
    assert torch.equal(got, expected)
    assert same_calls(ours.calls, theirs.calls), (len(ours.calls), len(theirs.calls))
    assert len(theirs.calls) == 1 + (expected.shape[1] - PROMPT) + 1


def test_text_iterator_streamer_yields_the_generated_text():
    """TextIteratorStreamer yields the text of the generated tokens to another thread, as with
    transformers' loop."""
    model = tiny("llama").double()
    tokenizer = char_tokenizer()
    ids = prompts(model, pads=(0,))[0]
    common = dict(max_new_tokens=10, do_sample=False, pad_token_id=model.config.pad_token_id, eos_token_id=None)

    def iterated(model):
        streamer = transformers.TextIteratorStreamer(tokenizer, skip_prompt=True)
        pieces = []
        reader = threading.Thread(target=lambda: pieces.extend(streamer))
        reader.start()
        out = model.generate(ids, streamer=streamer, **common)
        reader.join(timeout=60)
        return out, "".join(pieces)

    expected, expected_text = iterated(model)
    fft.enable(model)
    got, text = iterated(model)
    assert binding_of(model).decode_step is not None
    assert torch.equal(got, expected) and text == expected_text
    assert text == tokenizer.decode(expected[0, PROMPT:]) and len(text) == 10


def test_text_streamer_prints_the_generated_text(capsys):
    model = tiny("llama").double()
    tokenizer = char_tokenizer()
    ids = prompts(model, pads=(0,))[0]
    common = dict(max_new_tokens=10, do_sample=False, pad_token_id=model.config.pad_token_id, eos_token_id=None)
    expected = model.generate(ids, streamer=transformers.TextStreamer(tokenizer, skip_prompt=True), **common)
    expected_text = capsys.readouterr().out
    fft.enable(model)
    got = model.generate(ids, streamer=transformers.TextStreamer(tokenizer, skip_prompt=True), **common)
    assert torch.equal(got, expected) and capsys.readouterr().out == expected_text
    assert expected_text.strip() == tokenizer.decode(expected[0, PROMPT:])


GPU_CASES = [(arch, False) for arch in ARCHS] + [("opt", True), ("llama", True)]


def has_grouped_experts(model):
    """Whether the model's decode step cannot be captured in a CUDA graph: transformers' grouped-GEMM
    mixture-of-experts layers (classes under its experts interface, `use_experts_implementation`,
    which sets is_concatenated on each) copy expert offsets from pageable host memory."""
    return any(hasattr(module, "is_concatenated") for module in model.modules())


@pytest.mark.gpu
@pytest.mark.parametrize("arch,compile", GPU_CASES, ids=[f"{a}-{'compiled' if c else 'eager'}" for a, c in GPU_CASES])
def test_gpu_graph_loop_equals_transformers(arch, compile):
    """Eager or compiled step in a CUDA graph, lagged stop check: float32 ids equal
    transformers' eager ones, also when rows finish early, on a reused graph and after a batch
    change."""
    model = tiny(arch).cuda()
    uncapturable = has_grouped_experts(model)
    ids, mask = (x.cuda() for x in prompts(model))
    pad = model.config.pad_token_id
    all_stop = eos_ending_all(model, ids, mask, 3)
    cases = [dict(max_new_tokens=16, min_new_tokens=16), dict(max_new_tokens=16, eos_token_id=all_stop),
             dict(max_new_tokens=16, eos_token_id=all_stop, min_new_tokens=9)]
    expected = [model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=pad, **kw) for kw in cases]
    fft.enable(model, compile=compile)
    torch._dynamo.reset()
    for kw, want in zip(cases + cases, expected + expected):
        got = model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=pad, **kw)
        step = binding_of(model).decode_step
        if uncapturable:  # the loop says why and runs the step eagerly
            assert step.graph is None and "graph capture" in step.uncapturable
        else:
            assert step.graph is not None and step.uncapturable is None
        assert torch.equal(got, want), kw
    if uncapturable:
        return
    assert expected[1].shape[1] <= PROMPT + 4  # the early stop happened
    single = model.generate(ids[:1], attention_mask=mask[:1], do_sample=False, pad_token_id=pad, **cases[0])
    assert torch.equal(single, expected[0][:1])
    # A dtype change reallocates the cache at the next prefill: the graph is captured again.
    model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=pad, **cases[0])
    graph = binding_of(model).decode_step.graph
    model.half()
    halves = [model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=pad, **cases[0]) for _ in range(2)]
    assert binding_of(model).decode_step.graph is not graph
    fft.enable(model, compile=compile)  # forgets every step and cache: a fresh capture
    assert torch.equal(halves[0], halves[1])
    assert torch.equal(model.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=pad, **cases[0]),
                       halves[0])


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_gpu_sampling_in_the_graph(compile):
    """Sampling replayed from a CUDA graph: top_k=1 is greedy search; a seed fixes the draws
    (the graph's random offsets advance per replay as eager draws do) and another seed changes them."""
    model = tiny("llama").cuda()
    ids, mask = (x.cuda() for x in prompts(model))
    kw = dict(attention_mask=mask, max_new_tokens=16, pad_token_id=model.config.pad_token_id)
    greedy_ids = model.generate(ids, do_sample=False, **kw)
    fft.enable(model, compile=compile)
    torch._dynamo.reset()
    assert torch.equal(model.generate(ids, do_sample=True, top_k=1, **kw), greedy_ids)
    assert binding_of(model).decode_step.graph is not None
    runs = {}
    for seed in (3, 4, 3):
        torch.manual_seed(seed)
        runs.setdefault(seed, []).append(model.generate(ids, do_sample=True, temperature=1.5, **kw))
    assert torch.equal(runs[3][0], runs[3][1])
    assert not torch.equal(runs[3][0], runs[4][0])


@pytest.mark.gpu
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_gpu_graph_loop_penalty_stop_strings_and_streamer(compile):
    """In the CUDA graph: repetition penalty, stop strings (with and without EOS ids) and a
    streamer give transformers' ids and streamer calls (float32)."""
    model = tiny("llama").cuda()
    tokenizer = char_tokenizer()
    ids, mask = (x.cuda() for x in prompts(model))
    tokens = plain_tokens(model, ids, mask, 16)
    two, across = tokenizer.decode(tokens[0, 4:6]), tokenizer.decode([ids[2, -1], tokens[2, 0]])
    pad = model.config.pad_token_id
    cases = [dict(repetition_penalty=1.4), dict(stop_strings=[two, across], tokenizer=tokenizer),
             dict(stop_strings=[two], tokenizer=tokenizer, eos_token_id=None, repetition_penalty=0.8),
             dict(eos_token_id=eos_ending_all(model, ids, mask, 6)), dict()]
    expected = []
    for kw in cases:
        streamer = RecordingStreamer()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=pad,
                             streamer=streamer, **kw)
        expected.append((out, streamer.calls))
    fft.enable(model, compile=compile)
    torch._dynamo.reset()
    for kw, (want, want_calls) in zip(cases + cases, expected + expected):  # again: the graphs are reused
        streamer = RecordingStreamer()
        got = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=pad,
                             streamer=streamer, **kw)
        assert binding_of(model).decode_step.graph is not None
        assert torch.equal(got, want), kw
        assert same_calls(streamer.calls, want_calls), kw


@pytest.mark.gpu
def test_gpu_streamed_tokens_arrive_a_few_steps_late_without_a_wait_per_token(monkeypatch):
    """Token j reaches the streamer once the host has queued STOP_CHECK_LAG more steps (the
    host never waits for the step it has just queued), and the last ones right after the last
    step; the prompt comes first and end() last."""
    model = fft.enable(tiny("llama").cuda())
    ids = prompts(model, pads=(0,))[0].cuda()
    replays = []
    original = torch.cuda.CUDAGraph.replay

    def counted(graph):
        replays.append(None)
        return original(graph)

    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", counted)

    class Timed(RecordingStreamer):
        def put(self, value):
            super().put(value)
            self.calls.append(len(replays))

    common = dict(max_new_tokens=16, do_sample=False, pad_token_id=model.config.pad_token_id, eos_token_id=None)
    model.generate(ids, **common)  # captures the graph
    replays.clear()
    streamer = Timed()
    model.generate(ids, streamer=streamer, **common)
    at = streamer.calls[1:-1:2]  # replays queued when each put came: the prompt's, then tokens 0 .. 15
    steps, lag = 15, decode_loop.STOP_CHECK_LAG
    assert at == [0] + [min(j + lag, steps) for j in range(steps + 1)], at
    assert streamer.calls[-1] == "end" and len(replays) == steps
