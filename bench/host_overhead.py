"""Host time of one eager decode-attention call: FastForwardAttn.attention against what
transformers' default eager path does per layer (two torch.cat and one SDPA). A GPU program.

    python bench/host_overhead.py [--calls 100] [--repeats 30] [--out host_overhead.json]

In eager generation every layer of every step makes one such call, and at small batches the
kernels take a few microseconds: the Python between them sets the pace. Each timed loop of
--calls calls starts behind a GPU busy-wait long enough to cover it, so the GPU never waits
for the host and never holds it back: loop wall time / calls is host time per call (median
over --repeats loops). A loop that outran the busy-wait is counted in "late" (its time then
includes GPU time; should be 0).

Shapes: batch 1, 32 query heads, kv heads 32 and 8, head_dim 64 and 128, max_len 2048, fp16,
position 1000. Positions as Hugging Face passes them (t and start: int64 CUDA tensors
[batch]) and as Python ints. With the eager fast path (ffa.ops.cuda_decode) the FFA calls
are also broken down into: the output allocation, ops.cuda_decode (filling a copy of the
launch's fixed params, then the library call) and _lib.decode alone (ctypes, the C checks,
the kernel launch); "checks" is the rest of attention(): argument checks and the launch
choice. Beyond that breakdown it uses only the public API and the tuner's GPU busy-wait rate
(ffa.tuner.search.sleep_rate), so it also times other versions of the package that have those.
"""

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import ffa
from ffa import FastForwardAttn, _lib, ops
from ffa.tuner.search import sleep_rate

BATCH, HEADS, MAX_LEN, POSITION = 1, 32, 2048, 1000
SHAPES = [(32, 64), (32, 128), (8, 64), (8, 128)]  # (kv heads, head_dim)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=100, help="calls per timed loop")
    p.add_argument("--repeats", type=int, default=30, help="timed loops per measurement")
    p.add_argument("--out", default=None, help="JSON file to write")
    return p.parse_args()


class Timer:
    def __init__(self, calls, repeats):
        self.calls, self.repeats = calls, repeats
        self.cycles_per_s = sleep_rate()

    def loop(self, step):
        start = time.perf_counter()
        for _ in range(self.calls):
            step()
        return time.perf_counter() - start

    def host_us(self, step):
        """(median, min) host microseconds per call of `step`, and how many loops were late."""
        torch.cuda.synchronize()
        estimate = max(self.loop(step) for _ in range(3))  # warm-up, and the busy-wait's length
        seconds, late = [], 0
        for _ in range(self.repeats):
            torch.cuda.synchronize()
            torch.cuda._sleep(int(self.cycles_per_s * (2 * estimate + 2e-3)))
            busy = torch.cuda.Event()
            busy.record()
            seconds.append(self.loop(step))
            late += busy.query()  # the busy-wait ended before the loop: the GPU caught up
        torch.cuda.synchronize()
        per_call = [s / self.calls * 1e6 for s in seconds]
        return statistics.median(per_call), min(per_call), late


