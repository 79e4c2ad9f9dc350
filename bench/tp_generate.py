"""Tensor-parallel `generate` with FFA against Hugging Face's default path, under torchrun.

    torchrun --nproc_per_node 2 bench/tp_generate.py --out bench/results/tp2.json   # TP over 2 GPUs
    python bench/tp_generate.py --out bench/results/tp1.json                        # the one-GPU figure

Every rank loads the same Llama-family model with transformers' tensor-parallel plan
(`from_pretrained(..., distributed_config=DistributedConfig(tp_plan="auto"))`: each rank holds
its share of the attention heads and MLP columns, and the row-wise projections all-reduce);
one process loads it whole. The model is a local checkpoint (--model) or random weights in a
built-in shape (--shape: Llama-3-8B's, or a tiny one for tests): rank 0 builds those from a fixed
seed and saves them once to --weights_dir, so that every rank, and a later run with another
process count, loads the same weights. Then, on the same model and prompts (random tokens, no
padding, greedy, exactly --new_tokens new tokens):
  hf   Hugging Face's default decode path (SDPA, dynamic cache)
  ffa  after ffa.transformers.enable(model) (--compile: enable(model, compile=True))
Each path: one warm-up generate, then --repeats timed ones (median), and as many prefills alone
(generate of one token), whose time is taken off to give the decode steps' rate. Rank 0 prints
a markdown table (tokens/s, greedy-token agreement of ffa with hf) and writes --out (JSON).
--device cpu runs the same thing on the CPU with the gloo backend (tests/test_tp.py does).
"""

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from shared import environment, token_agreement

SHAPES = {
    "llama-3-8b": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32,
                       intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192,
                       rope_theta=500000.0),
    "tiny": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_hidden_layers=2,
                 intermediate_size=128, vocab_size=256, max_position_embeddings=512),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SEED = 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="local checkpoint directory (default: random weights of --shape)")
    p.add_argument("--shape", choices=SHAPES, default="llama-3-8b", help="built-in config for random weights")
    p.add_argument("--layers", type=int, help="override the number of layers (shrinks the model)")
    p.add_argument("--weights_dir", type=Path, default=Path(tempfile.gettempdir()) / "ffa-tp-generate",
                   help="where random weights are saved once and reused (a filesystem every rank sees)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt_len", type=int, default=512)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="ffa.transformers.enable(model, compile=True)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", help="torch.distributed backend (default: nccl on cuda, gloo on cpu)")
    p.add_argument("--out", type=Path, help="JSON file written by rank 0")
    args = p.parse_args(argv)
    if min(args.batch, args.prompt_len, args.new_tokens, args.repeats, 1 if args.layers is None else args.layers) < 1:
        p.error("--batch, --prompt_len, --new_tokens, --repeats and --layers must be positive")
    if args.new_tokens < 2:
        p.error("--new_tokens must be at least 2 (one prefill token, then decode steps)")
    return args


def say(*parts):
    if rank() == 0:
        print(*parts, flush=True)


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


def start(args):
    """This process's device; joins the process group when torchrun started several."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA GPU here (use --device cpu)")
        torch.cuda.set_device(device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        dist.init_process_group(args.backend or ("nccl" if device.type == "cuda" else "gloo"),
                                device_id=device if device.type == "cuda" else None,
                                timeout=datetime.timedelta(minutes=30))
    return device


def random_checkpoint(args, dtype, device):
    """The directory of --shape's random weights: rank 0 builds and saves them (seeded, once,
    renamed into place when complete) while the other ranks wait."""
    import transformers
    config = transformers.LlamaConfig(**SHAPES[args.shape], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if args.layers is not None:
        config.num_hidden_layers = args.layers
    path = args.weights_dir / f"{args.shape}-{config.num_hidden_layers}l-{args.dtype}-seed{SEED}"
    if rank() == 0 and not path.is_dir():
        torch.manual_seed(SEED)
        with torch.device(device):
            model = transformers.LlamaForCausalLM._from_config(config, dtype=dtype)
        partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
        model.save_pretrained(partial)
        del model
        os.replace(partial, path)
    barrier()
    return path, f"{args.shape} shape, {config.num_hidden_layers} layers, random weights (seed {SEED})"


def load_model(args, dtype, device):
    import transformers
    if args.model and Path(args.model, "config.json").is_file():
        path, source = Path(args.model), args.model
    else:
        if args.model:
            say(f"--model {args.model} is not a local checkpoint: using random weights")
        path, source = random_checkpoint(args, dtype, device)
    if world() == 1:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        return model.to(device).eval(), source
    # Our own mesh, so that --device cpu stays on the CPU on a machine that has GPUs too.
    mesh = dist.init_device_mesh(device.type, (world(),))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, local_files_only=True, device_mesh=mesh,
        distributed_config=transformers.DistributedConfig(tp_plan="auto"))
    return model.eval(), source


def prompts(model, args, device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt_len), generator=g).to(device)
    return ids, torch.ones_like(ids)


def generate(model, ids, mask, new):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         pad_token_id=model.config.pad_token_id)
    return out[:, ids.shape[1]:]


def timed(fn, device):
    """fn() and its wall time, every rank starting together."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    barrier()
    begin = time.perf_counter()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return value, time.perf_counter() - begin


