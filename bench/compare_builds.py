"""Builds of libffa.so compared on the same shapes, in one process: for kernel changes.

    python bench/compare_builds.py BASE/libffa.so NEW/libffa.so [MORE ...] [--dtype float16] [--out f.json]

For every shape of the kernel grid (bench/kernel_bench.py) and each build, the tuner's search
(ffa.tuner.search.tune: every candidate, tensor-core ones included, checked against the reference,
then timed in ffa.measure's layer rotation) gives the best launch and the heuristic's time. The JSON
keeps every candidate's time (LaunchConfig.key -> µs) for re-deriving the heuristic:
`python bench/launch_candidates.py --evaluate f.json` scores the checkout's heuristic on the first
build's. Builds alternate shape by shape on the same inputs, so clocks and card drift hit both alike.
Both builds must have the Python package's ABI and version (the loader checks).
"""

import argparse
import datetime
import json
import math
import sys

import torch

from ffa import LaunchConfig, _lib
from ffa.measure import RotationTimer, copies_for, l2_bytes
from ffa.tuner.search import Problem, Workload, tune
from shared import HEADS, PAIRS, source_commit

READ_GBPS = 4600.0  # the floor's bandwidth; the measured figure is bench/kernel_bench.py's job


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("builds", nargs="+", help="libffa.so files: the baseline first, then candidates")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    ap.add_argument("--kv-heads", default="32,8")
    ap.add_argument("--head-dims", default="64,128")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    for path in args.builds:
        _lib.use_library(path)  # each build is checked before any shape is measured
    device = torch.device("cuda")
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    timer, l2 = RotationTimer(), l2_bytes(device)
    names = [chr(ord("A") + i) for i in range(len(args.builds))]
    rows = []
    print("| shape | floor µs | "
          + " | ".join(f"{n} best µs (LaunchConfig.key) | {n} heuristic" for n in names)
          + " | " + " | ".join(f"{n}/A best" for n in names[1:]) + " |")
    print("|---" * (2 + 2 * len(names) + len(names) - 1) + "|")
    for head_dim in map(int, args.head_dims.split(",")):
        for kv_heads in map(int, args.kv_heads.split(",")):
            for batch, length in PAIRS:
                w = Workload(dtype, head_dim, HEADS // kv_heads, batch, kv_heads, length)
                problem = Problem(w, device, copies=copies_for(w.kv_bytes, l2))
                floor_us = w.kv_bytes / (READ_GBPS * 1e3)
                found = []
                for path in args.builds:
                    _lib.use_library(path)
                    r = tune(problem, sm_count, timer, capability=torch.cuda.get_device_capability(device))
                    heur = r.timings.get(r.heuristic)
                    found.append({"best_us": r.seconds * 1e6, "config": r.config.as_dict(),
                                  "heuristic_us": None if heur is None else heur * 1e6,
                                  "heuristic": None if r.heuristic is None else r.heuristic.as_dict(),
                                  "timings_us": {c.key(): t * 1e6 for c, t in r.timings.items()},
                                  "rejected": {str(c): why for c, why in r.rejected.items()}})
                cells = []
                for f in found:
                    c = f["config"]
                    heur = "-" if f["heuristic_us"] is None else f"{f['heuristic_us']:.1f}"
                    cells += [f"{f['best_us']:.1f} ({LaunchConfig(**c).key()})", heur]
                cells += [f"{f['best_us'] / found[0]['best_us']:.2f}" for f in found[1:]]
                print(f"| {w} | {floor_us:.1f} | " + " | ".join(cells) + " |", flush=True)
                rows.append({"shape": str(w), "head_dim": head_dim, "kv_heads": kv_heads, "batch": batch,
                             "length": length, "group": w.group, "floor_us": floor_us, "builds": found})
                del problem
                torch.cuda.empty_cache()
    for i, name in enumerate(names):
        g = math.exp(sum(math.log(r["builds"][i]["best_us"] / r["floor_us"]) for r in rows) / len(rows))
        print(f"build {name} ({args.builds[i]}): geomean best / floor {g:.3f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"builds": args.builds, "device": torch.cuda.get_device_name(), "sm_count": sm_count,
                       "capability": list(torch.cuda.get_device_capability(device)), "dtype": args.dtype,
                       "commit": source_commit(), "date": datetime.date.today().isoformat(),
                       "command": " ".join(sys.argv), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
