"""Kernel benchmark: FFA against the bandwidth floor and PyTorch's attention backends.

    python bench/kernels.py --out bench/results/kernels.json      # the full program
    python bench/kernels.py --sections grid --dtypes float16      # one part

With --out it writes the JSON and, beside it, the report of bench/report.py (kernels.md: tables
and the issue's targets checked; kernels.png: the grid as multiples of the floor and the seed's
protocol).

Sections (each a function below):
  bandwidth  read-only and copy bandwidth of this GPU (the floor's denominator)
  grid       32 decode shapes: a plain read of the same K+V bytes (torch.sum, the practical
             ceiling), FFA tuned / heuristic / default launch, every SDPA backend, compiled
             FlexAttention; microseconds and fraction of the floor
  seed       the seed's protocol: prompt x-128, 128 generated steps, total attention time of
             the optimized over the default launch, batch 1, 4 and 16 (the steps replayed from a
             CUDA graph, and as eager calls)
  prune      p = 1e-3 against p = 0 on a peaked attention distribution
Timing: triton.testing.do_bench, median, L2 flushed before every repeat, of the call captured
in a CUDA graph (kernel time; the eager call's time is kept as <method>_eager). The floor is the
bytes of K and V read once, over the measured copy bandwidth (read + write bytes counted).
"""

import argparse
import datetime
import json
import math
import os
import sys

import torch

from ffa import FastForwardAttn
from ffa.launch import heuristic, length_bucket, tensor_cores_apply
import report
from shared import source_commit

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
# (batch, context) pairs, crossed with kv heads {32, 8} and head_dim {64, 128}; 32 query heads.
PAIRS = [(1, 1024), (1, 16384), (1, 65536), (8, 4096), (16, 1024), (32, 4096), (64, 8192), (128, 2048)]
HEADS = 32


def bench(fn):
    from triton.testing import do_bench
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3  # microseconds


