"""Kernel benchmark: FFA against the read ceiling and PyTorch's SDPA backends at their strongest,
in the protocol a decode loop sees.

    python bench/kernel_bench.py --out bench/results/kernel-bench-h200.json     # every section
    python bench/kernel_bench.py --sections grid --dtypes float16           # one part

Protocol (ffa.measure, the tuner's too): per shape, `copies` distinct caches (a model's layers),
together at least 3x the L2 size, one call per cache back to back in one CUDA graph; time per
call = replay time / copies, median over replays. Every method reads the same caches.

Sections:
  bandwidth  reading 4 GiB (two 2 GiB buffers in rotation) with the library's read kernels
             (16-byte loads; bulk copies on compute capability 9.0+), with torch.sum, and a device
             copy (read + write bytes counted). The floor's bandwidth is the faster read kernel's.
  grid       32 decode shapes (shared.GRID) per dtype:
               read_loads, read_bulk  one read of the same K+V bytes (csrc/read.cu): the ceiling
               ffa_tuned              FastForwardAttn as a user runs it (the tuner cache when one is
                                      found, `tuner_cache` in the JSON, else the heuristic)
               ffa_heuristic          the launch heuristic (FastForwardAttn.heuristic_config)
               ffa_default            use_default_kernel_launch=True (one block per batch x head)
               sdpa_<backend>         torch SDPA with one backend forced (cudnn, flash, efficient,
                                      math) and native GQA (enable_gqa=True: K/V never expanded);
                                      a backend that refuses a shape gets no number
               step_sdpa              what a static-cache user runs per step: the new k and v
                                      copied into the cache at t (two index_copy_), then the
                                      fastest SDPA backend of the shape; FFA's step is ffa_tuned
                                      (the append is fused into its kernel)
             Every method's output on the first cache is checked against a float32 reference of
             the step (ffa.tuner.search.upcast_reference); a method outside TOLERANCE gets no
             number either (the error is recorded).
  groups     the grid's methods on shared.GROUP_SHAPES: groups of 4, 16 and 32 query heads over the
             same bytes, and Gemma-3-4B's head_dim 256 (not in the default sections)
  original   the original FFA release's protocol (FasterTransformer-based): 128 decode steps after
             a prompt of x - 128 over one cache, the optimized launch's total attention time over
             the default launch's; the 128 steps replayed from one CUDA graph, and as eager calls
  prune      p = 1e-3 against p = 0 on a peaked distribution (an attention sink), by launch
  pdl        what programmatic dependent launch keeps where the kernel before each call is not
             FFA's (not in the default sections): on the grid's batch-1 shapes up to 32 MB (fp16),
             FFA's heuristic launch with and without pdl and cuDNN's SDPA, each in the plain
             rotation and with every call preceded by a copy into q (a stand-in for the projection
             that writes q in a model: one small kernel the attention depends on), and the copy alone
With --out it writes the JSON and, beside it, bench/report.py's Markdown and PNG. (No bench
program is named like an installed package: transformers imports a package called `kernels`.)
"""

import argparse
import datetime
import functools
import math
import sys
from dataclasses import replace

import torch
import torch.nn.functional as F

import ffa
import report
from ffa import FastForwardAttn, LaunchConfig, tuner
from ffa.tuner import cache
from ffa.measure import RotationTimer, copies_for, l2_bytes, read_bytes
from ffa.tuner.search import TOLERANCE, relative_error, upcast_reference
from shared import GRID, GROUP_SHAPES, HEADS, say, source_commit, write_json

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
SDPA_BACKENDS = ("cudnn", "flash", "efficient", "math")
METHODS = ("read_loads", "read_bulk", "ffa_tuned", "ffa_heuristic", "ffa_default",
           *(f"sdpa_{b}" for b in SDPA_BACKENDS), "step_sdpa")
TIMER = RotationTimer(target_s=10e-3, min_replays=10, max_replays=50)