def ffa_case(kv_heads, head_dim, positions):
    """attention()'s arguments in the form Hugging Face (or a plain caller) passes them."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float16)
    f = FastForwardAttn(rnd(BATCH, kv_heads, POSITION, head_dim), rnd(BATCH, kv_heads, POSITION, head_dim), MAX_LEN)
    # q, k, v as attention modules make them: projections [batch, 1, heads, head_dim], transposed
    q = rnd(BATCH, 1, HEADS, head_dim).transpose(1, 2)
    k, v = (rnd(BATCH, 1, kv_heads, head_dim).transpose(1, 2) for _ in range(2))
    if positions == "hf tensors":
        t = torch.full((BATCH,), POSITION, dtype=torch.int64, device="cuda")
        start = torch.zeros(BATCH, dtype=torch.int64, device="cuda")
    else:
        t, start = POSITION, 0
    return f, dict(q=q, k=k, v=v, softmax_scale=head_dim ** -0.5, t=t, start=start)


def breakdown(timer, f, a):
    """Host microseconds of the parts of one FFA call (the fast path's functions)."""
    heads, head_dim = a["q"].shape[1], a["q"].shape[3]
    pos, start = (x if isinstance(x, torch.Tensor) else None for x in (a["t"], a["start"]))
    pos_int, start_int = (0 if isinstance(x, torch.Tensor) else x for x in (a["t"], a["start"]))
    length = MAX_LEN if pos is not None else pos_int + 1
    params = f._launch_params(heads, f.launch_config(heads, length))
    out = a["q"].new_empty(BATCH, heads, head_dim)
    decode = lambda: ops.cuda_decode(params, out, a["q"], a["k"], a["v"], pos, pos_int, start, start_int,
                                     a["softmax_scale"], 0.0)
    captured = []  # the struct cuda_decode hands the library, to time the library call alone
    library_call, _lib.decode = _lib.decode, captured.append
    try:
        decode()
    finally:
        _lib.decode = library_call
    parts = {
        "out allocation": timer.host_us(lambda: a["q"].new_empty(BATCH, heads, head_dim))[0],
        "ops.cuda_decode": timer.host_us(decode)[0],
        "_lib.decode": timer.host_us(lambda: _lib.decode(captured[0]))[0],
    }
    return parts


def reference_step(kv_heads, head_dim):
    """transformers' default eager decode step of one layer: the dynamic cache concatenates the
    new key and value, then SDPA (grouped-query heads through enable_gqa)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float16)
    K, V = rnd(BATCH, kv_heads, POSITION, head_dim), rnd(BATCH, kv_heads, POSITION, head_dim)
    q = rnd(BATCH, 1, HEADS, head_dim).transpose(1, 2)
    k, v = (rnd(BATCH, 1, kv_heads, head_dim).transpose(1, 2) for _ in range(2))
    scale, gqa = head_dim ** -0.5, kv_heads != HEADS

    def step():
        keys, values = torch.cat([K, k], dim=-2), torch.cat([V, v], dim=-2)
        return F.scaled_dot_product_attention(q, keys, values, scale=scale, enable_gqa=gqa)
    return step


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main():
    args = parse_args()
    timer = Timer(args.calls, args.repeats)
    fast_path = hasattr(ops, "cuda_decode")
    env = {"gpu": torch.cuda.get_device_name(), "cpu": cpu_name(), "torch": torch.__version__,
           "ffa": ffa.__version__, "fast_path": fast_path, "calls": args.calls, "repeats": args.repeats}
    print(" | ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    header = f"{'kv':>3} {'d':>4}  {'path':24} {'us/call':>8} {'min':>7} {'late':>4}"
    if fast_path:
        header += "   alloc  cuda_decode (_lib.decode)  checks"
    print(header)
    rows = []
    for kv_heads, head_dim in SHAPES:
        steps = {"torch cat+cat+sdpa": (reference_step(kv_heads, head_dim), None)}
        for positions in ("hf tensors", "ints"):
            f, a = ffa_case(kv_heads, head_dim, positions)
            steps[f"ffa, {positions}"] = (lambda f=f, a=a: f.attention(**a), (f, a))
        for path, (step, case) in steps.items():
            median, best, late = timer.host_us(step)
            row = dict(kv_heads=kv_heads, head_dim=head_dim, path=path, us_per_call=median, min_us=best, late=late)
            line = f"{kv_heads:3d} {head_dim:4d}  {path:24} {median:8.2f} {best:7.2f} {late:4d}"
            if fast_path and case is not None:
                parts = breakdown(timer, *case)
                parts["checks"] = median - parts["ops.cuda_decode"] - parts["out allocation"]
                row["breakdown_us"] = parts
                line += (f"  {parts['out allocation']:6.2f} {parts['ops.cuda_decode']:12.2f} "
                         f"({parts['_lib.decode']:5.2f}) {parts['checks']:13.2f}")
            print(line, flush=True)
            rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