def graphed(fn):
    """fn captured in a CUDA graph: replay times the kernels without Python launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def bandwidth():
    """Copy (read + write bytes) and read-only (a sum) bandwidth over 4 GiB, in GB/s."""
    n = 1 << 31
    a = torch.empty(n, dtype=torch.float16, device="cuda").normal_()
    b = torch.empty_like(a)
    copy_us = bench(lambda: b.copy_(a))
    read_us = bench(lambda: a.sum(dtype=torch.float32))
    del a, b
    return {"copy_GBps": 2 * 2 * n / copy_us / 1e3, "read_GBps": 2 * n / read_us / 1e3}


class Problem:
    """One decode shape: a cache filled up to `context - 1`, the step writes position context-1."""

    def __init__(self, batch, kv_heads, context, head_dim, dtype):
        self.batch, self.kv_heads, self.context, self.head_dim, self.dtype = batch, kv_heads, context, head_dim, dtype
        self.KV = torch.randn(2, batch, kv_heads, context, head_dim, device="cuda", dtype=dtype)
        self.K, self.V = self.KV.unbind(0)  # one allocation, so that `read` is one kernel
        self.q = torch.randn(batch, HEADS, 1, head_dim, device="cuda", dtype=dtype)
        self.k = torch.randn(batch, kv_heads, 1, head_dim, device="cuda", dtype=dtype)
        self.v = torch.randn_like(self.k)
        self.scale = 1 / math.sqrt(head_dim)

    @property
    def kv_bytes(self):
        return 2 * self.K.numel() * self.K.element_size()

    def ffa(self, **kwargs):
        f = FastForwardAttn(self.K[:, :, : self.context - 1], self.V[:, :, : self.context - 1], self.context, **kwargs)
        out = torch.empty(self.batch, HEADS, self.head_dim, device="cuda", dtype=self.dtype)
        t = self.context - 1
        return lambda: f.attention(self.q, self.k, self.v, self.scale, t, out=out)

    def read(self):
        """The bytes of K and V summed by one PyTorch reduction: what reading them costs under the
        same protocol (launch, cold L2, the flush's dirty lines), a ceiling no decode kernel beats
        by much."""
        return lambda: self.KV.sum(dtype=torch.float32)

    def sdpa(self, backend):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        q, K, V = self.q, self.K, self.V
        if backend in ("flash", "cudnn"):  # no GQA support: the repeat is not timed
            K, V = (x.repeat_interleave(HEADS // self.kv_heads, 1) for x in (K, V))
        b = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
        gqa = K.shape[1] != HEADS

        def run():
            with sdpa_kernel(b):
                return torch.nn.functional.scaled_dot_product_attention(q, K, V, scale=self.scale, enable_gqa=gqa)
        return run

    def flex(self):
        from torch.nn.attention.flex_attention import flex_attention
        torch._dynamo.config.cache_size_limit = 1024  # one compilation per shape
        compiled = torch.compile(flex_attention, dynamic=False)
        return lambda: compiled(self.q, self.K, self.V, scale=self.scale, enable_gqa=self.kv_heads != HEADS)


def grid(dtypes, methods, sm_count, floor_GBps):
    rows = []
    for dname in dtypes:
        for kv_heads in (32, 8):
            for head_dim in (64, 128):
                for batch, context in PAIRS:
                    P = Problem(batch, kv_heads, context, head_dim, DTYPES[dname])
                    row = {"dtype": dname, "batch": batch, "heads": HEADS, "kv_heads": kv_heads,
                           "context": context, "head_dim": head_dim, "kv_MB": P.kv_bytes / 1e6,
                           "floor_us": P.kv_bytes / floor_GBps / 1e3}
                    for m in methods:
                        if m == "flex" and dname != "float16":
                            continue  # one compilation per shape: measured in float16 only, for time
                        try:
                            fn = make_method(P, m, sm_count)
                            fn()
                            row[m + "_eager"] = bench(fn)
                            row[m] = bench(graphed(fn))
                        except Exception as e:  # a backend that refuses the shape
                            row[m] = None
                            row.setdefault("errors", {})[m] = str(e).splitlines()[0][:120]
                    rows.append(row)
                    print(format_row(row, methods), flush=True)
                    del P
                    torch.cuda.empty_cache()
    return rows


def make_method(P, m, sm_count):
    if m == "ffa_tuned":
        return P.ffa()
    if m == "ffa_heuristic":  # the length FastForwardAttn asks for: its bucket, capped at the cache
        cfg = heuristic(P.batch, P.kv_heads, HEADS // P.kv_heads, min(length_bucket(P.context), P.context), sm_count,
                        P.head_dim, tensor_cores_apply(P.dtype, P.head_dim, torch.cuda.get_device_capability()))
        return P.ffa(launch=cfg)
    if m == "read":
        return P.read()
    if m == "ffa_default":
        return P.ffa(use_default_kernel_launch=True)
    if m.startswith("sdpa_"):
        return P.sdpa(m[5:])
    if m == "flex":
        return P.flex()
    raise ValueError(m)


def format_row(row, methods):
    cells = [f"{row['dtype'][:4]} b{row['batch']:<3} kv{row['kv_heads']:<2} L{row['context']:<5} d{row['head_dim']:<3}"
             f" floor {row['floor_us']:8.1f}"]
    floor = row["floor_us"]
    for m in methods:
        v = row.get(m)
        cells.append(f"{m} " + ("-" if v is None else f"{v:8.1f} ({v / floor:.2f}x)"))
    return " | ".join(cells)


def seed_protocol(xs, batches, dtype=torch.float16, heads=32, head_dim=64, steps=128):
    """The seed's comparison: `steps` decode steps after a prompt of x - steps tokens, total
    attention time of the optimized launch over the default one. Two clocks: `graph`, the 128
    steps captured in one CUDA graph and replayed (GPU time only: what the kernels cost), and
    `eager`, CUDA events around the 128 eager calls (includes the host's launch overhead, which
    hides the kernels where the cache is small). Median of 5 each."""
    rows = []
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

                def run(f=f):
                    for i in range(steps):
                        f.attention(qs[i], ks[i], ks[i], 0.125, prompt + i)
                run()  # warm-up (configs, workspaces)
                replay = graphed(run)
                for clock, fn in (("graph", replay), ("eager", run)):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    samples = []
                    for _ in range(5):
                        start.record()
                        fn()
                        end.record()
                        end.synchronize()
                        samples.append(start.elapsed_time(end) * 1e3)
                    row[f"{name}_{clock}_us"] = sorted(samples)[len(samples) // 2]
            for clock in ("graph", "eager"):
                row[f"ratio_{clock}"] = row[f"optimized_{clock}_us"] / row[f"default_{clock}_us"]
            rows.append(row)
            print(f"seed b{batch:<3} x{x:<6} graph: optimized {row['optimized_graph_us']:9.0f} us default "
                  f"{row['default_graph_us']:9.0f} us ratio {row['ratio_graph']:.3f} | eager ratio {row['ratio_eager']:.3f}",
                  flush=True)
            del K, V
    return rows


def prune(dtype=torch.float16):
    """A peaked distribution (an attention sink at position 0), p = 1e-3 against p = 0."""
    rows = []
    for batch, kv_heads, context, launch in ((32, 8, 8192, "heuristic"), (8, 32, 16384, "heuristic"),
                                             (32, 8, 8192, "default"), (1, 8, 32768, "heuristic")):
        P = Problem(batch, kv_heads, context, 128, dtype)
        g = HEADS // kv_heads
        P.q = (P.K[:, :, :1].repeat_interleave(g, 1) * 0.9).contiguous()  # q aligned with key 0: weight ~0.9
        fns = {}
        for p in (0.0, 1e-3):
            f = FastForwardAttn(P.K[:, :, : context - 1], P.V[:, :, : context - 1], context, launch == "default")
            out = torch.empty(batch, HEADS, 128, device="cuda", dtype=dtype)
            fns[p] = (lambda f=f, out=out, p=p: f.attention(P.q, P.k, P.v, 1.0 / math.sqrt(128) , context - 1, p, out=out))
        t0, t1 = bench(fns[0.0]), bench(fns[1e-3])
        rows.append({"batch": batch, "kv_heads": kv_heads, "context": context, "launch": launch,
                     "p0_us": t0, "p1e-3_us": t1, "speedup": t0 / t1})
        print(f"prune b{batch} kv{kv_heads} L{context} {launch}: p=0 {t0:.1f} us, p=1e-3 {t1:.1f} us, {t0 / t1:.2f}x",
              flush=True)
        del P
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="bandwidth,grid,seed,prune")
    ap.add_argument("--dtypes", default="float16,bfloat16")
    ap.add_argument("--methods", default="read,ffa_tuned,ffa_heuristic,ffa_default,sdpa_flash,sdpa_efficient,"
                                         "sdpa_math,sdpa_cudnn,flex")
    ap.add_argument("--seed-x", default="256,512,1024,2048,4096,8192,16384,32768")
    ap.add_argument("--seed-batches", default="1,4,16")
    ap.add_argument("--out", default=None, help="JSON file for all results")
    args = ap.parse_args(argv)
    sections = args.sections.split(",")
    props = torch.cuda.get_device_properties(0)
    result = {"device": props.name, "sm_count": props.multi_processor_count, "torch": torch.__version__,
              "date": datetime.date.today().isoformat(), "command": " ".join(sys.argv),
              "commit": source_commit()}
    bw = bandwidth() if "bandwidth" in sections or "grid" in sections else None
    if bw:
        result["bandwidth"] = bw
        print(f"bandwidth: copy {bw['copy_GBps']:.0f} GB/s, read-only {bw['read_GBps']:.0f} GB/s", flush=True)
    if "grid" in sections:
        methods = args.methods.split(",")
        result["grid"] = grid(args.dtypes.split(","), methods, props.multi_processor_count, bw["copy_GBps"])
    if "seed" in sections:
        result["seed"] = seed_protocol([int(x) for x in args.seed_x.split(",")],
                                       [int(b) for b in args.seed_batches.split(",")])
    if "prune" in sections:
        result["prune"] = prune()
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
        report.main(args.out)  # the Markdown table with the targets and the PNG plots, beside it
    return result


if __name__ == "__main__":
    main()
