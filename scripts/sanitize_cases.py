"""The reduced GPU matrix that scripts/sanitize.sh runs under compute-sanitizer.

Every kernel family runs at least once: default (unsplit) and split launches (whose last
block to finish combines the splits), every dtype, every head_dim, MHA/GQA/MQA, every compiled
heads-per-block template (1, 2, 4, 8, and a partial block), 64/128/256 threads, ragged t as
int32 and int64 device tensors, left padding, a sliding window with softcapped logits, attention
sinks (every kernel, split, unsplit and in clusters), p > 0
and p near 1, several sub-chunks per block, 63 splits to combine, one workspace reused by
launches of every shape (its split counters must come back to zero), t = 0 on an empty prompt,
t = max_len - 1, and device positions out of range (NaN rows, no cache write). Each case is checked against the float64
reference as tests/test_gpu_kernel.py does. A plain program rather than pytest, and small,
because the sanitizer slows every launch down; it reads back only memory that was written, so
that initcheck flags only what the library does.

    python3 scripts/sanitize_cases.py [--only SUBSTRING] [--list]

Prints one line per case and, at the end, "sanitize_cases: N cases passed".
"""

import argparse
import itertools
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("FFA_TUNER_CACHE_DIR", tempfile.mkdtemp())  # no tuned table: the launch is given

from cases import Case, exact, make_inputs, make_sinks, pruning_bound, rel_l2  # noqa: E402
from test_gpu_kernel import DTYPES, HEAD_DIMS, TOL  # noqa: E402

from ffa import FastForwardAttn, LaunchConfig  # noqa: E402
from ffa.launch import tma_applies  # noqa: E402

HEADS = [(4, 4), (8, 2), (4, 1)]  # MHA, GQA (group 4), MQA


@dataclass
class Run:
    name: str
    case: Case
    launch: LaunchConfig
    t: Optional[list] = None  # per-sequence positions (default: make_inputs' choice)
    start: Optional[list] = None
    index_dtype: torch.dtype = torch.int64
    invalid: list = field(default_factory=list)  # sequences whose device position is out of range
    then: list = field(default_factory=list)  # further launches of the same step, same workspace


