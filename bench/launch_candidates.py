"""The launch heuristic against every candidate the tuner's search times: for heuristic changes.

    python bench/launch_candidates.py --out cands.json        # GPU: search every shape, save all timings
    python bench/launch_candidates.py --evaluate cands.json   # anywhere: score ffa.launch.heuristic on them
                                                              # (or on a bench/compare_builds.py JSON)
    python bench/launch_candidates.py --evaluate cands.json --tuner-cache cache.json   # and the tuned launch

The GPU run times, for each shape (the kernel grid of bench/kernel_bench.py in float16, plus
the decode shapes of summarize.py, bench/hf_generate.py and bench/tp_generate.py), every
candidate of ffa.tuner.search.tune with refine=3 (every split length at 128 threads and the
largest heads per block, then every threads x heads per block at the 3 best split lengths, each
on CUDA cores and on tensor cores), each checked against the reference first. --evaluate scores
the heuristic of the checkout it runs in: its time over the best time, per shape and as a
geometric mean. A choice that was not timed is scored by the timed candidate of the same
kernel, threads and heads per block with the nearest split length (marked ~), so the score of
a new heuristic on old data is an estimate.
"""

import argparse
import json
import math
import sys

import torch

from ffa.launch import LaunchConfig, heuristic, tensor_cores_apply, tma_applies
from ffa.tuner.cache import Table, read_file
from shared import HEADS, PAIRS, source_commit

# (head_dim, kv_heads, batch, length): the grid, then OPT-1.3b decode at prompt 1,000 + 128 new
# (batch 1, 2, 5, 10), Llama-3-8B under TP 1 and 2, a few shapes between the grid's, and short
# caches (the original FFA release's protocol starts at 256 positions).
SHAPES = ([(d, kv, b, n) for d in (64, 128) for kv in (32, 8) for b, n in PAIRS]
          + [(64, 32, b, 1152) for b in (1, 2, 5, 10)] + [(128, kv, 8, 1152) for kv in (8, 4)]
          + [(128, 8, 1, 4096), (128, 8, 4, 4096), (128, 8, 2, 16384), (64, 32, 2, 4096), (64, 32, 4, 4096),
             (128, 32, 4, 2048), (128, 8, 16, 16384)]
          + [(64, 32, b, n) for b in (1, 4, 16) for n in (256, 512)] + [(128, 8, 1, 256), (128, 8, 4, 512)]
          + [(d, 4, b, n) for d in (64, 128) for b, n in ((1, 16384), (8, 4096), (32, 4096), (128, 2048))])


def measure(out):
    from ffa.measure import RotationTimer, copies_for, l2_bytes
    from ffa.tuner.search import Problem, Workload, tune
    device = torch.device("cuda")
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    capability = torch.cuda.get_device_capability(device)
    timer, l2 = RotationTimer(), l2_bytes(device)
    rows = []
    for head_dim, kv_heads, batch, length in SHAPES:
        w = Workload(torch.float16, head_dim, HEADS // kv_heads, batch, kv_heads, length)
        problem = Problem(w, device, copies=copies_for(w.kv_bytes, l2))
        r = tune(problem, sm_count, timer, refine=3, capability=capability)
        rows.append(dict(head_dim=head_dim, kv_heads=kv_heads, batch=batch, length=length, group=w.group,
                         timings_us={LaunchConfig.key(c): round(s * 1e6, 2) for c, s in r.timings.items()}))
        print(w, "best", LaunchConfig.key(r.config), f"{r.seconds * 1e6:.1f} us", flush=True)
        del problem
        torch.cuda.empty_cache()
    doc = dict(device=torch.cuda.get_device_name(device), sm_count=sm_count, capability=list(capability),
               commit=source_commit(),
               torch=torch.__version__, command=" ".join(sys.argv), rows=rows)
    with open(out, "w") as fh:
        json.dump(doc, fh, indent=1)


def timed_as(timings, config):
    """The time of `config`, or of the nearest timed split length at its threads and heads."""
    if LaunchConfig.key(config) in timings:
        return timings[LaunchConfig.key(config)], LaunchConfig.key(config)
    shape = lambda c: (c.threads, c.heads_per_block, c.kernel, c.stages, c.tile_rows, c.pdl, c.split_len == 0)
    same = [c for c in map(LaunchConfig.parse, timings) if shape(c) == shape(config)]
    if not same:
        return None, LaunchConfig.key(config) + " (not timed)"
    near = min(same, key=lambda c: abs(math.log(max(c.split_len, 1) / max(config.split_len, 1))))
    return timings[LaunchConfig.key(near)], LaunchConfig.key(near) + "~"


def evaluate(path, tuner_cache=None):
    """Score the heuristic on a recorded run; with `tuner_cache` (a cache file) also the launch that
    FastForwardAttn takes with that cache (its lookup, else the heuristic)."""
    doc = json.load(open(path))
    table = Table(read_file(tuner_cache)[1]) if tuner_cache else None
    logs, tuned_logs = [], []
    print(f"ffa.launch.heuristic against {path} ({doc['device']}, commit {doc['commit']})"
          + (f", and the launch with tuner cache {tuner_cache}" if table else ""))
    print(f"{'shape':<28} {'heuristic':<28} ratio  " + (f"{'with the cache':<28} ratio  " if table else "") + "best")
    dtype = getattr(torch, doc.get("dtype", "float16"))
    for r in doc["rows"]:
        t = r["timings_us"] if "timings_us" in r else r["builds"][0]["timings_us"]  # compare_builds.py: build A
        best = min(t, key=t.get)
        capability = doc.get("capability", (0, 0))
        config = heuristic(r["batch"], r["kv_heads"], r["group"], r["length"], doc["sm_count"], r["head_dim"],
                           tensor_cores_apply(dtype, r["head_dim"], capability),
                           tma=tma_applies(dtype, r["head_dim"], capability))
        cells = [config]
        if table:  # as FastForwardAttn.launch_config with a cache of max_len = the shape's length
            tuned = table.launch(dtype, r["head_dim"], r["group"], r["batch"] * r["kv_heads"], r["length"], r["length"])
            cells.append(config if tuned is None else tuned)
        shape = f"d{r['head_dim']} g{r['group']} b{r['batch']}x{r['kv_heads']} L{r['length']}"
        line = f"{shape:<28} "
        for c, sink in zip(cells, (logs, tuned_logs)):
            us, label = timed_as(t, c)
            if us:
                sink.append(math.log(us / t[best]))
            line += f"{label:<28} " + (f"{us / t[best]:.3f}  " if us else "   -   ")
        print(line + best)
    for name, sink in (("heuristic", logs), ("with the cache", tuned_logs)):
        if sink:
            print(f"{name} / best, geometric mean over {len(sink)} shapes: {math.exp(sum(sink) / len(sink)):.3f}, "
                  f"max {math.exp(max(sink)):.3f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="GPU run: where to write every candidate's time")
    ap.add_argument("--evaluate", help="a JSON written by --out: score ffa.launch.heuristic on it")
    ap.add_argument("--tuner-cache", help="with --evaluate: also score the launch FastForwardAttn takes with this cache")
    args = ap.parse_args()
    if args.evaluate:
        evaluate(args.evaluate, args.tuner_cache)
    elif args.out:
        measure(args.out)
    else:
        ap.error("give --out or --evaluate")
