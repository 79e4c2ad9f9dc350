"""Launch configurations: what the kernel's launch fields mean, and the heuristic choice.

A LaunchConfig is the part of a launch that does not change results, only speed:
  threads          threads per block (64, 128, 256)
  heads_per_block  query heads that share one read of their kv head (divides the group size)
  split_len        positions per block; 0 means one block covers the whole sequence
  tensor_cores     the tensor-core (mma) kernel instead of the CUDA-core one: fp16 / bf16 with
                   head_dim 64 or 128 on compute capability 8.0+ (`tensor_cores_apply`)
The tuner (ffa.tuner) measures these per GPU; without its cache, `heuristic` decides.
"""

from dataclasses import asdict, dataclass, replace

import torch

MAX_HEADS_PER_BLOCK = 8
MAX_SPLITS = 8192  # the library's limit on ceil(max_len / split_len)
THREADS = (64, 128, 256)


@dataclass(frozen=True)
class LaunchConfig:
    threads: int = 128
    heads_per_block: int = 1
    split_len: int = 0
    tensor_cores: bool = False

    def as_dict(self):
        return asdict(self)


TENSOR_CORE_DTYPES = (torch.float16, torch.bfloat16)
TENSOR_CORE_HEAD_DIMS = (64, 128)


def tensor_cores_apply(dtype, head_dim, capability):
    """Whether the library has a tensor-core kernel for this dtype and head_dim on a GPU of
    compute capability `capability` (a (major, minor) tuple)."""
    return dtype in TENSOR_CORE_DTYPES and head_dim in TENSOR_CORE_HEAD_DIMS and tuple(capability) >= (8, 0)


def heads_per_block_options(group, most=MAX_HEADS_PER_BLOCK):
    """The divisors of the group size up to `most` (a block's heads share one kv head)."""
    return [d for d in range(1, min(group, most) + 1) if group % d == 0]


def largest_heads_per_block(group):
    """The largest divisor of the group size that one block can hold."""
    return heads_per_block_options(group)[-1]


def default_launch():
    """FasterTransformer's shape: one 256-thread block per (batch, query head), no split."""
    return LaunchConfig(threads=256, heads_per_block=1, split_len=0)


def round_up(x, m):
    return (x + m - 1) // m * m


# Blocks of 128 threads an H100 SM keeps resident in practice (registers and shared memory):
# one wave of the grid is RESIDENT_* x SM count blocks. Measured, with the rest of the
# heuristic, against every tuned candidate (bench/results/h100/kernel-targets-h100.md).
RESIDENT_ONE_HEAD = 5
RESIDENT_MULTI_HEAD = 4
CUDA_CORE_MAX_HEADS_PER_BLOCK = 4  # 8-head CUDA-core blocks measured slower than 4-head ones
MIN_SPLIT = 64
# Tensor-core blocks want about one block per SM, and splits of at least 512 positions (a warp
# streams 16-position tiles through a 3-stage ring, and the pipeline needs a run of tiles).
MIN_SPLIT_TENSOR_CORES = 512
# Where the tensor-core kernel is the faster one (measured: bench/results/h100/kernel-tensor-cores-h100.md):
# always for groups of 5-8 heads (it shares each K/V read among up to 8 heads where the CUDA-core
# kernel stops at 4); for groups of 2-4 heads on caches up to TENSOR_CORES_MAX_BYTES; never for
# one head (on tiny caches it wins with a cold L2 only, and loses where the cache stays in L2, as
# in the original FFA release's protocol).
TENSOR_CORES_MAX_BYTES = 128 << 20
# One-head CUDA-core blocks do not split caches this short: one 256-thread block per head (the
# default launch's shape) beats 64-position splits and their combine.
ONE_HEAD_UNSPLIT = 256
# Nor do they run unsplit over longer rows than this, even when the grid fills the GPU without
# splits: pieces of LONG_ROW_SPLIT positions shorten the last wave's tail (measured:
# bench/results/h100/kernel-targets-h100.md).
ONE_HEAD_MAX_UNSPLIT = 4096
LONG_ROW_SPLIT = 2048