def matrix():
    """The runs, in order; names say what each one covers."""
    runs = []
    for (di, dtype), (hi, head_dim) in itertools.product(enumerate(DTYPES), enumerate(HEAD_DIMS)):
        heads, kv_heads = HEADS[(di + hi) % 3]
        shaped = (di + hi) % 2 == 0  # ragged t and left padding
        p = 0.01 if (di + hi // 2) % 2 else 0.0
        c = Case(batch=2, heads=heads, kv_heads=kv_heads, head_dim=head_dim, prompt_len=150, max_len=200,
                 dtype=dtype, ragged=shaped, padded=shaped, p=p)
        tag = f"{str(dtype)[6:]} d{head_dim} h{heads}/{kv_heads}{' ragged+padded' if shaped else ''} p={p}"
        runs.append(Run(f"default {tag}", c, LaunchConfig(256, 1, 0)))
        runs.append(Run(f"split {tag}", c, LaunchConfig(128, min(heads // kv_heads, 8), 64)))

    f16 = torch.float16
    for threads in (64, 128, 256):  # 8 heads a block: 256-row sub-chunks, three of them
        c = Case(batch=2, heads=16, kv_heads=2, head_dim=128, prompt_len=600, max_len=640, dtype=f16, ragged=True)
        runs.append(Run(f"unsplit 8 heads/block {threads} threads, 601 rows", c, LaunchConfig(threads, 8, 0),
                        index_dtype=torch.int32))
    runs += [
        Run("split 3 heads/block (partial 4-head block), split 48, 64 threads",
            Case(batch=2, heads=12, kv_heads=2, head_dim=96, prompt_len=200, max_len=256, dtype=f16, ragged=True,
                 padded=True), LaunchConfig(64, 3, 48)),
        Run("unsplit 2 heads/block", Case(batch=3, heads=8, kv_heads=4, head_dim=64, prompt_len=100, max_len=128,
                                          dtype=torch.bfloat16, p=0.01), LaunchConfig(128, 2, 0)),
        Run("unsplit 1 head/block, 2101 rows (two sub-chunks)",
            Case(batch=1, heads=2, kv_heads=2, head_dim=64, prompt_len=2100, max_len=2112, dtype=torch.float32),
            LaunchConfig(256, 1, 0)),
        Run("split 16: 63 splits to combine", Case(batch=2, heads=4, kv_heads=2, head_dim=256, prompt_len=1000,
                                                   max_len=1008, dtype=torch.bfloat16, padded=True, ragged=True),
            LaunchConfig(128, 2, 16)),
        Run("one workspace, six launch shapes", Case(batch=2, heads=8, kv_heads=2, head_dim=128, prompt_len=500,
                                                     max_len=512, dtype=f16, ragged=True), LaunchConfig(128, 4, 64),
            then=[LaunchConfig(256, 1, 256), LaunchConfig(64, 2, 128), LaunchConfig(128, 4, 0),
                  LaunchConfig(128, 1, 64), LaunchConfig(128, 4, 64)]),
        *[Run(f"p near 1, {name}", Case(batch=2, heads=8, kv_heads=2, head_dim=128, prompt_len=300, max_len=320,
                                         dtype=f16, p=math.nextafter(1.0, 0.0)), launch)
          for name, launch in (("default", LaunchConfig(256, 1, 0)), ("split", LaunchConfig(128, 4, 64)))],
        *[Run(f"softcap, a window of 50 of 301 rows, {name}", Case(
            batch=3, heads=8, kv_heads=2, head_dim=128, prompt_len=300, max_len=320, dtype=f16, ragged=True,
            window=50, softcap=1.0, p=p), launch)
          for name, launch, p in (("default", LaunchConfig(256, 1, 0), 0.0),
                                  ("split", LaunchConfig(128, 4, 64), 0.01))],
    ]
    # The TMA kernel (compute capability 9.0+; the launch is refused elsewhere): a whole ring, a last
    # tile to patch, two m-tiles, splits of one and several tiles, programmatic dependent launch.
    tma = dict(tma=True, stages=2, tile_rows=32)
    runs += [
        Run("tma unsplit, groups of 20 (two m-tiles), 601 rows", Case(
            batch=2, heads=40, kv_heads=2, head_dim=128, prompt_len=600, max_len=640, dtype=f16, ragged=True,
            padded=True), LaunchConfig(128, 20, 0, **tma)),
        Run("tma split 64 with pdl, head_dim 256, softcap and a window", Case(
            batch=3, heads=8, kv_heads=2, head_dim=256, prompt_len=300, max_len=320, dtype=torch.bfloat16,
            ragged=True, window=50, softcap=1.0), LaunchConfig(64, 4, 64, pdl=True, **tma)),
        Run("tma split 16 (shorter than a tile), head_dim 64", Case(
            batch=2, heads=4, kv_heads=4, head_dim=64, prompt_len=200, max_len=256, dtype=f16, ragged=True),
            LaunchConfig(256, 1, 16, **tma)),
        Run("tma split 32 in clusters of 4 (the last padded past the splits), groups of 16, a window", Case(
            batch=2, heads=32, kv_heads=2, head_dim=128, prompt_len=300, max_len=330, dtype=f16, ragged=True,
            window=100), LaunchConfig(128, 16, 32, pdl=True, cluster=4, **tma)),
        Run("tensor cores split 32 in clusters of 4 with pdl (the last padded past the splits), a window", Case(
            batch=2, heads=16, kv_heads=2, head_dim=64, prompt_len=300, max_len=330, dtype=f16, ragged=True,
            window=100), LaunchConfig(128, 8, 32, tensor_cores=True, pdl=True, cluster=4)),
        Run("tensor cores split 64 in clusters of 8 (one cluster), pruning", Case(
            batch=2, heads=8, kv_heads=2, head_dim=128, prompt_len=300, max_len=320, dtype=torch.bfloat16,
            ragged=True, p=0.01), LaunchConfig(64, 4, 64, tensor_cores=True, cluster=8)),
    ]
    # Attention sinks, in each kernel's output writes: unsplit, the split combine, the cluster combine.
    sinks = dict(batch=3, heads=8, kv_heads=2, head_dim=64, prompt_len=300, max_len=320, dtype=f16, ragged=True,
                 padded=True, sinks=True)
    runs += [Run(f"sinks, {name}", Case(**sinks, p=p), launch) for name, launch, p in (
        ("default", LaunchConfig(256, 1, 0), 0.0), ("split 64, pruning", LaunchConfig(128, 4, 64), 0.01),
        ("tensor cores unsplit", LaunchConfig(128, 4, 0, tensor_cores=True), 0.0),
        ("tma split 32 in clusters of 4", LaunchConfig(128, 4, 32, cluster=4, **tma), 0.0))]
    for name, launch in (("default", LaunchConfig(256, 1, 0)), ("split", LaunchConfig(128, 2, 16)),
                         ("tma", LaunchConfig(64, 2, 32, **tma))):
        runs += [
            Run(f"t = 0 on an empty prompt, {name}", Case(batch=2, heads=4, kv_heads=2, head_dim=64, prompt_len=0,
                                                          max_len=8, dtype=f16), launch),
            Run(f"t = max_len - 1, {name}", Case(batch=2, heads=4, kv_heads=2, head_dim=64, prompt_len=127,
                                                 max_len=128, dtype=f16, ragged=True), launch),
            Run(f"sequences at both ends, start = t, {name}",
                Case(batch=3, heads=4, kv_heads=2, head_dim=64, prompt_len=100, max_len=101, dtype=f16), launch,
                t=[0, 100, 50], start=[0, 100, 10]),
            Run(f"device positions out of range, {name}",  # a full cache: every byte may be read back
                Case(batch=3, heads=4, kv_heads=2, head_dim=64, prompt_len=64, max_len=64, dtype=f16), launch,
                t=[5, 64, 3], start=[0, 0, 4], invalid=[1, 2]),
        ]
    return runs


def check(run, seed):
    """One decode step on the GPU (repeated with each launch of run.then, on the same
    FastForwardAttn and workspace), held to the float64 reference."""
    c = run.case
    gen = torch.Generator().manual_seed(seed)
    K, V, q, k, v, t, start = make_inputs(c, gen)
    K, V, q, k, v = (x.to(c.dtype).double() for x in (K, V, q, k, v))  # what the kernel sees
    sinks = make_sinks(c, gen)
    sinks = sinks.to(c.dtype).double() if sinks is not None else None
    explicit = run.t is not None
    if explicit:
        t, start = torch.tensor(run.t), torch.tensor(run.start)
    valid = [b for b in range(c.batch) if b not in run.invalid]
    scale = 1 / math.sqrt(c.head_dim)
    ref, kc, vc = exact(K[valid], V[valid], q[valid], k[valid], v[valid], t[valid], start[valid], scale,
                        c.max_len, c.softcap, sinks)
    if c.p > 0:  # the pruned output may differ from the exact one by this much
        allowed = pruning_bound(q[valid], kc, vc, t[valid], start[valid], scale, c.p, c.softcap, sinks)
        allowed += 4 * TOL[c.dtype] * ref.abs().max()

    dev = lambda x: x.to("cuda", c.dtype)
    f = FastForwardAttn(dev(K), dev(V), c.max_len)
    before = [x.cpu() for x in f.get_cache()] if run.invalid else None
    tt = t.to("cuda", run.index_dtype) if c.ragged or explicit else int(t[0])
    st = start.to("cuda", run.index_dtype) if c.padded or c.window or explicit else 0
    for launch in [run.launch, *run.then]:
        f.launch = launch
        out = dev(torch.full((c.batch, c.heads, c.head_dim), math.nan))
        f.attention(dev(q), dev(k), dev(v), scale, tt, c.p, start=st, out=out, softcap=c.softcap or None,
                    sinks=dev(sinks) if sinks is not None else None)
        torch.cuda.synchronize()
        out = out.cpu()

        assert out[run.invalid].isnan().all(), f"{launch}: a sequence with an invalid device position got a number"
        out = out[valid]
        assert torch.isfinite(out).all(), f"{launch}: unwritten (NaN-poisoned) or non-finite output"
        for b in valid:  # the new row landed at t[b]
            assert torch.equal(f.k_cache[b, :, t[b]].cpu(), dev(k)[b, :, 0].cpu())
            assert torch.equal(f.v_cache[b, :, t[b]].cpu(), dev(v)[b, :, 0].cpu())
        if before is not None:
            for cache, old in zip(f.get_cache(), before):
                changed = (cache.cpu() != old).any(-1).nonzero()[:, [0, 2]].unique(dim=0).tolist()
                assert changed == [[b, int(t[b])] for b in valid], f"{launch}: cache rows written: {changed}"
        if c.p == 0:
            err = rel_l2(out, ref)
            assert err < TOL[c.dtype], f"{launch}: relative L2 error {err:.3g}"
        else:
            excess = ((out.double() - ref).abs() - allowed).max()
            assert excess <= 0, f"{launch}: pruning error exceeds its bound by {excess:.3g}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the cases whose name contains this")
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    args = parser.parse_args()
    runs = [r for r in matrix() if args.only in r.name]
    if not args.list and not tma_applies(torch.float16, 64, torch.cuda.get_device_capability()):
        runs = [r for r in runs if not r.launch.tma]  # the library refuses them on this GPU
    if args.list:
        print("\n".join(r.name for r in runs))
        return
    began = time.perf_counter()
    for i, run in enumerate(runs):
        print(f"[{i + 1:2d}/{len(runs)}] {run.name}", flush=True)
        check(run, seed=i)
    print(f"sanitize_cases: {len(runs)} cases passed in {time.perf_counter() - began:.1f} s", flush=True)


if __name__ == "__main__":
    main()
