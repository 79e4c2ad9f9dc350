"""The search behind `python -m ffa.tuner`: candidate space, workload grid, checking each
candidate against the reference, and timing it.

For every workload (dtype, head_dim, group, batch x kv_heads, context length) the search
  1. builds one random problem at full length, in as many copies of its cache as the timing
     protocol rotates through (ffa.measure), and its reference output (ffa.reference on
     upcast copies of the cache);
  2. coarse stage: every split_len at 128 threads and the largest heads_per_block, on CUDA
     cores and (where they apply) on tensor cores, plus the heuristic's own choice;
  3. refine stage: every threads x heads_per_block x kernel at the `refine` best split lengths,
     and, on a GPU where they apply (launch.features_apply), the best tensor-core and the best
     TMA launch of each of them in every cluster size;
  4. times the fastest with programmatic dependent launch too, where it applies, and keeps the
     fastest candidate.
A candidate is timed only after one run into a NaN-filled output matched the reference; one
that raises ValueError or disagrees is rejected, except that a launch the GPU cannot run
(UnsupportedError: a tensor-core block with more shared memory than the GPU has) is only
noted. Candidates are timed in the layer-rotation protocol of ffa.measure (one call per cache
copy in one CUDA graph, cold L2), which is what the benchmarks report and what a decode loop
sees. The two functions that touch the GPU, `run` (one decode step of one cache copy with a
given LaunchConfig) and `timer` (seconds per call of a list of calls, ffa.measure.RotationTimer
on the GPU), are parameters, so tests run the whole search on CPU tensors with a fake timer.
"""

import functools
import math
from dataclasses import dataclass, field, replace

import torch

from .._lib import UnsupportedError
from ..attention import FastForwardAttn
from ..launch import (LaunchConfig, cluster_sizes, features_apply, heads_per_block_options, heuristic, heuristic_tma,
                      largest_heads_per_block, max_heads_per_block, takes_features, tensor_cores_apply, thread_counts,
                      tma_applies)
from ..measure import Progress
from ..reference import decode_reference
from .cache import DTYPE_NAMES, Entry