def use_tensor_cores(batch, kv_heads, group, length, head_dim, prune=False):
    """Whether the heuristic picks the tensor-core kernel for this shape (fp16/bf16 bytes);
    `prune`: p > 0, where only tensor-core blocks of several heads skip V reads to any gain
    (bench/results/h100/kernel-tensor-cores-h100.md)."""
    kv_bytes = 2 * batch * kv_heads * length * head_dim * 2
    if largest_heads_per_block(group) > heads_per_block_options(group, CUDA_CORE_MAX_HEADS_PER_BLOCK)[-1]:
        return True
    if prune and group >= 2:
        return True
    return group >= 2 and kv_bytes <= TENSOR_CORES_MAX_BYTES


def heuristic(batch, kv_heads, group, length, sm_count, head_dim=128, tensor_cores=False, prune=False):
    """Fill one wave of the GPU and no more. `tensor_cores`: whether the tensor-core kernel
    applies (tensor_cores_apply); it is then used where use_tensor_cores says it is faster
    (`prune`: for a step with p > 0).
    1. Heads per block: the largest divisor of the group (at most 4 on CUDA cores, 8 on tensor
       cores) whose grid, split into pieces of the smallest split length (MIN_SPLIT, or
       MIN_SPLIT_TENSOR_CORES), still fills a wave (RESIDENT_* blocks per SM on CUDA cores, one
       on tensor cores); small caches thus trade shared K/V reads (they come from L2 anyway)
       for more, shorter blocks.
    2. Splits: floor(wave / blocks) pieces of at least the smallest split length; rounding down
       matters: a second, partial wave of blocks costs more than the parallelism it adds.
    3. One-head CUDA-core blocks: rows of at most ONE_HEAD_UNSPLIT positions are never split,
       rows of more than ONE_HEAD_MAX_UNSPLIT always (LONG_ROW_SPLIT positions per piece).
    4. Threads: 256 for one-head CUDA-core blocks over rows of 2048+ positions (unsplit or in
       LONG_ROW_SPLIT pieces) or unsplit short ones, and for unsplit tensor-core blocks, else 128."""
    tc = tensor_cores and use_tensor_cores(batch, kv_heads, group, length, head_dim, prune)
    min_split = MIN_SPLIT_TENSOR_CORES if tc else MIN_SPLIT
    pieces = max(1, length // min_split)
    # from the most heads per block down; ends at 1 when none fills a wave
    for hpb in reversed(heads_per_block_options(group, MAX_HEADS_PER_BLOCK if tc else CUDA_CORE_MAX_HEADS_PER_BLOCK)):
        if tc:
            wave = sm_count
        else:
            wave = (RESIDENT_ONE_HEAD if hpb == 1 else RESIDENT_MULTI_HEAD) * sm_count
        if batch * kv_heads * (group // hpb) * pieces >= wave:
            break
    blocks = batch * kv_heads * (group // hpb)
    splits = wave // blocks
    split_len = 0
    if splits > 1:
        split_len = max(min_split, round_up(-(-length // splits), 64))
        if split_len >= length:
            split_len = 0
    short = not tc and hpb == 1 and splits > 1 and length <= ONE_HEAD_UNSPLIT
    if short:
        split_len = 0
    long_rows = not tc and hpb == 1 and split_len == 0 and length > ONE_HEAD_MAX_UNSPLIT
    if long_rows:
        split_len = LONG_ROW_SPLIT
    threads = 256 if long_rows or (split_len == 0 and (tc or short or (hpb == 1 and length >= 2048))) else 128
    return LaunchConfig(threads=threads, heads_per_block=hpb, split_len=split_len, tensor_cores=tc)


def length_bucket(length):
    """Lengths share a configuration within powers of two (1..128 is one bucket)."""
    return max(128, 1 << (length - 1).bit_length())


def fit_splits(config, max_len):
    """The grid of a split launch covers the whole cache (max_len), so a split length chosen
    for a short current length may give too many splits: lengthen it to stay within MAX_SPLITS."""
    if config.split_len == 0 or -(-max_len // config.split_len) <= MAX_SPLITS:
        return config
    return replace(config, split_len=round_up(-(-max_len // MAX_SPLITS), 64))
