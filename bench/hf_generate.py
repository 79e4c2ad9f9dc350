"""Hugging Face `generate` with FFA against transformers' own decode paths (a GPU program).

    python bench/hf_generate.py --out bench/results/hf_generate.json
    python bench/hf_generate.py --shape llama-3-8b --paths ffa ffa_sdpa --batches 1 8 32 --prompts 1000 4000 \
        --decode-time --no-profile --no-bf16 --out ab.json          # the kernel's share of generate

Model: a built-in shape with random weights (--shape: OPT-1.3b's, the default, with positions for
prompts up to 4,096 tokens; Llama-3-8B's, Qwen3-8B's, Gemma-3-4B's, gpt-oss-20b's, Gemma 4's), or --model, a local
checkpoint folder or GGUF file (its tokenizer then turns a real text into the prompts and the
first row's continuation is printed); fp16; prompts of --prompts random tokens; exactly --new
new tokens (greedy, EOS suppressed; --sample: sampling with transformers' defaults); --batches.
Paths:
  hf            Hugging Face default: SDPA, dynamic cache
  hf_static     cache_implementation="static": generate compiles the decode step (CUDA graphs)
  ffa           ffa.transformers.enable(model): FFA's decode loop replays the eager decode step
                from a CUDA graph (ffa/transformers/loop.py)
  ffa_compiled  ffa.transformers.enable(model, compile=True): the same loop, the step compiled
  ffa_hf_loop   enable(model, decode_loop=False): transformers' loop, FFA's eager decode steps
  ffa_compiled_hf_loop
                enable(model, compile=True, decode_loop=False): transformers' loop compiles FFA's
                decode step, as it does for its static cache
  ffa_sdpa      enable(model, kernel="sdpa"): FFA's loop and cache as `ffa`, attention done by
                two cache copies + torch's SDPA over the masked cache (cuDNN first) instead of
                FFA's kernel: `ffa` against `ffa_sdpa` is what the kernel contributes
For every path, prompt and batch: the first generate (warm-up; compilation for the compiled
paths) and the median wall time of --repeats more; with --decode-time also the median of
generate with one new token (the prefill and the first token), so that decode_s = median -
prefill_s is the time of the new tokens after the first. Then:
  agreement  generated tokens of each path against hf at the largest batch, in fp16 and (model
             cast to bf16) in bf16: first 32 identical? share of the 128 identical? hf_static's
             agreement with hf is the fp16 yardstick, hf with eager attention the bf16 one:
             random weights give small logit margins, so rounding alone flips greedy choices.
  profile    torch.profiler over one generate per path at the largest batch: GPU time in
             attention kernels, in copies (cache writes and concatenations), in matrix
             multiplies and in the rest, and the wall time the GPU stood idle (Python and launch
             overhead: the median wall time minus the GPU busy time).
Prints a short table last and writes everything to --out (JSON). About 5 minutes on an H100.
"""

import argparse
import json
import logging
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from shared import environment, say, token_agreement

PATHS = ("hf", "hf_static", "ffa", "ffa_compiled", "ffa_hf_loop", "ffa_compiled_hf_loop", "ffa_sdpa")
# Built-in shapes (config class, settings) for random-weight models: the published configs'
# sizes. OPT-1.3b gets positions for 4,096-token prompts (the original has 2,048; nothing else
# changes). gpt-oss-20b: GptOssConfig's defaults (gpt-oss-120b's) with 20b's 24 layers and 32
# experts (attention sinks, 128-position windows on every other layer). gemma-4: transformers'
# default Gemma4TextConfig (sliding layers of head_dim 256; every sixth layer full, of head_dim 512).
SHAPES = {
    "opt-1.3b": ("OPTConfig", dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192,
                                   word_embed_proj_dim=2048, max_position_embeddings=4608, vocab_size=50272)),
    "llama-3-8b": ("LlamaConfig", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                       num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                       vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)),
    "qwen3-8b": ("Qwen3Config", dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                                     max_position_embeddings=40960, rope_theta=1000000.0)),
    "gemma-3-4b": ("Gemma3TextConfig", dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                                            num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                            vocab_size=262208, sliding_window=1024, query_pre_attn_scalar=256,
                                            max_position_embeddings=131072)),
    "gpt-oss-20b": ("GptOssConfig", dict(num_hidden_layers=24, num_local_experts=32)),
    "gemma-4": ("Gemma4TextConfig", dict()),
}
# A real text for models with a tokenizer (--model): repeated to the prompt length.
TEXT = ("The key/value cache of a transformer holds one row per earlier token and layer. Each new token "
        "attends to all of them, so generating text reads the whole cache once per token and layer. ")
