"""Which of transformers' causal-LM architectures FFA runs, on the CPU.

For every model type transformers maps to a causal LM (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES): a tiny
random-weight model (2 layers, 4 query heads over 2 kv heads, head_dim 32 where the config takes
these), greedy tokens on a left-padded batch of 3 prompts, first with transformers' own
attention and cache, then after ffa.transformers.enable (the reference path, the specification
the CUDA kernels are tested against). In float64, or float32 where transformers' own run needs
it or its logits are not all finite in float64. The reference is the model's default attention
(SDPA for most), except for a model with a logit softcap: SDPA skips the cap, so its reference
is transformers' eager attention, which applies it.
Each architecture ends in one of OUTCOMES; the tests (tests/test_transformers.py) hold the
named architectures, this program the rest of the list as transformers grows.

    python bench/architectures.py --out bench/results/architectures-cpu [--only llama gemma2 ...]

Each chunk of architectures runs in a worker process of its own (a model that kills its process
is recorded as "crashed" and the sweep goes on); one model may take TIMEOUT_S.
"""

import argparse
import inspect
import json
import signal
import subprocess
import sys
from pathlib import Path

from shared import environment, say, write_json

OUTCOMES = {
    "same tokens": "FFA's greedy tokens equal transformers'",
    "refused at enable": "enable() raised FFA's ValueError naming the feature, before any work",
    "refused at prefill": "the first generate raised FFA's ValueError at the prefill, before any decode step",
    "different tokens": "FFA ran and its tokens differ from transformers' (a bug)",
    "error": "FFA-enabled generate raised something other than FFA's refusal (a bug)",
    "no tiny model": "the tiny config, the model or transformers' own generate failed (not FFA)",
    "timeout": "over the time one model may take (TIMEOUT_S)",
    "crashed": "the worker process died",
}
TIMEOUT_S = 90
CHUNK = 20
COMMON = dict(vocab_size=96, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, n_embd=128, n_layer=2, n_head=4, n_positions=128, num_layers=2, num_heads=4,
              d_model=128, ffn_dim=128, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
              moe_intermediate_size=64, shared_expert_intermediate_size=64, n_routed_experts=4, n_shared_experts=1,
              first_k_dense_replace=1)
PROMPT, NEW, PADS = 12, 8, (0, 3, 5)


class Timeout(BaseException):  # not caught where a model's own errors are
    pass


def tiny_model(arch):
    """The tiny random-weight model of `arch` (the keywords of COMMON its config takes). A hybrid
    model whose two layers would both be linear-attention or recurrent (an attention layer every
    4th or 8th) gets its first layer's type and a full-attention layer, where its config takes
    layer_types."""
    import torch
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from ffa.transformers.enable import LAYER_TYPES
    config_class = CONFIG_MAPPING[arch]
    takes = inspect.signature(config_class.__init__).parameters
    keywords = {k: v for k, v in COMMON.items() if k in takes}
    config = config_class(**keywords)
    types = list(getattr(config, "layer_types", None) or ())
    if types and not set(types) & set(LAYER_TYPES) and "layer_types" in takes:
        config = config_class(**keywords, layer_types=[types[0], "full_attention"])
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def prompts():
    import torch
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, COMMON["vocab_size"], (len(PADS), PROMPT), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(PADS):
        mask[row, :pad] = 0
    return ids.masked_fill(mask == 0, COMMON["pad_token_id"]), mask


def greedy(model, ids, mask):
    """The new tokens, and whether every step's logits were finite."""
    import torch
    out = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                         pad_token_id=COMMON["pad_token_id"], return_dict_in_generate=True, output_logits=True)
    return out.sequences[:, ids.shape[1]:], all(bool(torch.isfinite(x).all()) for x in out.logits)


def softcapped(model):
    """Whether the model's attention caps its logits (Gemma 2, VaultGemma)."""
    return getattr(model.config.get_text_config(), "attn_logit_softcapping", None) is not None


def refusal(error):
    return isinstance(error, ValueError) and str(error).startswith("FFA cannot run this model")


def first_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}"


