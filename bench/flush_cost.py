"""What the L2 flush of a benchmark costs the kernel it times (a GPU program).

    python bench/flush_cost.py bench/results/flush-cost-h100.json

Kernel benchmarks flush L2 before each timed call so that the cache is read from memory. A flush
that writes a buffer (triton's do_bench and ffa.tuner's timer both zero one) leaves L2 full of
dirty lines, which the timed kernel then writes back while it reads. This times, over the 32
shapes of bench/attention_kernels.py in float16, FFA (heuristic launch) and a plain read of the
same bytes (torch.sum) after three flushes: "write" (zero a buffer twice the L2 size), "read"
(sum such a buffer: clean lines) and "none" (warm L2). CUDA events around each call, median of
30, a GPU spin first so the host queues every call ahead of the GPU.
"""

import json
import math
import statistics
import sys

import torch

from ffa import FastForwardAttn
from ffa.tuner.search import sleep_rate

PAIRS = [(1, 1024), (1, 16384), (1, 65536), (8, 4096), (16, 1024), (32, 4096), (64, 8192), (128, 2048)]
HEADS = 32


def median_us(fn, flush, cycles_per_s, reps=30):
    fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    torch.cuda._sleep(int(0.01 * cycles_per_s))
    for start, end in zip(starts, ends):
        flush()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))


def main(out):
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    buf = torch.empty(l2, dtype=torch.float16, device="cuda")  # twice the L2 size in bytes
    flushes = {"write": buf.zero_, "read": lambda: buf.sum(dtype=torch.float32), "none": lambda: None}
    rate = sleep_rate()
    rows = []
    for head_dim in (64, 128):
        for kv_heads in (32, 8):
            for batch, length in PAIRS:
                K = torch.randn(batch, kv_heads, length, head_dim, dtype=torch.float16, device="cuda")
                V = torch.randn_like(K)
                q = torch.randn(batch, HEADS, 1, head_dim, dtype=torch.float16, device="cuda")
                k = torch.randn(batch, kv_heads, 1, head_dim, dtype=torch.float16, device="cuda")
                f = FastForwardAttn(K[:, :, :length - 1], V[:, :, :length - 1], length)
                o = torch.empty(batch, HEADS, head_dim, dtype=torch.float16, device="cuda")
                flat = torch.empty(2 * K.numel(), dtype=torch.float16, device="cuda").normal_()
                methods = {"ffa": lambda: f.attention(q, k, k, 1 / math.sqrt(head_dim), length - 1, out=o),
                           "sum": lambda: flat.sum(dtype=torch.float32)}
                row = dict(D=head_dim, kv=kv_heads, b=batch, L=length, floor=4 * K.numel() / 3.0e6)
                for name, flush in flushes.items():
                    for m, fn in methods.items():
                        row[f"{m}_{name}"] = median_us(fn, flush, rate)
                rows.append(row)
                print(f"d{head_dim} kv{kv_heads} b{batch} L{length} floor {row['floor']:7.1f} | "
                      + " | ".join(f"{m}: " + " ".join(f"{n} {row[f'{m}_{n}']:7.1f}" for n in flushes) for m in methods),
                      flush=True)
                del K, V, f, flat
                torch.cuda.empty_cache()
    for key in ("ffa_write", "ffa_read", "sum_write", "sum_read"):
        g = math.exp(sum(math.log(r[key] / r["floor"]) for r in rows) / len(rows))
        print(f"geomean {key} / floor {g:.3f}")
    with open(out, "w") as fh:
        json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