class Case:
    """One decode shape in `copies` distinct caches: FastForwardAttn objects whose caches hold
    the same random rows at positions 0 .. context - 1 (the step's own row, at t = context - 1,
    written too, so that every method attends over the same keys), the step's inputs, and the
    float32 reference output."""

    def __init__(self, batch, kv_heads, context, head_dim, dtype, copies, heads=HEADS):
        self.batch, self.kv_heads, self.context, self.head_dim, self.dtype = batch, kv_heads, context, head_dim, dtype
        self.heads, self.t, self.scale = heads, context - 1, 1 / math.sqrt(head_dim)
        cuda = dict(device="cuda", dtype=dtype)
        K = torch.randn(batch, kv_heads, context - 1, head_dim, **cuda)
        V = torch.randn_like(K)
        self.attns = [FastForwardAttn(K, V, context) for _ in range(copies)]
        del K, V
        self.q = torch.randn(batch, heads, 1, head_dim, **cuda)
        self.k = torch.randn(batch, kv_heads, 1, head_dim, **cuda)
        self.v = torch.randn_like(self.k)
        self.position = torch.tensor([self.t], device="cuda")
        for kc, vc in self.caches():
            kc[:, :, self.t] = self.k[:, :, 0]
            vc[:, :, self.t] = self.v[:, :, 0]
        self.out = torch.empty(batch, heads, head_dim, **cuda)
        self.reference = upcast_reference(self.q, self.k, self.v, *self.attns[0].get_cache(), self.t, self.scale)

    @property
    def kv_bytes(self):
        return 2 * self.batch * self.kv_heads * self.context * self.head_dim * self.dtype.itemsize

    def caches(self):
        return [a.get_cache() for a in self.attns]

    def ffa_calls(self, launch=None, default=False, p=0.0):
        """One FastForwardAttn step per cache with launch `launch` (None: FastForwardAttn's own
        choice), or the default launch."""
        for a in self.attns:
            a.launch, a.use_default_kernel_launch = launch, default
        return [functools.partial(a.attention, self.q, self.k, self.v, self.scale, self.t, p, out=self.out)
                for a in self.attns]

    def sdpa_calls(self, backend, append=False):
        """torch SDPA over each cache with one backend forced and native GQA; `append`: first
        copy the new k and v into the cache at t, as a static-cache decode step does."""
        from torch.nn.attention import SDPBackend, sdpa_kernel
        kind = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
        gqa = self.kv_heads != self.heads

        def step(kc, vc):
            if append:
                kc.index_copy_(2, self.position, self.k)
                vc.index_copy_(2, self.position, self.v)
            with sdpa_kernel(kind):
                return F.scaled_dot_product_attention(self.q, kc, vc, scale=self.scale, enable_gqa=gqa)
        return [functools.partial(step, kc, vc) for kc, vc in self.caches()]

    def read_calls(self, bulk):
        return [functools.partial(read_bytes, kc, vc, bulk=bulk) for kc, vc in self.caches()]

    def error(self, call):
        """Relative error of one call's output against the reference (inf for a NaN)."""
        self.out.fill_(float("nan"))
        out = call()
        out = self.out if out is None else out.reshape(self.out.shape)
        err = relative_error(out, self.reference)
        return err if err == err else math.inf


def bandwidth():
    """GB/s of reading 4 GiB (two 2 GiB buffers in rotation), and of copying it."""
    bufs = [torch.empty(1 << 30, dtype=torch.float16, device="cuda").normal_() for _ in range(2)]
    dst = torch.empty_like(bufs[0])
    nbytes = 2 * bufs[0].numel()
    methods = {"read_loads": lambda b: read_bytes(b), "read_bulk": lambda b: read_bytes(b, bulk=True),
               "torch_sum": lambda b: b.sum(dtype=torch.float32), "copy": lambda b: dst.copy_(b)}
    result = {}
    for name, fn in methods.items():
        try:
            seconds = TIMER([functools.partial(fn, b) for b in bufs])
        except ffa._lib.UnsupportedError as e:
            result[name + "_error"] = str(e)
            continue
        result[name + "_GBps"] = (2 if name == "copy" else 1) * nbytes / seconds / 1e9
    result["ceiling_GBps"] = max(result.get("read_loads_GBps", 0), result.get("read_bulk_GBps", 0))
    return result


