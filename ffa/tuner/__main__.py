"""`python -m ffa.tuner`: measure the fastest launch per workload bucket on this GPU and keep
the winners where FastForwardAttn finds them.

    python -m ffa.tuner                 # default sweep (fp16+bf16, d 64/128, groups 1-8)
    python -m ffa.tuner --quick         # a small sweep, seconds
    python -m ffa.tuner --heads 32 --kv-heads 8 --head-dim 128 --dtype bf16   # one model
    python -m ffa.tuner --show          # the cache, tuned vs heuristic
    python -m ffa.tuner --clear         # delete this GPU's cache file
"""

import argparse
import collections
import dataclasses
import math
import sys
import time

import torch

from .. import _lib
from ..launch import LaunchConfig, head_dims, length_bucket
from ..measure import RotationTimer, copies_for, l2_bytes
from . import cache
from .search import DEFAULT_GRID, QUICK_GRID, sweep

DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
SHORT = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m ffa.tuner", description="Tune FFA's decode launch configurations for this GPU.",
        epilog=f"The cache lives in ${cache.ENV_DIR} if set, else in {cache.cache_dir()}.")
    action = p.add_mutually_exclusive_group()
    action.add_argument("--show", action="store_true", help="print this GPU's tuned table and exit")
    action.add_argument("--clear", action="store_true", help="delete this GPU's cache file and exit")
    p.add_argument("--quick", action="store_true", help="a small grid and a shorter search")
    p.add_argument("--heads", type=_positive, help="query heads of your model (with --kv-heads)")
    p.add_argument("--kv-heads", type=_positive, help="key/value heads of your model (with --heads)")
    p.add_argument("--head-dim", type=int, nargs="+", choices=head_dims(), metavar="D",
                   help=f"head dims to tune (from {', '.join(map(str, head_dims()))})")
    p.add_argument("--dtype", nargs="+", choices=sorted(DTYPES), metavar="DTYPE", help="dtypes to tune: fp16, bf16, fp32")
    p.add_argument("--batch", type=_positive, nargs="+", help="batch sizes to tune")
    p.add_argument("--context", type=_positive, nargs="+",
                   help="context lengths to tune (rounded up to power-of-two buckets)")
    p.add_argument("--device", default="cuda", help="CUDA device to tune (default: the current one)")
    args = p.parse_args(argv)
    if (args.heads is None) != (args.kv_heads is None):
        p.error("--heads and --kv-heads go together")
    if args.heads is not None and args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads}")
    return args