def measure(model, ids, mask, args, device):
    """Tokens of the last timed generate and the path's timings."""
    tokens, first = timed(lambda: generate(model, ids, mask, args.new_tokens), device)
    runs = [timed(lambda: generate(model, ids, mask, args.new_tokens), device)[1] for _ in range(args.repeats)]
    prefills = [timed(lambda: generate(model, ids, mask, 1), device)[1] for _ in range(args.repeats)]
    median, prefill = statistics.median(runs), statistics.median(prefills)
    new = args.batch * args.new_tokens
    return tokens, {"first_call_s": first, "median_s": median, "runs_s": runs, "prefill_s": prefill,
                    "tokens_per_s": new / median,
                    "decode_tokens_per_s": args.batch * (args.new_tokens - 1) / max(median - prefill, 1e-9)}


def yardstick(model, ids, mask, args, hf_tokens):
    """How far Hugging Face's own eager attention strays from its default (SDPA) path on this
    model, dtype and plan: the agreement that rounding alone allows, against which FFA's is read
    (with random weights the top logits are nearly tied and low precision flips them)."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        tokens = generate(model, ids, mask, args.new_tokens)
    finally:
        model.set_attn_implementation(previous)
    return {"path": "hf eager attention vs hf " + previous, **token_agreement(tokens.cpu(), hf_tokens.cpu())}


def ffa_cache_shape(model):
    """(kv heads, query heads) that this rank's FFA cache holds in its first attention layer."""
    from ffa.transformers.binding import binding_of
    layer = binding_of(model).generate_cache.attention_layers()[0]
    return layer.keys.shape[1], layer.heads


def gathered(value):
    """value from every rank, in rank order."""
    if not dist.is_initialized():
        return [value]
    out = [None] * world()
    dist.all_gather_object(out, value)
    return out


def environment_of(device):
    """shared.environment with this run's launcher, device and process group."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    launcher = f"torchrun --nproc_per_node {world()}" if dist.is_initialized() else "python"
    return {**environment(" ".join([launcher] + sys.argv), name), "processes": world(),
            "backend": dist.get_backend() if dist.is_initialized() else None}


def run(args):
    """The whole measurement on this rank; rank 0 reports it."""
    import transformers

    import ffa.transformers as fft
    transformers.logging.set_verbosity_error()
    device = start(args)
    dtype = DTYPES[args.dtype]
    model, source = load_model(args, dtype, device)
    config = model.config
    record = {**environment_of(device), "model": source, "dtype": args.dtype, "batch": args.batch,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
              "compile": args.compile, "heads": config.num_attention_heads,
              "kv_heads": getattr(config, "num_key_value_heads", config.num_attention_heads), "timing": {}}
    say(f"{record['device']} x{world()} | torch {record['torch']} | transformers {record['transformers']} | {source}")
    ids, mask = prompts(model, args, device)
    hf_tokens, record["timing"]["hf"] = measure(model, ids, mask, args, device)
    record["yardstick"] = yardstick(model, ids, mask, args, hf_tokens)
    fft.enable(model, compile=args.compile)
    ffa_tokens, record["timing"]["ffa"] = measure(model, ids, mask, args, device)
    record["agreement"] = token_agreement(ffa_tokens.cpu(), hf_tokens.cpu())
    record["ffa_cache_per_rank"] = [{"kv_heads": kv, "heads": h} for kv, h in gathered(ffa_cache_shape(model))]
    if rank() == 0:
        report(record)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(record, indent=2))


def report(record):
    ffa_path = "ffa (compile)" if record["compile"] else "ffa"
    print(f"\n{record['model']}, {record['dtype']}, batch {record['batch']}, prompt {record['prompt_len']}, "
          f"{record['new_tokens']} new tokens, {record['processes']} x {record['device']}\n")
    print("| path | processes | generate (median) | tokens/s | decode tokens/s | first call |")
    print("|---|---|---|---|---|---|")
    for path, label in (("hf", "hf"), ("ffa", ffa_path)):
        t = record["timing"][path]
        print(f"| {label} | {record['processes']} | {t['median_s']:.3f} s | {t['tokens_per_s']:.1f} | "
              f"{t['decode_tokens_per_s']:.1f} | {t['first_call_s']:.2f} s |")
    a = record["agreement"]
    cache = record["ffa_cache_per_rank"][0]
    print(f"\ngreedy tokens, ffa vs hf: {100 * a['identical_share']:.1f}% identical, first difference at "
          f"{a['first_difference']} of {record['new_tokens']}; FFA cache per rank: {cache['kv_heads']} of "
          f"{record['kv_heads']} kv heads, {cache['heads']} of {record['heads']} query heads")
    y = record["yardstick"]
    print(f"yardstick, {y['path']}: {100 * y['identical_share']:.1f}% identical, first difference at "
          f"{y['first_difference']} of {record['new_tokens']}", flush=True)


def leave():
    """Leaves the process group once run's model and caches are gone and every rank has got here.
    Destroying it while they were alive, or while another rank was still reporting, aborted one
    rank at interpreter exit in about one run in nine on the CPU (gloo): "terminate called without
    an active exception"."""
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    run(parse_args())
    leave()