def outcome_of(arch):
    """(outcome, dtype, detail) of one architecture."""
    import torch

    import ffa.transformers as fft
    try:
        model = tiny_model(arch)
    except Exception as e:
        return "no tiny model", None, first_line(e)
    try:
        fft.enable(model)
    except Exception as e:
        return ("refused at enable" if refusal(e) else "error"), None, first_line(e)
    try:
        fft.disable(model)
    except Exception as e:
        return "error", None, f"disable: {first_line(e)}"
    if softcapped(model):
        model.set_attn_implementation("eager")
    ids, mask = prompts()
    expected = problem = None
    for dtype in (torch.float64, torch.float32):
        try:
            model.to(dtype)
            tokens, finite = greedy(model, ids, mask)
        except Exception as e:
            problem = first_line(e)
            continue
        if finite:
            expected = tokens
            break
        problem = f"non-finite logits in {dtype}"
    if expected is None:
        return "no tiny model", None, f"transformers' own generate: {problem}"
    dtype = str(dtype).removeprefix("torch.")
    fft.enable(model)
    try:
        got, finite = greedy(model, ids, mask)
    except Exception as e:
        return ("refused at prefill" if refusal(e) else "error"), dtype, first_line(e)
    if not finite:
        return "different tokens", dtype, "non-finite logits"
    if torch.equal(got, expected):
        return "same tokens", dtype, ""
    differ = (got != expected).nonzero()
    return "different tokens", dtype, f"first at row {int(differ[0, 0])}, token {int(differ[0, 1])} of {NEW}"


def worker(archs):
    """One JSON line per architecture ({"start": arch} before it, so that the parent knows which one
    a dead worker was running)."""
    import transformers
    transformers.logging.set_verbosity_error()

    def expire(*_):
        raise Timeout()

    signal.signal(signal.SIGALRM, expire)
    for arch in archs:
        print(json.dumps({"start": arch}), flush=True)
        signal.alarm(TIMEOUT_S)
        try:
            outcome, dtype, detail = outcome_of(arch)
        except Timeout:
            outcome, dtype, detail = "timeout", None, f"over {TIMEOUT_S} s"
        finally:
            signal.alarm(0)
        print(json.dumps({"arch": arch, "outcome": outcome, "dtype": dtype, "detail": detail}), flush=True)


def sweep(archs):
    """Every architecture's record, the workers started chunk by chunk, again after a crash."""
    records, left = {}, list(archs)
    while left:
        chunk, running = left[:CHUNK], None
        proc = subprocess.Popen([sys.executable, __file__, "--worker", *chunk], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, cwd=Path(__file__).parent)
        for line in proc.stdout:
            item = json.loads(line)
            if "start" in item:
                running = item["start"]
                continue
            records[item["arch"]], running = item, None
            say(f"{item['arch']:28} {item['outcome']:18} {item['dtype'] or '':8} {item['detail'][:140]}")
        proc.wait()
        if running is not None:
            records[running] = {"arch": running, "outcome": "crashed", "dtype": None,
                                "detail": f"worker exit status {proc.returncode}"}
            say(f"{running:28} crashed")
        left = [a for a in left if a not in records]
    return [records[a] for a in archs]


def report(record):
    """The markdown page: counts per outcome, then every architecture."""
    rows = record["architectures"]
    lines = [f"# FFA on transformers' causal-LM architectures (CPU, tiny random-weight models)", "",
             f"{record['date']}, commit {record['commit']}, torch {record['torch']}, transformers "
             f"{record['transformers']}; `{record['command']}`", "",
             "| outcome | architectures | meaning |", "|---|---|---|"]
    for outcome, meaning in OUTCOMES.items():
        lines.append(f"| {outcome} | {sum(r['outcome'] == outcome for r in rows)} | {meaning} |")
    lines += ["", "| architecture | outcome | dtype | detail |", "|---|---|---|---|"]
    for r in rows:
        detail = r["detail"].replace("|", "/")
        lines.append(f"| {r['arch']} | {r['outcome']} | {r['dtype'] or ''} | {detail} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", help="these model types only")
    parser.add_argument("--out", type=Path, help="write <out>.json and <out>.md")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    archs = args.only or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    record = {**environment(" ".join(["python", "bench/architectures.py", *(argv or sys.argv[1:])]), "cpu"),
              "architectures": sweep(archs)}
    counts = {o: sum(r["outcome"] == o for r in record["architectures"]) for o in OUTCOMES}
    say(", ".join(f"{o}: {n}" for o, n in counts.items() if n))
    if args.out:
        write_json(args.out.with_suffix(".json"), record)
        args.out.with_suffix(".md").write_text(report(record))


if __name__ == "__main__":
    main()