# CUDA runtime calls that block the host until the GPU has caught up (a device-to-host copy, as
# .item() makes, waits for the work queued before it).
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cudaMemcpyAsync")
KERNEL_CLASSES = (  # first match wins; names as the CUDA profiler reports them
    ("attention", ("decode_kernel", "combine_kernel", "flash", "fmha", "attention", "sdpa")),
    ("copy", ("copy", "memcpy", "memset", "catarray", "cat_", "index_put", "index_copy", "scatter")),
    ("matmul", ("gemm", "cutlass", "cublas", "xmma", "nvjet", "matmul", "mm_")),
)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--model", default=None, help="local checkpoint folder or .gguf file (default: --shape)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="opt-1.3b", help="built-in random-weight shape")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 10])
    p.add_argument("--prompts", type=int, nargs="+", default=[1000], help="prompt lengths in tokens")
    p.add_argument("--decode-time", action="store_true",
                   help="also time generate with one new token, to report the decode steps apart from the prefill")
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip the bf16 agreement check")
    p.add_argument("--sample", action="store_true",
                   help="sample (do_sample=True, transformers' default top_k=50) instead of greedy search; "
                        "no token agreement is checked")
    return p.parse_args()


class CudagraphSkips(logging.Handler):
    """Collects inductor's "skipping cudagraphs due to ..." messages (the compiled paths are
    only fast when CUDA graphs are used)."""

    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if "skipping cudagraphs" in message:
            self.messages.append(message[:400])


def build_model(args):
    """(model, tokenizer or None, description)."""
    import transformers
    if args.model:
        path = Path(args.model)
        folder, gguf = (path.parent, {"gguf_file": path.name}) if path.suffix == ".gguf" else (path, {})
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16, local_files_only=True,
                                                                  **gguf)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True, **gguf)
        return model.cuda().eval(), tokenizer, args.model
    name, settings = SHAPES[args.shape]
    config = getattr(transformers, name)(**settings)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    return model.eval(), None, f"{args.shape} shape, random weights"