def measure_case(case, methods):
    """Every method on one Case: {method: µs per call}, {method: relative error of its output},
    {method: why it has no number}, {FFA method: its launch}, and the SDPA backend of step_sdpa."""
    times, errors, failures, launches, step_backend = {}, {}, {}, {}, None
    tolerance = TOLERANCE[case.dtype]
    for m in methods:
        try:
            if m == "step_sdpa":
                sdpa = {b: times[f"sdpa_{b}"] for b in SDPA_BACKENDS if f"sdpa_{b}" in times}
                if not sdpa:
                    failures[m] = "no SDPA backend ran this shape"
                    continue
                step_backend = min(sdpa, key=sdpa.get)
                calls = case.sdpa_calls(step_backend, append=True)
            else:
                calls = method_calls(case, m)
            if m.startswith("ffa_"):
                launches[m] = case.attns[0].launch_config(case.heads, case.context).as_dict()
            if not m.startswith("read_"):
                errors[m] = case.error(calls[0])
                if not errors[m] <= tolerance:
                    failures[m] = f"relative error {errors[m]:.3g} above {tolerance:g}"
                    continue
            times[m] = TIMER(calls) * 1e6
        except Exception as e:  # a backend that refuses the shape, a launch the GPU cannot run
            failures[m] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
    return times, errors, failures, launches, step_backend


def method_calls(case, m):
    if m.startswith("read_"):
        return case.read_calls(bulk=m == "read_bulk")
    if m == "ffa_tuned":
        return case.ffa_calls()
    if m == "ffa_heuristic":
        return case.ffa_calls(launch=case.attns[0].heuristic_config(case.heads, case.context))
    if m == "ffa_default":
        return case.ffa_calls(default=True)
    if m.startswith("sdpa_"):
        return case.sdpa_calls(m[5:])
    raise ValueError(f"unknown method {m}")


def grid(dtypes, methods, ceiling_GBps, shapes):
    """Every method on every (heads, batch, kv_heads, context, head_dim) of `shapes`, per dtype."""
    rows = []
    l2 = l2_bytes(torch.device("cuda"))
    for dname in dtypes:
        for heads, batch, kv_heads, context, head_dim in shapes:
            dtype = DTYPES[dname]
            nbytes = 2 * batch * kv_heads * context * head_dim * dtype.itemsize
            case = Case(batch, kv_heads, context, head_dim, dtype, copies_for(nbytes, l2), heads)
            times, errors, failures, launches, backend = measure_case(case, methods)
            row = {"dtype": dname, "batch": batch, "heads": heads, "kv_heads": kv_heads, "context": context,
                   "head_dim": head_dim, "kv_MB": nbytes / 1e6, "copies": len(case.attns),
                   "floor_us": nbytes / ceiling_GBps / 1e3, "us": times, "rel_error": errors, "failures": failures,
                   "step_sdpa_backend": backend, "launches": launches}
            rows.append(row)
            say(format_row(row))
            del case
            torch.cuda.empty_cache()
    return rows


def format_row(row):
    us, floor = row["us"], row["floor_us"]
    cells = [f"{row['dtype'][:4]} b{row['batch']:<3} kv{row['kv_heads']:<2} L{row['context']:<5} d{row['head_dim']:<3} "
             f"x{row['copies']:<3} floor {floor:7.1f}"]
    cells += [f"{m} {us[m]:7.1f}" for m in ("read_bulk", "ffa_tuned", "sdpa_cudnn", "step_sdpa") if m in us]
    if "ffa_tuned" in us and "sdpa_cudnn" in us:
        cells.append(f"cudnn/ffa {us['sdpa_cudnn'] / us['ffa_tuned']:.2f}")
    if row["failures"]:
        cells.append("no number: " + ", ".join(row["failures"]))
    return " | ".join(cells)