SPLIT_LENS = (0, 64, 128, 256, 512, 1024, 2048, 4096)
SHORT_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Relative L2 error against the upcast reference that a correct launch stays within (output
# rounding dominates); a launch that drops one 64-position split of a 64k context is off by ~3e-2.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-4}


# ---- what is searched ----------------------------------------------------------------------

def split_options(length):
    return [s for s in SPLIT_LENS if s < length]


def kernels(tensor_cores):
    """The mma kernels to try: CUDA cores, and tensor cores where they apply."""
    return (False, True) if tensor_cores else (False,)


# The TMA kernel's rings (stages, tile_rows): the coarse stage tries the heuristic's ring and
# threads (launch.heuristic_tma), the refine stage these at every thread count (a launch the
# GPU cannot run, such as a ring too large for one block, is noted as unsupported), and
# programmatic dependent launch on the best of them.
TMA_RINGS = ((3, 64), (4, 64), (2, 128), (3, 128), (4, 32), (6, 32))


def tma_launch(group, split_len, threads, ring, pdl=False):
    """A TMA launch whose block holds the whole group (or its largest divisor that fits)."""
    hpb = heads_per_block_options(group, max_heads_per_block("tma"))[-1]
    return LaunchConfig(threads, hpb, split_len, tma=True, stages=ring[0], tile_rows=ring[1], pdl=pdl)


def candidates(group, length, tensor_cores=False, tma=False, features=False):
    """The whole candidate space of one workload (`features`: tensor-core launches with pdl and
    clusters too; TMA launches always have them)."""
    space = [LaunchConfig(t, h, s, tc) for s in split_options(length)
             for t in thread_counts() for h in heads_per_block_options(group) for tc in kernels(tensor_cores)]
    if tensor_cores and features:
        space += [replace(c, pdl=pdl, cluster=size) for c in space if c.tensor_cores for pdl in (False, True)
                  for size in (cluster_sizes() if c.split_len else (1,)) if pdl or size > 1]
    if tma:
        space += [replace(tma_launch(group, s, t, ring, pdl), cluster=c) for s in split_options(length)
                  for t in thread_counts() for ring in TMA_RINGS for pdl in (False, True)
                  for c in (cluster_sizes() if s else (1,))]
    return space


def coarse_candidates(group, length, tensor_cores=False, tma=False, head_dim=128):
    hpb = largest_heads_per_block(group)
    coarse = [LaunchConfig(128, hpb, s, tc) for s in split_options(length) for tc in kernels(tensor_cores)]
    if tma:
        first = heuristic_tma(1, 1, group, length, 1, head_dim)  # its ring and threads (split and cluster are ours)
        coarse += [replace(first, split_len=s, cluster=1) for s in split_options(length)]
    return coarse


def refine_candidates(group, split_len, tensor_cores=False, tma=False):
    refined = [LaunchConfig(t, h, split_len, tc) for t in thread_counts() for h in heads_per_block_options(group)
               for tc in kernels(tensor_cores)]
    if tma:
        refined += [tma_launch(group, split_len, t, ring) for t in thread_counts() for ring in TMA_RINGS]
    return refined


@dataclass(frozen=True)
class Workload:
    """One bucket of the grid, with the batch and kv_heads that realise it."""
    dtype: torch.dtype
    head_dim: int
    group: int
    batch: int
    kv_heads: int
    length: int

    @property
    def batch_kv_heads(self):
        return self.batch * self.kv_heads

    @property
    def kv_bytes(self):
        return 2 * self.batch_kv_heads * self.length * self.head_dim * self.dtype.itemsize

    def __str__(self):
        return (f"{SHORT_NAMES.get(self.dtype, self.dtype)} d{self.head_dim} g{self.group} "
                f"b{self.batch}x{self.kv_heads} L{self.length}")


@dataclass(frozen=True)
class Grid:
    """dtype x head_dim x group x batch x context, at a fixed kv_heads, skipping shapes whose
    K+V exceed max_kv_bytes (those have blocks for every SM anyway: a bucket an octave shorter or
    the heuristic serves them). `refine` is how many split lengths the refine stage explores."""
    dtypes: tuple = (torch.float16, torch.bfloat16)
    head_dims: tuple = (64, 128)
    groups: tuple = (1, 2, 4, 8)
    kv_heads: int = 8
    batches: tuple = (1, 4, 16, 64)
    lengths: tuple = (1024, 4096, 16384, 65536)
    max_kv_bytes: int = 1 << 30
    refine: int = 2

    def workloads(self):
        every = (Workload(dt, d, g, b, self.kv_heads, n) for dt in self.dtypes for d in self.head_dims
                 for g in self.groups for b in self.batches for n in self.lengths)
        return [w for w in every if w.kv_bytes <= self.max_kv_bytes]


DEFAULT_GRID = Grid()
QUICK_GRID = Grid(head_dims=(128,), groups=(1, 4), batches=(1, 8), lengths=(2048, 16384), refine=1)


# ---- one workload ------------------------------------------------------------------------

class Problem:
    """A workload's random inputs in `copies` FastForwardAttn caches filled to its full length
    (the step writes and attends at t = length - 1; every copy holds the same rows), and the
    reference output of that step."""

    def __init__(self, workload, device, seed=0, copies=1):
        w = self.workload = workload
        gen = torch.Generator(device=device).manual_seed(seed)

        def rnd(*shape):
            return torch.randn(*shape, generator=gen, device=device, dtype=w.dtype)

        prompt = (w.batch, w.kv_heads, w.length - 1, w.head_dim)
        K, V = rnd(*prompt), rnd(*prompt)
        self.attns = [FastForwardAttn(K, V, w.length) for _ in range(copies)]
        self.attn = self.attns[0]
        del K, V
        self.q = rnd(w.batch, w.kv_heads * w.group, 1, w.head_dim)
        self.k = rnd(w.batch, w.kv_heads, 1, w.head_dim)
        self.v = rnd(w.batch, w.kv_heads, 1, w.head_dim)
        self.t = w.length - 1
        self.scale = 1 / math.sqrt(w.head_dim)
        self.out = torch.empty(w.batch, w.kv_heads * w.group, w.head_dim, dtype=w.dtype, device=device)
        k_cache, v_cache = self.attn.get_cache()
        self.reference = upcast_reference(self.q, self.k, self.v, k_cache, v_cache, self.t, self.scale)


def upcast_reference(q, k, v, k_cache, v_cache, t, scale, chunk_bytes=256 << 20):
    """The output of one decode step that writes k, v at position t (an int) and attends q over
    0 .. t: ffa.reference.decode_reference on float32 copies (float64 for float32 or float64
    inputs), a few sequences at a time so that the copies stay small. The caches themselves are
    not written. q: [batch, heads, 1, head_dim] or [batch, heads, head_dim]."""
    acc = torch.float64 if k_cache.dtype in (torch.float32, torch.float64) else torch.float32
    batch, kv_heads, _, head_dim = k_cache.shape
    per_sequence = 2 * kv_heads * (t + 1) * head_dim * acc.itemsize
    step = max(1, chunk_bytes // per_sequence)
    rows3 = [x.reshape(batch, x.shape[1], head_dim) for x in (q, k, v)]
    outs = []
    for b in range(0, batch, step):
        rows = slice(b, b + step)
        n = len(range(batch)[rows])
        up = [x[rows].to(acc, copy=True) for x in rows3]
        up += [x[rows, :, : t + 1].to(acc, copy=True) for x in (k_cache, v_cache)]
        pos = torch.full((n,), t, dtype=torch.int64, device=q.device)
        start = torch.zeros(n, dtype=torch.int64, device=q.device)
        outs.append(decode_reference(*up, pos, start, scale, 0.0))
    return torch.cat(outs)


def run_candidate(problem, config, copy=0):
    """One decode step of cache copy `copy` of the problem with launch `config`; returns the
    output tensor."""
    attn = problem.attns[copy]
    attn.launch = config  # the attribute FastForwardAttn(launch=...) sets
    return attn.attention(problem.q, problem.k, problem.v, problem.scale, problem.t, out=problem.out)


def relative_error(out, reference):
    """Relative L2 error of `out` against `reference` (NaN if out holds a NaN)."""
    if tuple(out.shape) != tuple(reference.shape):
        return math.inf
    diff = out.to(reference.dtype) - reference
    return float(diff.norm() / reference.norm())


@dataclass
class Result:
    """The outcome of one workload: every timed candidate, every rejected one and why."""
    workload: Workload
    heuristic: LaunchConfig
    timings: dict = field(default_factory=dict)      # LaunchConfig -> seconds
    rejected: dict = field(default_factory=dict)     # LaunchConfig -> reason
    unsupported: dict = field(default_factory=dict)  # LaunchConfig -> reason (the GPU cannot run it)

    @property
    def config(self):
        return min(self.timings, key=self.timings.get) if self.timings else None

    @property
    def seconds(self):
        return self.timings[self.config] if self.timings else None

    def entry(self):
        w, h = self.workload, self.timings.get(self.heuristic)
        return Entry(DTYPE_NAMES[w.dtype], w.head_dim, w.group, w.batch_kv_heads, w.length,
                     self.config, round(self.seconds * 1e6, 3), self.heuristic,
                     None if h is None else round(h * 1e6, 3))


def tune(problem, sm_count, timer, run=run_candidate, refine=2, capability=None):
    """Check and time the coarse candidates, then refine around the best split lengths.
    `capability` (the GPU's (major, minor)) decides whether tensor-core launches are tried."""
    w = problem.workload
    tensor_cores = capability is not None and tensor_cores_apply(w.dtype, w.head_dim, capability)
    tma = capability is not None and tma_applies(w.dtype, w.head_dim, capability)
    features = capability is not None and features_apply("tensor_cores", capability)
    result = Result(w, heuristic(w.batch, w.kv_heads, w.group, w.length, sm_count, w.head_dim, tensor_cores,
                                 tma=tma))

    def measure(config):
        if config in result.timings or config in result.rejected or config in result.unsupported:
            return
        problem.out.fill_(float("nan"))
        try:
            out = run(problem, config)
        except UnsupportedError as e:
            result.unsupported[config] = str(e)
            return
        except ValueError as e:
            result.rejected[config] = f"raised {e}"
            return
        err = relative_error(out, problem.reference)
        if not err <= TOLERANCE[w.dtype]:
            result.rejected[config] = f"relative error {err:.3g} vs the reference"
            return
        result.timings[config] = timer([functools.partial(run, problem, config, copy)
                                        for copy in range(len(problem.attns))])

    measure(result.heuristic)
    for config in coarse_candidates(w.group, w.length, tensor_cores, tma, w.head_dim):
        measure(config)
    per_split = {}
    for config, seconds in result.timings.items():
        per_split[config.split_len] = min(seconds, per_split.get(config.split_len, math.inf))
    for split_len in sorted(per_split, key=per_split.get)[:refine]:
        for config in refine_candidates(w.group, split_len, tensor_cores, tma):
            measure(config)
        kernels_with_features = {c.kernel for c in result.timings if takes_features(c.kernel)}
        for kernel in sorted(kernels_with_features) if features and split_len > 0 else ():
            # the best launch of this kernel and split length in each cluster size
            base = min((c for c in result.timings if c.kernel == kernel and c.split_len == split_len),
                       key=result.timings.get, default=None)
            for cluster in cluster_sizes() if base else ():
                measure(replace(base, cluster=cluster))
    best = result.config
    if best is not None and features and takes_features(best.kernel):
        measure(replace(best, pdl=True))
    return result


# ---- the sweep ---------------------------------------------------------------------------

def sweep(workloads, device, sm_count, timer, *, run=run_candidate, refine=2, on_result=None,
          progress=True, seed=0, capability=None, copies=lambda workload: 1):
    """Tune every workload in turn; `on_result(result)` is called as each finishes (the CLI
    saves there, so an interrupted sweep keeps what it measured); `copies(workload)`: how many
    cache copies the timer rotates through. Returns the Results."""
    results = []
    bar = Progress(len(workloads), desc="ffa.tuner", enabled=progress)
    try:
        for w in workloads:
            problem = Problem(w, device, seed, copies(w))
            result = tune(problem, sm_count, timer, run, refine, capability)
            del problem
            results.append(result)
            if on_result is not None:
                on_result(result)
            bar.step(str(w))
    finally:
        bar.close()
    return results
