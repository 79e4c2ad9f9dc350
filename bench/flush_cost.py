"""What the L2 flush of a benchmark costs the kernel it times (a GPU program).

    python bench/flush_cost.py bench/results/flush-cost-h100.json

Kernel benchmarks flush L2 before each timed call so that the cache is read from memory. A flush
that writes a buffer (triton's do_bench and ffa.tuner's timer both zero one) leaves L2 full of
dirty lines, which the timed kernel then writes back while it reads. This times, over the 32
shapes of bench/kernels.py in float16, FFA (heuristic launch) and a plain read of the
same bytes (torch.sum) after three flushes: "write" (zero a buffer twice the L2 size, as
ffa.tuner's timer does by default), "read" (sum such a buffer: clean lines) and "none" (warm
L2), each with ffa.tuner's CudaTimer (CUDA events around each call, median, a GPU spin first so
that the host queues every call ahead of the GPU).
"""

import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import HEADS, PAIRS  # noqa: E402

from ffa import FastForwardAttn  # noqa: E402
from ffa.tuner.search import CudaTimer  # noqa: E402


def main(out):
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    buf = torch.empty(l2, dtype=torch.float16, device="cuda")  # twice the L2 size in bytes
    flushes = {"write": buf.zero_, "read": lambda: buf.sum(dtype=torch.float32), "none": lambda: None}
    timers = {name: CudaTimer(torch.device("cuda"), flush=flush) for name, flush in flushes.items()}
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
                methods = {"ffa": lambda f=f: f.attention(q, k, k, 1 / math.sqrt(head_dim), length - 1, out=o),
                           "sum": lambda flat=flat: flat.sum(dtype=torch.float32)}
                row = dict(D=head_dim, kv=kv_heads, b=batch, L=length, floor=4 * K.numel() / 3.0e6)
                for name, timer in timers.items():
                    for m, fn in methods.items():
                        row[f"{m}_{name}"] = timer(fn) * 1e6
                rows.append(row)
                print(f"d{head_dim} kv{kv_heads} b{batch} L{length} floor {row['floor']:7.1f} | "
                      + " | ".join(f"{m}: " + " ".join(f"{n} {row[f'{m}_{n}']:7.1f}" for n in flushes) for m in methods),
                      flush=True)
                del K, V, f, flat, methods  # the cache's memory goes back before the next shape
                torch.cuda.empty_cache()
    for key in ("ffa_write", "ffa_read", "sum_write", "sum_read"):
        g = math.exp(sum(math.log(r[key] / r["floor"]) for r in rows) / len(rows))
        print(f"geomean {key} / floor {g:.3f}")
    with open(out, "w") as fh:
        json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