def original_protocol(xs, batches, dtype=torch.float16, heads=32, head_dim=64, steps=128):
    """The original release's comparison: `steps` decode steps after a prompt of x - steps
    tokens over one cache, total attention time of the optimized launch over the default one.
    Two clocks: `graph`, the steps captured back to back in one CUDA graph (RotationTimer over
    the steps: GPU time only), and `eager`, CUDA events around the eager calls (the host's
    launch overhead included; median of 5)."""
    rows = []
    timer = RotationTimer(target_s=20e-3, min_replays=5, max_replays=20)
    for batch in batches:
        for x in xs:
            prompt = x - steps
            K = torch.randn(batch, heads, prompt, head_dim, device="cuda", dtype=dtype)
            V = torch.randn_like(K)
            qs = torch.randn(steps, batch, heads, 1, head_dim, device="cuda", dtype=dtype)
            ks = torch.randn(steps, batch, heads, 1, head_dim, device="cuda", dtype=dtype)
            row = {"batch": batch, "x": x}
            for name, default in (("optimized", False), ("default", True)):
                f = FastForwardAttn(K, V, x, default)
                calls = [functools.partial(f.attention, qs[i], ks[i], ks[i], 0.125, prompt + i) for i in range(steps)]
                row[f"{name}_graph_us"] = timer(calls) * 1e6 * steps
                row[f"{name}_eager_us"] = eager_us(calls)
            for clock in ("graph", "eager"):
                row[f"ratio_{clock}"] = row[f"optimized_{clock}_us"] / row[f"default_{clock}_us"]
            rows.append(row)
            say(f"original b{batch:<3} x{x:<6} graph: optimized {row['optimized_graph_us']:9.0f} us default "
                f"{row['default_graph_us']:9.0f} us ratio {row['ratio_graph']:.3f} | eager ratio {row['ratio_eager']:.3f}")
            del K, V
    return rows