def grid_for(args):
    """The default or quick grid, restricted by the model flags."""
    grid = QUICK_GRID if args.quick else DEFAULT_GRID
    changes = {}
    if args.heads is not None:
        changes.update(groups=(args.heads // args.kv_heads,), kv_heads=args.kv_heads)
    if args.head_dim:
        changes["head_dims"] = tuple(dict.fromkeys(args.head_dim))
    if args.dtype:
        changes["dtypes"] = tuple(dict.fromkeys(DTYPES[d] for d in args.dtype))
    if args.batch:
        changes["batches"] = tuple(dict.fromkeys(args.batch))
    if args.context:
        changes["lengths"] = tuple(dict.fromkeys(length_bucket(n) for n in args.context))
    return dataclasses.replace(grid, **changes)


def speedup_summary(entries):
    """One line: how much faster tuned launches are than the heuristic's, over `entries`."""
    ratios = [e.heuristic_us / e.time_us for e in entries if e.heuristic_us is not None]
    if not ratios:
        return "no bucket has a heuristic time to compare with"
    geomean = math.exp(sum(map(math.log, ratios)) / len(ratios))
    return (f"tuned vs heuristic over {len(ratios)} buckets: geometric mean {geomean:.3f}x, "
            f"max {max(ratios):.2f}x (heuristic time / tuned time)")


def format_entries(entries):
    """A table of tuned vs heuristic launches, then the geometric-mean speedup."""
    lines = [f"{'dtype':<5} {'d':>4} {'group':>5} {'b*kv':>5} {'length':>6}  {'tuned (LaunchConfig.key)':<16} {'us':>8}"
             f"  {'heuristic':<16} {'us':>8}  speedup"]
    for e in entries:
        if e.heuristic_us is None:
            heur, speed = "rejected", "-"
        else:
            heur, speed = f"{e.heuristic_us:8.2f}", f"{e.heuristic_us / e.time_us:.2f}x"
        lines.append(f"{SHORT[e.dtype]:<5} {e.head_dim:>4} {e.group:>5} {e.batch_kv_heads:>5} {e.length:>6}  "
                     f"{LaunchConfig.key(e.config):<16} {e.time_us:8.2f}  {LaunchConfig.key(e.heuristic):<16} "
                     f"{heur:>8}  {speed}")
    lines.append(speedup_summary(entries))
    return "\n".join(lines)


def show(info):
    """Print this device's table (info given) or, without a GPU, every cache file found."""
    paths = [cache.cache_file(info)] if info else sorted(cache.cache_dir().glob("*.json"))
    if not paths:
        print(f"no tuner cache files in {cache.cache_dir()}")
    status = 0
    for path in paths:
        print(path)
        try:
            key, entries = cache.read_file(path, cache.device_key(info) if info else None)
        except cache.CacheProblem as e:
            print(f"  not usable: {e}")
            status = 1
            continue
        if not entries:
            print("  no tuned entries; run `python -m ffa.tuner`")
            continue
        print(f"  {key['gpu']} (sm {key['capability']}, {key['sm_count']} SMs), FFA {key['ffa_version']}, "
              f"ABI {key['abi_version']}, kernels {key['kernel_version']}")
        print(format_entries(entries))
    return status


def _this_device(name):
    if not torch.cuda.is_available():
        return None
    return cache.describe_device(torch.device(name))


def run_sweep(args):
    if not torch.cuda.is_available():
        print("ffa.tuner: no CUDA GPU is visible; the sweep needs one", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type != "cuda":
        print(f"ffa.tuner: --device {args.device} is not a CUDA device", file=sys.stderr)
        return 2
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        _lib.check_device(device.index)
    except (_lib.FFAError, ValueError) as e:
        print(f"ffa.tuner: FFA cannot run on {device}: {e}", file=sys.stderr)
        return 2
    info = cache.describe_device(device)
    grid = grid_for(args)
    workloads = grid.workloads()
    print(f"ffa.tuner: {info.name} (sm {info.capability[0]}.{info.capability[1]}, {info.sm_count} SMs), "
          f"{len(workloads)} shapes -> {cache.cache_file(info)}", flush=True)
    saved = []

    def keep(result):
        if result.config is not None and cache.save(info, [result.entry()]):
            saved.append(result)

    began = time.perf_counter()
    l2 = l2_bytes(device)
    with torch.cuda.device(device):
        results = sweep(workloads, device, info.sm_count, RotationTimer(), refine=grid.refine, on_result=keep,
                        capability=info.capability, copies=lambda w: copies_for(w.kv_bytes, l2))
    wall = time.perf_counter() - began

    entries = [r.entry() for r in results if r.config is not None]
    worst = sorted(entries, key=lambda e: -(e.heuristic_us or math.inf) / e.time_us)[:10]
    print("\nthe 10 buckets where the heuristic is furthest from tuned:")
    print(format_entries(worst))
    print("all buckets: " + speedup_summary(entries))
    rejected = [(r.workload, c, why) for r in results for c, why in r.rejected.items()]
    for w, c, why in rejected[:20]:
        print(f"REJECTED {w} {LaunchConfig.key(c)}: {why}")
    unsupported = sum(len(r.unsupported) for r in results)
    kernels = collections.Counter(r.config.kernel for r in results if r.config is not None)
    print(f"{len(workloads)} shapes, {sum(len(r.timings) for r in results)} candidates timed, "
          f"{len(rejected)} rejected, {unsupported} not runnable on this GPU, {wall:.0f} s; "
          f"{len(saved)} buckets saved to {cache.cache_file(info)} (kernels: "
          + ", ".join(f"{name} {n}" for name, n in sorted(kernels.items())) + ")")
    return 1 if rejected or len(saved) < len(workloads) else 0


def main(argv=None, device_info=None):
    """The command; `device_info` (a cache.DeviceInfo) stands in for the GPU in --show/--clear."""
    args = parse_args(argv)
    if args.show or args.clear:
        info = device_info or _this_device(args.device)
        if args.show:
            return show(info)
        if info is None:
            print(f"ffa.tuner: no CUDA GPU is visible, so no device file to clear in {cache.cache_dir()}",
                  file=sys.stderr)
            return 2
        try:
            removed = cache.clear(info)
        except OSError as e:
            print(f"ffa.tuner: could not delete {cache.cache_file(info)}: {e}", file=sys.stderr)
            return 1
        print(f"{'deleted' if removed else 'no cache file at'} {cache.cache_file(info)}")
        return 0
    return run_sweep(args)


if __name__ == "__main__":
    sys.exit(main())