def prompts(model, tokenizer, batch, length):
    """[batch, length] prompt ids and mask: TEXT's tokens (with a tokenizer), else random ids."""
    if tokenizer is not None:
        text = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
        ids = torch.tensor((text * (length // len(text) + 1))[:length]).repeat(batch, 1).cuda()
        return ids, torch.ones_like(ids)
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(4, model.config.vocab_size, (batch, length), generator=g).cuda()
    return ids, torch.ones_like(ids)


def generate(model, ids, mask, new, sample=False, **kw):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=sample,
                         pad_token_id=model.config.pad_token_id, **kw)
    torch.cuda.synchronize()
    return out[:, ids.shape[1]:]


def wall(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def setup_path(model, path):
    """Put the model in the state of `path`; returns extra generate kwargs."""
    import ffa.transformers as fft
    torch._dynamo.reset()
    if fft.is_enabled(model):
        fft.disable(model)  # every path starts from the plain model (enable keeps options otherwise)
    if path in ("hf", "hf_static"):
        return {"cache_implementation": "static"} if path == "hf_static" else {}
    fft.enable(model, compile="compiled" in path, decode_loop=not path.endswith("hf_loop"),
               kernel="sdpa" if path == "ffa_sdpa" else "ffa")
    return {}


def time_path(model, tokenizer, path, extra, args, skips):
    """{"p<prompt>_b<batch>": {...}} for one path; the tokens of every case are kept for the
    agreement check."""
    counters = torch._dynamo.utils.counters
    counters.clear()
    skips.messages.clear()
    out = {}
    for prompt in args.prompts:
        for batch in args.batches:
            ids, mask = prompts(model, tokenizer, batch, prompt)
            tokens, first = wall(lambda: generate(model, ids, mask, args.new, **extra))
            runs = [wall(lambda: generate(model, ids, mask, args.new, **extra))[1] for _ in range(args.repeats)]
            case = {"prompt": prompt, "batch": batch, "first_call_s": first, "median_s": statistics.median(runs),
                    "runs_s": runs, "tokens": tokens}
            if args.decode_time:
                generate(model, ids, mask, 1, **extra)  # its own warm-up (a one-token generate is another plan)
                prefill = [wall(lambda: generate(model, ids, mask, 1, **extra))[1] for _ in range(args.repeats)]
                case.update(prefill_s=statistics.median(prefill), decode_s=case["median_s"] - statistics.median(prefill))
            out[case_key(prompt, batch)] = case
            say(f"  {path:20s} prompt {prompt:5d} batch {batch:3d}: first call {first:7.2f} s, median "
                f"{case['median_s']:.3f} s" + (f", decode {case['decode_s']:.3f} s" if args.decode_time else ""))
    info = {"graph_breaks": sum(counters["graph_break"].values()), "unique_graphs": counters["stats"]["unique_graphs"],
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
            "cudagraph_skip_reasons": sorted(set(skips.messages))}
    return out, info


def case_key(prompt, batch):
    return f"p{prompt}_b{batch}"


def classify(name):
    lower = name.lower()
    for label, keys in KERNEL_CLASSES:
        if any(k in lower for k in keys):
            return label
    return "other"


def profile_path(model, tokenizer, extra, batch, args, median_s):
    """GPU time by kernel class over one generate at the first prompt length (the model still
    set up and warm from its timing), and the idle time against the median wall time."""
    from torch.profiler import ProfilerActivity, profile
    ids, mask = prompts(model, tokenizer, batch, args.prompts[0])
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate(model, ids, mask, args.new, **extra)
    totals = {"attention": 0.0, "copy": 0.0, "matmul": 0.0, "other": 0.0}
    top, syncs = {}, {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            us = e.time_range.elapsed_us()
            totals[classify(e.name)] += us
            top[e.name] = top.get(e.name, 0.0) + us
        elif e.name in SYNC_CALLS:
            syncs[e.name] = syncs.get(e.name, 0) + 1
    host = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)[:10]
    busy = sum(totals.values()) / 1e6
    result = {k + "_s": v / 1e6 for k, v in totals.items()}
    result.update(gpu_busy_s=busy, wall_s=median_s, idle_s=max(median_s - busy, 0.0),
                  top_kernels=[(n[:120], us / 1e6) for n, us in sorted(top.items(), key=lambda x: -x[1])[:8]],
                  # Host side: calls that make the host wait for the GPU, and where host time goes.
                  syncs=syncs, top_host_ops=[(a.key[:80], a.count, a.self_cpu_time_total / 1e6) for a in host],
                  # Some CUDA/profiler versions do not trace the kernels inside CUDA graph replays.
                  graph_kernels_missing=busy < 0.1 * median_s)
    return result


def main():
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/hf_generate.py needs a CUDA GPU")
    import transformers
    transformers.logging.set_verbosity_error()
    for name in ("cache_size_limit", "recompile_limit"):  # batch sizes and paths share one compiled call
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 64)
    skips = CudagraphSkips()
    logging.getLogger("torch._inductor.cudagraph_utils.__cudagraphs").addHandler(skips)

    model, tokenizer, source = build_model(args)
    record = {**environment(" ".join(["python"] + sys.argv), torch.cuda.get_device_name()), "model": source,
              "dtype": "float16", "prompts": args.prompts, "new_tokens": args.new, "batches": args.batches,
              "repeats": args.repeats, "sample": args.sample, "timing": {}, "compile": {}, "errors": {},
              "profile": {}, "samples": {}}
    say(f"{record['device']} | torch {record['torch']} | transformers {record['transformers']} | {source}")
    tokens, big = {}, case_key(args.prompts[0], max(args.batches))  # the case of the checks and the profile
    for path in args.paths:
        try:
            extra = dict(setup_path(model, path), sample=args.sample)
            result, info = time_path(model, tokenizer, path, extra, args, skips)
            if args.profile:
                record["profile"][path] = profile_path(model, tokenizer, extra, max(args.batches), args,
                                                       result[big]["median_s"])
        except Exception as e:  # keep the other paths' numbers
            record["errors"][path] = f"{type(e).__name__}: {e}"
            say(f"  {path}: FAILED {record['errors'][path]}")
            traceback.print_exc()
            continue
        tokens[path] = {key: r.pop("tokens").cpu() for key, r in result.items()}
        record["timing"][path] = result
        if tokenizer is not None:
            record["samples"][path] = tokenizer.decode(tokens[path][big][0])
            say(f"  {path} continues the text with: {record['samples'][path][:300]!r}")
        if path in ("hf_static", "ffa_compiled", "ffa_compiled_hf_loop"):
            record["compile"][path] = info

    record["agreement"] = {} if args.sample else {
        "float16": {p: token_agreement(tokens[p][big], tokens["hf"][big]) for p in tokens if p != "hf" and "hf" in tokens}}

    if args.bf16 and not args.sample and "hf" in tokens and "ffa" in tokens:
        try:
            model.to(torch.bfloat16)
            ids, mask = prompts(model, tokenizer, max(args.batches), args.prompts[0])
            setup_path(model, "hf")
            reference = generate(model, ids, mask, args.new).cpu()
            setup_path(model, "ffa")
            record["agreement"]["bfloat16"] = {"ffa": token_agreement(generate(model, ids, mask, args.new).cpu(), reference)}
            # The yardstick: Hugging Face's own eager attention against its SDPA, both in bf16.
            setup_path(model, "hf")
            model.set_attn_implementation("eager")
            try:
                yardstick = token_agreement(generate(model, ids, mask, args.new).cpu(), reference)
            finally:
                model.set_attn_implementation("sdpa")
            record["agreement"]["bfloat16"]["hf_eager_attention"] = yardstick
        except Exception as e:
            record["errors"]["bf16"] = f"{type(e).__name__}: {e}"

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    report(record, args)


def report(record, args):
    say(f"\n{record['device']}, {record['model']}, fp16, {args.new} new tokens{' (sampling)' if args.sample else ''}: "
        "wall time of one generate (median), first call (warm-up/compile) in brackets"
        + ("; decode = without the prefill and first token" if args.decode_time else ""))
    keys = [case_key(p, b) for p in args.prompts for b in args.batches]
    say(f"{'path':20s} | " + " | ".join(f"{k:>30s}" for k in keys))
    timing = record["timing"]
    for path in args.paths:
        if path not in timing:
            say(f"{path:20s} | failed: {record['errors'].get(path)}")
            continue
        cells = [f"{timing[path][k]['median_s']:7.3f} s ({timing[path][k]['first_call_s']:5.1f} s)"
                 + (f" dec {timing[path][k]['decode_s']:6.3f}" if args.decode_time else "") for k in keys]
        say(f"{path:20s} | " + " | ".join(f"{c:>30s}" for c in cells))
    for base in ("hf", "hf_static", "ffa_sdpa"):
        for path in PATHS[2:]:
            if base in timing and path in timing and path != base:
                field = "decode_s" if args.decode_time else "median_s"
                ratios = [timing[base][k][field] / timing[path][k][field] for k in keys]
                say(f"speedup {path} over {base} ({field}): " + ", ".join(f"{k} {r:.2f}x" for k, r in zip(keys, ratios)))
    for dtype, table in record["agreement"].items():
        for path, a in table.items():
            say(f"agreement with hf, {dtype}, {path}: first 32 identical {a['first_32_identical']}, "
                f"{100 * a['identical_share']:.1f}% identical, first difference at {a['first_difference']}")
    for path, info in record["compile"].items():
        say(f"compile {path}: {info['unique_graphs']} graphs, {info['graph_breaks']} graph breaks, "
            f"{info['cudagraph_skips']} cudagraph skips {info['cudagraph_skip_reasons'] or ''}")
    for path, prof in record["profile"].items():
        say(f"profile {path} (batch {max(args.batches)}): wall {prof['wall_s']:.3f} s = "
            f"GPU busy {prof['gpu_busy_s']:.3f} s "
            f"(attention {prof['attention_s']:.3f}, copies {prof['copy_s']:.3f}, matmul {prof['matmul_s']:.3f}, "
            f"other {prof['other_s']:.3f}) + GPU idle {prof['idle_s']:.3f} s"
            + (" [kernels inside CUDA graphs not traced]" if prof["graph_kernels_missing"] else ""))
        say(f"  host waits on the GPU: {prof['syncs'] or 'none'}; most host time: "
            + ", ".join(f"{name} {count}x {s:.3f} s" for name, count, s in prof["top_host_ops"][:6]))
    for key, error in record["errors"].items():
        say(f"error {key}: {error}")


if __name__ == "__main__":
    main()