def eager_us(calls, repeats=5):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        for call in calls:
            call()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3)
    return sorted(samples)[len(samples) // 2]


# (batch, kv heads, context): launches timed at p = 0 and p = 1e-3. "ffa" is FastForwardAttn's own
# choice (for p > 0 on grouped heads: the heuristic's tensor-core launch), "default" the default launch,
# tuples a fixed LaunchConfig (threads, heads per block, split length[, tensor cores]).
PRUNE_CASES = (
    (32, 8, 8192, ("ffa", "default", (128, 4, 0), (128, 2, 0), (128, 1, 0), (128, 4, 2048), (128, 4, 0, True),
                   (256, 4, 0, True), (128, 4, 2048, True))),
    (1, 8, 32768, ("ffa", (128, 4, 1024), (128, 1, 1024), (128, 4, 1024, True), (256, 4, 2048, True))),
    (8, 32, 16384, ("ffa", "default")),
)


def prune(dtype=torch.float16, head_dim=128):
    """An attention sink: q of every head aligned with key 0 (weight about 0.6, every other
    weight about 1e-4), p = 1e-3 against p = 0, launch by launch."""
    rows = []
    l2 = l2_bytes(torch.device("cuda"))
    for batch, kv_heads, context, launches in PRUNE_CASES:
        nbytes = 2 * batch * kv_heads * context * head_dim * dtype.itemsize
        case = Case(batch, kv_heads, context, head_dim, dtype, copies_for(nbytes, l2))
        first_keys = case.attns[0].get_cache()[0][:, :, :1]
        case.q = (first_keys.repeat_interleave(HEADS // kv_heads, 1) * 0.9).contiguous()
        case.reference = upcast_reference(case.q, case.k, case.v, *case.attns[0].get_cache(), case.t, case.scale)
        for launch in launches:
            kwargs = {"default": True} if launch == "default" else {} if launch == "ffa" else \
                {"launch": LaunchConfig(*launch)}
            row = {"batch": batch, "kv_heads": kv_heads, "context": context, "copies": len(case.attns),
                   "launch": launch if isinstance(launch, str) else LaunchConfig(*launch).key()}
            for p in (0.0, 1e-3):
                calls = case.ffa_calls(p=p, **kwargs)
                if p == 0.0:
                    row["p0_rel_error"] = case.error(calls[0])
                row[f"p{p:g}_us"] = TIMER(calls) * 1e6
            row["launch_p1e-3"] = case.attns[0].launch_config(HEADS, context, prune=True).as_dict()
            row["speedup"] = row["p0_us"] / row["p0.001_us"]
            rows.append(row)
            say(f"prune b{batch} kv{kv_heads} L{context} {row['launch']}: p=0 {row['p0_us']:.1f} us, "
                f"p=1e-3 {row['p0.001_us']:.1f} us, {row['speedup']:.2f}x")
        del case
        torch.cuda.empty_cache()
    return rows


def pdl_effect(dtype=torch.float16):
    """The pdl section: µs per call of FFA's heuristic launch with and without pdl and of cuDNN's
    SDPA, alone and after a copy into q, on the batch-1 grid shapes up to 32 MB."""
    rows = []
    l2 = l2_bytes(torch.device("cuda"))
    for batch, kv_heads, context, head_dim in [s for s in GRID if s[0] == 1]:
        nbytes = 2 * batch * kv_heads * context * head_dim * dtype.itemsize
        if nbytes > 32 << 20:
            continue
        case = Case(batch, kv_heads, context, head_dim, dtype, copies_for(nbytes, l2))
        q_source = case.q.clone()

        def after_copy(call):
            return lambda: (case.q.copy_(q_source), call())[1]

        launch = case.attns[0].heuristic_config(case.heads, case.context)
        methods = {"ffa_pdl": lambda: case.ffa_calls(launch=replace(launch, pdl=True)),  # made when timed: the
                   "ffa_no_pdl": lambda: case.ffa_calls(launch=replace(launch, pdl=False)),  # launch is the caches'
                   "sdpa_cudnn": lambda: case.sdpa_calls("cudnn")}
        row = {"batch": batch, "kv_heads": kv_heads, "context": context, "head_dim": head_dim, "dtype": str(dtype),
               "copies": len(case.attns), "launch": launch.key(), "us": {}, "rel_error": {}}
        for name, make in methods.items():
            calls = make()
            row["rel_error"][name] = case.error(calls[0])
            if not row["rel_error"][name] <= TOLERANCE[dtype]:
                raise AssertionError(f"{name} at b{batch} kv{kv_heads} L{context}: error {row['rel_error'][name]}")
            row["us"][name] = TIMER(calls) * 1e6
            row["us"][name + "_after_copy"] = TIMER([after_copy(c) for c in calls]) * 1e6
        row["us"]["copy"] = TIMER([lambda: case.q.copy_(q_source) for _ in case.attns]) * 1e6
        rows.append(row)
        us = row["us"]
        say(f"pdl b{batch} kv{kv_heads} L{context} d{head_dim} {row['launch']}: " + ", ".join(
            f"{k} {v:.2f}" for k, v in us.items()))
        del case
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="bandwidth,grid,original,prune")
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--shapes", type=int, default=None, help="only the first N shapes of the grid (a quick look)")
    ap.add_argument("--original-x", default="256,512,1024,2048,4096,8192,16384,32768")
    ap.add_argument("--original-batches", default="1,4,16")
    ap.add_argument("--out", default=None, help="JSON file for all results (Markdown and PNG beside it)")
    args = ap.parse_args(argv)
    sections = args.sections.split(",")
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    table = tuner.load_table(device)
    tuned = None if table is None else f"{cache.cache_file(cache.describe_device(device))} ({len(table.entries)} buckets)"
    result = {"device": props.name, "sm_count": props.multi_processor_count, "l2_MB": l2_bytes(device) / 1e6,
              "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(), "ffa": ffa.__version__,
              "date": datetime.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
              "commit": source_commit(), "tuner_cache": tuned}
    say(f"{props.name}, torch {torch.__version__}, cuDNN {result['cudnn']}, tuner cache: {result['tuner_cache']}")
    if {"bandwidth", "grid", "groups"} & set(sections):
        result["bandwidth"] = bw = bandwidth()
        say("bandwidth (GB/s): " + ", ".join(f"{k[:-5]} {v:.0f}" for k, v in bw.items() if k.endswith("_GBps")))
    if "grid" in sections:
        result["grid"] = grid(args.dtypes.split(","), args.methods.split(","), bw["ceiling_GBps"],
                              [(HEADS, *s) for s in GRID[:args.shapes]])
    if "groups" in sections:
        result["groups"] = grid(args.dtypes.split(","), args.methods.split(","), bw["ceiling_GBps"], GROUP_SHAPES)
    if "original" in sections:
        result["original"] = original_protocol([int(x) for x in args.original_x.split(",")],
                                               [int(b) for b in args.original_batches.split(",")])
    if "prune" in sections:
        result["prune"] = prune()
    if "pdl" in sections:
        result["pdl"] = pdl_effect()
    if args.out:
        write_json(args.out, result)
        report.main(args.out)
    return result


if __name__ == "__main__":
    main()
