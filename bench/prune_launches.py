"""Pruning (p = 1e-3) against p = 0, launch by launch, on grouped-query shapes (a GPU program).

    python bench/prune_launches.py

An attention sink (q of every head aligned with key 0: weight about 0.7, every other weight about
1e-4), head_dim 128, fp16, 32 query heads over 8 kv heads. For each fixed launch (threads, heads
per block, split length) the tuner's timer (CUDA events, L2 flushed, median) times p = 0 and
p = 1e-3. On CUDA cores one-head blocks (register loads) skip V reads and gain, blocks of 2 or 4
heads (the shared-memory ring) do not; launches marked True run on tensor cores.
"""

import math

import torch

from ffa import FastForwardAttn
from ffa.launch import LaunchConfig
from ffa.tuner.search import CudaTimer

CASES = ((32, 8, 8192, [(128, 4, 0), (128, 2, 0), (128, 1, 0), (64, 4, 0), (128, 4, 2048),
                        (128, 4, 0, True), (256, 4, 0, True), (128, 4, 2048, True)]),
         (1, 8, 32768, [(128, 4, 1024), (128, 1, 1024), (128, 2, 512), (128, 4, 1024, True),
                        (256, 4, 2048, True)]))


def main():
    timer = CudaTimer(torch.device("cuda"))
    for batch, kv_heads, length, launches in CASES:
        K = torch.randn(batch, kv_heads, length, 128, dtype=torch.float16, device="cuda")
        V = torch.randn_like(K)
        q = (K[:, :, :1].repeat_interleave(32 // kv_heads, 1) * 0.9).contiguous()
        k = torch.randn(batch, kv_heads, 1, 128, dtype=torch.float16, device="cuda")
        out = torch.empty(batch, 32, 128, dtype=torch.float16, device="cuda")
        for launch in launches:
            f = FastForwardAttn(K[:, :, :length - 1], V[:, :, :length - 1], length, launch=LaunchConfig(*launch))
            us = {p: timer(lambda: f.attention(q, k, k, 1 / math.sqrt(128), length - 1, p, out=out)) * 1e6
                  for p in (0.0, 1e-3)}
            print(f"b{batch} kv{kv_heads} L{length} launch {launch}: p=0 {us[0.0]:.1f} us, p=1e-3 {us[1e-3]:.1f} us, "
                  f"speedup {us[0.0] / us[1e-3]:.2f}", flush=True)
            del f
        del K, V


if __name__ == "__main__":
    main()
