"""Launch configurations: what the kernel's launch fields mean, and the heuristic choice.

A LaunchConfig is the part of a launch that does not change results, only speed:
  threads          threads per block (64, 128, 256; the TMA kernel adds one producer warp)
  heads_per_block  query heads that share one read of their kv head (divides the group size)
  split_len        positions per block; 0 means one block covers the whole sequence
  tensor_cores     the tensor-core (mma) kernel instead of the CUDA-core one
  tma              the bulk-copy-engine (TMA) kernel on tensor cores, compute capability 9.0+,
                   with `stages` ring stages of `tile_rows` positions (at most one of
                   tensor_cores and tma)
  pdl, cluster     the launch features of the tensor-core and TMA kernels on compute
                   capability 9.0+ (`features_apply`): programmatic dependent launch when
                   `pdl`, and split blocks in thread block clusters of `cluster` that merge
                   their partials in distributed shared memory (1: none; one of
                   `cluster_sizes()`)
Which kernel exists for which dtype, head_dim and GPU is the library's to say (`library_facts`,
`kernel_applies`). The tuner (ffa.tuner) measures these per GPU; without its cache, `heuristic`
decides.
"""

from dataclasses import asdict, dataclass, replace

from . import _lib

MAX_SPLITS = 8192  # the library's limit on ceil(max_len / split_len)


_facts = None


def library_facts():
    """What the native library says it runs (ffa_build_info in csrc/ffa_api.cu, made from the
    kernels' own constants): "head_dims", "threads", and per kernel ("cuda_cores",
    "tensor_cores", "tma") its "code", "dtypes", "head_dims", "compute_capability" and
    "max_heads_per_block"; "tma" holds the ranges of its "stages" and "tile_rows", its
    "clusters" and its "max_threads" per head_dim. Read once
    (FastForwardAttn's constructor does), then a plain global that torch.compile traces."""
    global _facts
    if _facts is None:
        _facts = _lib.build_info()
    return _facts


def head_dims():
    return tuple(library_facts()["head_dims"])


def thread_counts():
    """The threads per block a launch may have."""
    return tuple(library_facts()["threads"])


def cluster_sizes():
    """The cluster sizes a split launch of the tensor-core or TMA kernel may have (1: no cluster)."""
    return tuple(library_facts()["launch_features"]["clusters"])


def takes_features(kernel):
    """Whether launches of `kernel` ("cuda_cores", "tensor_cores", "tma") may have pdl and clusters."""
    return library_facts()["kernels"][kernel]["code"] in library_facts()["launch_features"]["kernels"]


def features_apply(kernel, capability):
    """Whether launches of `kernel` may have pdl and clusters on a GPU of compute capability
    `capability` (a (major, minor) tuple)."""
    major, minor = divmod(round(library_facts()["launch_features"]["compute_capability"] * 10), 10)
    return takes_features(kernel) and tuple(capability) >= (major, minor)


def tma_max_threads(head_dim):
    """The most threads (consumer warps' threads) a TMA launch may have at this head_dim."""
    return library_facts()["tma"]["max_threads"][str(head_dim)]


@dataclass(frozen=True)
class LaunchConfig:
    threads: int = 128
    heads_per_block: int = 1
    split_len: int = 0
    tensor_cores: bool = False
    tma: bool = False
    stages: int = 0
    tile_rows: int = 0
    pdl: bool = False
    cluster: int = 1

    @property
    def kernel(self):
        """The kernel's name in library_facts()["kernels"]."""
        return "tma" if self.tma else "tensor_cores" if self.tensor_cores else "cuda_cores"

    def as_dict(self):
        return asdict(self)

    def key(self):
        """Short text: threads/heads_per_block/split_len, then /tc for the tensor-core kernel or
        /tma<stages>x<tile_rows> for the TMA kernel (c<cluster> after either in a cluster launch),
        +pdl with programmatic dependent launch; LaunchConfig.parse reads it back."""
        kernel = "/tc" if self.tensor_cores else f"/tma{self.stages}x{self.tile_rows}" if self.tma else ""
        if self.cluster > 1:
            kernel += f"c{self.cluster}"
        return f"{self.threads}/{self.heads_per_block}/{self.split_len}{kernel}{'+pdl' if self.pdl else ''}"

    @classmethod
    def parse(cls, text):
        fields, pdl = text.removesuffix("+pdl").split("/"), text.endswith("+pdl")
        threads, hpb, split = map(int, fields[:3])
        kernel = fields[3] if len(fields) > 3 else ""
        cluster = 1
        if kernel[-1:].isdigit() and "c" in kernel:  # c<cluster> after the kernel's own text
            kernel, _, size = kernel.rpartition("c")
            cluster = int(size)
        if kernel.startswith("tma"):
            stages, rows = map(int, kernel[3:].split("x"))
            return cls(threads, hpb, split, tma=True, stages=stages, tile_rows=rows, pdl=pdl, cluster=cluster)
        return cls(threads, hpb, split, tensor_cores=kernel == "tc", pdl=pdl, cluster=cluster)

    def fields(self):
        """The configuration as a list of ints (the custom op's argument); from_fields inverts it."""
        return [self.threads, self.heads_per_block, self.split_len, int(self.tensor_cores), int(self.tma),
                self.stages, self.tile_rows, int(self.pdl), self.cluster]

    @classmethod
    def from_fields(cls, fields):
        t, h, s, tc, tma, stages, rows, pdl, cluster = fields
        return cls(t, h, s, bool(tc), bool(tma), stages, rows, bool(pdl), cluster)


def max_heads_per_block(kernel="tensor_cores"):
    """The most query heads one block of `kernel` holds."""
    return library_facts()["kernels"][kernel]["max_heads_per_block"]


def kernel_applies(kernel, dtype, head_dim, capability):
    """Whether the library has `kernel` ("cuda_cores", "tensor_cores", "tma") for this dtype and
    head_dim on a GPU of compute capability `capability` (a (major, minor) tuple)."""
    facts = library_facts()["kernels"][kernel]
    major, minor = divmod(round(facts["compute_capability"] * 10), 10)
    return (str(dtype).removeprefix("torch.") in facts["dtypes"] and head_dim in facts["head_dims"]
            and tuple(capability) >= (major, minor))


def tensor_cores_apply(dtype, head_dim, capability):
    return kernel_applies("tensor_cores", dtype, head_dim, capability)


def tma_applies(dtype, head_dim, capability):
    return kernel_applies("tma", dtype, head_dim, capability)


def heads_per_block_options(group, most=None):
    """The divisors of the group size up to `most` (default: what a tensor-core block holds; a
    block's heads share one kv head)."""
    most = max_heads_per_block() if most is None else most
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
# Tensor-core blocks want about one multi-head block per SM, and splits of at least 512 positions (a
# warp streams 16-position tiles through a 3-stage ring, and the pipeline needs a run of tiles).
MIN_SPLIT_TENSOR_CORES = 512
# Where the tensor-core kernel is the faster one off Hopper (measured on the H100:
# bench/results/h100/kernel-tensor-cores-h100.md): always for groups of 5-8 heads (it shares each K/V
# read among up to 8 heads where the CUDA-core kernel stops at 4); for groups of 2-4 heads on caches
# up to TENSOR_CORES_MAX_BYTES; never for one head (on tiny caches it wins with a cold L2 only, and
# loses where the cache stays in L2, as in the original FFA release's protocol). Where the TMA kernel
# applies (Hopper), the rule over TMA_MIN_BYTES is hopper_kernel's.
TENSOR_CORES_MAX_BYTES = 128 << 20
# Short caches at small batch, whose grid does not fill a wave even in MIN_SPLIT_TENSOR_CORES pieces,
# take tensor-core pieces of SHORT_SPLIT_TENSOR_CORES positions, and a grid within 1/16 of a wave counts
# as filling it (at batch 1 and 1,024 positions: 2-head blocks in 8 pieces, 128 blocks on 132 SMs,
# beat 1-head blocks by 5-13%; bench/results/candidates-h200.md). So do grids whose blocks hold a whole
# group (up to 8 heads) and fill a wave in such pieces where 512-position pieces would need fewer heads
# per block, on Hopper: each K/V row is then read once, not once per block of the group (groups of 8 on 8 MB
# caches, batch x kv_heads 8-32: 8-head blocks in 256-position pieces, the tuned launch at 6 of the
# default grid's 8 such buckets and 1.07-1.28x faster than the 2-head blocks in long pieces the
# heuristic took before; the other 2, head_dim 128 at batch x kv_heads 32, have no time for it:
# bench/results/tuner-cache-h200.json, 92441a1).
SHORT_SPLIT_TENSOR_CORES = 128
# One-head CUDA-core blocks do not split caches this short: one 256-thread block per head (the
# default launch's shape) beats 64-position splits and their combine.
ONE_HEAD_UNSPLIT = 256
# Nor do they run unsplit over longer rows than this, even when the grid fills the GPU without
# splits: pieces of LONG_ROW_SPLIT positions shorten the last wave's tail (measured:
# bench/results/h100/kernel-targets-h100.md).
ONE_HEAD_MAX_UNSPLIT = 4096
LONG_ROW_SPLIT = 2048
# One-head tensor-core blocks (Hopper) take pieces of at most LONG_ROW_SPLIT positions (4096-position
# pieces were as fast in one run and 1.12x slower in another: bench/results/candidates-h200.md). A group
# of several heads is split into one-head tensor-core blocks only where they make ONE_HEAD_TC_WAVES blocks
# per SM; else it keeps its shared reads in pieces of SHORT_SPLIT_TENSOR_CORES (groups of 4 over 1,024 to
# 4,096 positions at batch x kv_heads 8-32: 4-head blocks in 16 pieces 1.00-1.05x the tuned launch, one-head
# blocks 1.46-1.66x: tuner-cache-h200.json's heuristic times at cd8d099, tuner-sweep-h200.log at 8671e73).
ONE_HEAD_TC_WAVES = 2


def kv_bytes(batch, kv_heads, length, head_dim):
    """K+V bytes of a 16-bit cache."""
    return 2 * batch * kv_heads * length * head_dim * 2


def use_tensor_cores(batch, kv_heads, group, length, head_dim, prune=False):
    """Whether the heuristic picks the tensor-core kernel off Hopper (fp16/bf16 bytes); `prune`:
    p > 0, where only tensor-core blocks of several heads skip V reads to any gain
    (bench/results/h100/kernel-tensor-cores-h100.md)."""
    if largest_heads_per_block(group) > heads_per_block_options(group, CUDA_CORE_MAX_HEADS_PER_BLOCK)[-1]:
        return True
    if prune and group >= 2:
        return True
    return group >= 2 and kv_bytes(batch, kv_heads, length, head_dim) <= TENSOR_CORES_MAX_BYTES


# The TMA kernel's launch without a tuner entry: a ring of 2 stages of 128 positions (64 at head_dim
# 256), one consumer warp per 32-row step of a tile and m-tile of 16 heads (64 to 256 threads; at most
# 128 at head_dim 256), and splits of whole tiles that fill one wave of blocks (two per SM where two
# rings fit an SM's shared memory and a block has at most 128 consumer threads, else one: 256-thread
# blocks of 32 heads run one per SM, bench/results/candidates-h200.md). Measured against 48 rings x
# threads x splits on 6 shapes: bench/results/kernel-tma-launches-h200.md; the tuned launches are in
# bench/results/tuner-cache-h200.json.
TMA_STAGES, TMA_STEP_ROWS, TMA_SHARED_BYTES = 2, 32, 227 << 10
# Which kernel a Hopper GPU runs for p = 0 (hopper_kernel): the tensor-core kernel wherever it applies,
# one head included (in the H200's tuner sweeps it is the tuned kernel in 200 of the default grid's 208
# buckets at cd8d099 and in all 208 at 92441a1, the TMA kernel in the rest, never the CUDA-core one:
# bench/results/tuner-sweep-h200.log),
# except for groups larger than one tensor-core block holds (8 heads) over TMA_MIN_BYTES of K+V on a
# large grid: the tensor-core kernel reads each K/V row group / 8 times, once per 8-head block, and from
# batch x kv_heads x (group / 8)^2 >= TMA_MIN_BLOCK_READS on (16 heads from batch x kv_heads 128, 32
# heads from 32) the TMA kernel, which holds the whole group in one block and reads each row once, is
# faster. Without tensor cores (head_dim 256) the TMA kernel takes every cache over TMA_MIN_BYTES, the
# CUDA-core kernel the rest (bench/results/candidates-h200.md).
TMA_MIN_BYTES = 32 << 20
TMA_MIN_BLOCK_READS = 512
# Over TMA_MIN_BYTES a tensor-core wave holds enough blocks per SM for this many bytes of K and V in
# flight (tensor_core_blocks_per_sm): two one-head blocks of 128 threads at head_dim 64, one block
# otherwise (at batch 1 over 16,384 positions, 8 pieces per head beat 4 by 1.17x at head_dim 64; at
# head_dim 128 4 pieces were as fast as 8 or faster: bench/results/candidates-h200.md).
TC_BYTES_IN_FLIGHT_PER_SM = 64 << 10
# Split TMA launches whose blocks hold at least TMA_CLUSTER_MIN_ELEMENTS output elements (heads per
# block x head_dim) run in clusters of 2: each block's partial is that large, and merging them in
# pairs through distributed shared memory halves the rows the last cluster merges and shares that
# merge between two blocks. Larger clusters do not all fit the GPU at once when each block needs a
# whole SM (bench/results/kernel-tma-cluster-h200.md).
TMA_CLUSTER, TMA_CLUSTER_MIN_ELEMENTS = 2, 512
# On Hopper, tensor-core launches over caches of at most TC_PDL_MAX_BYTES of K+V take programmatic
# dependent launch: there the kernel's launch and set-up are a large part of its time, and overlapping
# them with the previous kernel's tail pays where that kernel is FFA's (in the layer rotation: 0.95x the
# time on the 24 such launches timed both ways, none slower than 1.01x; over 32 MB 1.00x:
# bench/results/candidates-features-h200.json). After another kernel it neither pays nor costs (within
# 0.6%: bench/results/kernel-bench-h200.md, the pdl section).
TC_PDL_MAX_BYTES = 32 << 20


def hopper_kernel(batch, kv_heads, group, length, head_dim, tensor_cores):
    """The kernel ("tma", "tensor_cores" or None: the CUDA-core kernel) for a p = 0 step where the
    TMA kernel applies; `tensor_cores`: whether the tensor-core kernel applies."""
    big = kv_bytes(batch, kv_heads, length, head_dim) > TMA_MIN_BYTES
    if not tensor_cores:
        return "tma" if big else None
    reads = group // largest_heads_per_block(group)
    return "tma" if big and reads > 1 and batch * kv_heads * reads * reads >= TMA_MIN_BLOCK_READS else "tensor_cores"


def tensor_core_threads(heads_per_block):
    """Threads of the heuristic's tensor-core block (rule 4 of heuristic)."""
    return 256 if heads_per_block > 1 else 128


def tensor_core_blocks_per_sm(threads, head_dim):
    """Tensor-core blocks of `threads` per SM in a wave over a cache of more than TMA_MIN_BYTES: enough
    for TC_BYTES_IN_FLIGHT_PER_SM of K and V in flight (each warp keeps the library's
    rows_in_flight_per_warp positions in flight), at least one."""
    rows = library_facts()["tensor_cores"]["rows_in_flight_per_warp"]
    return max(1, TC_BYTES_IN_FLIGHT_PER_SM // (threads // 32 * rows * head_dim * 2 * 2))


def tma_ring(head_dim):
    """(stages, tile_rows) of the heuristic's TMA launch."""
    return TMA_STAGES, 128 if head_dim <= 128 else 64


def heuristic_tma(batch, kv_heads, group, length, sm_count, head_dim):
    """The TMA kernel's launch: the whole group in one block (up to max_heads_per_block("tma")
    heads), splits of whole tiles that fill one wave, clusters of TMA_CLUSTER for large partials."""
    hpb = heads_per_block_options(group, max_heads_per_block("tma"))[-1]
    stages, rows = tma_ring(head_dim)
    threads = min(tma_max_threads(head_dim), max(64, rows // TMA_STEP_ROWS * -(-hpb // 16) * 32))
    resident = 2 if 2 * stages * 2 * rows * head_dim * 2 < TMA_SHARED_BYTES and threads <= 128 else 1
    blocks = batch * kv_heads * (group // hpb)
    splits = (resident * sm_count) // blocks
    split_len = 0
    if splits > 1:
        split_len = round_up(-(-length // splits), rows)
        if split_len >= length:
            split_len = 0
    cluster = TMA_CLUSTER if split_len and hpb * head_dim >= TMA_CLUSTER_MIN_ELEMENTS else 1
    return LaunchConfig(threads=threads, heads_per_block=hpb, split_len=split_len, tma=True, stages=stages,
                        tile_rows=rows, pdl=True, cluster=cluster)


def heuristic(batch, kv_heads, group, length, sm_count, head_dim=128, tensor_cores=False, prune=False, tma=False):
    """Fill one wave of the GPU and no more. `tma`: whether the TMA kernel applies (tma_applies);
    for steps with p = 0 hopper_kernel then picks the kernel (heuristic_tma's launch for the TMA
    one). `tensor_cores`: whether the tensor-core kernel applies (tensor_cores_apply); off Hopper it
    is used where use_tensor_cores says it is faster (`prune`: for a step with p > 0).
    1. Heads per block: the largest divisor of the group (at most 4 on CUDA cores, 8 on tensor
       cores) whose grid, split into pieces of the smallest split length (MIN_SPLIT, or
       MIN_SPLIT_TENSOR_CORES), still fills a wave (RESIDENT_* blocks per SM on CUDA cores, one on
       tensor cores, or tensor_core_blocks_per_sm over TMA_MIN_BYTES); small caches thus trade
       shared K/V reads (they come from L2 anyway) for more, shorter blocks; one-head tensor-core
       blocks of a larger group must make ONE_HEAD_TC_WAVES blocks per SM. Tensor-core grids that
       fill no wave so take SHORT_SPLIT_TENSOR_CORES pieces, and 15/16 of a wave counts as full; so
       do, for p = 0 on Hopper (`tma`), blocks of a whole group that fill a wave in such pieces where
       512-position ones would need fewer heads per block.
    2. Splits: floor(wave / blocks) pieces of at least the smallest split length; rounding down
       matters: a second, partial wave of blocks costs more than the parallelism it adds.
    3. One-head CUDA-core blocks: rows of at most ONE_HEAD_UNSPLIT positions are never split,
       rows of more than ONE_HEAD_MAX_UNSPLIT always (LONG_ROW_SPLIT positions per piece).
       One-head tensor-core pieces are at most LONG_ROW_SPLIT positions.
    4. Threads: 256 for multi-head tensor-core blocks, split or not (faster than 128 at every launch
       timed both ways: bench/results/candidates-h200.md), 128 for one-head ones, and for CUDA-core
       blocks 256 where they have one head over rows of 2048+ positions (unsplit or in LONG_ROW_SPLIT
       pieces) or are unsplit short ones, else 128.
    5. Programmatic dependent launch: p = 0 tensor-core launches on Hopper (`tma`) over at most
       TC_PDL_MAX_BYTES; the TMA launch always (heuristic_tma)."""
    kernel = hopper_kernel(batch, kv_heads, group, length, head_dim, tensor_cores) if tma and not prune else None
    if kernel == "tma":
        return heuristic_tma(batch, kv_heads, group, length, sm_count, head_dim)
    tc = kernel == "tensor_cores" or (tensor_cores and use_tensor_cores(batch, kv_heads, group, length, head_dim,
                                                                          prune))
    options = list(reversed(heads_per_block_options(group, max_heads_per_block() if tc else
                                                    CUDA_CORE_MAX_HEADS_PER_BLOCK)))

    cache_bytes = kv_bytes(batch, kv_heads, length, head_dim)
    big = cache_bytes > TMA_MIN_BYTES

    def wave(hpb):
        if tc:
            return sm_count * (tensor_core_blocks_per_sm(tensor_core_threads(hpb), head_dim) if big else 1)
        return (RESIDENT_ONE_HEAD if hpb == 1 else RESIDENT_MULTI_HEAD) * sm_count

    def fills(hpb, min_split, fraction=1.0):
        # one-head tensor-core blocks take the place of a group's shared reads only where they make two
        # blocks per SM (ONE_HEAD_TC_WAVES)
        need = max(wave(hpb), ONE_HEAD_TC_WAVES * sm_count) if tc and hpb == 1 and group > 1 else wave(hpb)
        return batch * kv_heads * (group // hpb) * max(1, length // min_split) >= fraction * need

    min_split = MIN_SPLIT_TENSOR_CORES if tc else MIN_SPLIT
    # from the most heads per block down; ends at 1 when none fills a wave
    hpb = next((h for h in options if fills(h, min_split)), 1)
    short_hpb = next((h for h in options if fills(h, SHORT_SPLIT_TENSOR_CORES, 15 / 16)), 1)  # in short pieces
    if tc and (not fills(hpb, min_split) or (kernel == "tensor_cores" and short_hpb == group > hpb)):
        min_split, hpb = SHORT_SPLIT_TENSOR_CORES, short_hpb
    blocks = batch * kv_heads * (group // hpb)
    splits = wave(hpb) // blocks
    split_len = 0
    if splits > 1:
        split_len = max(min_split, round_up(-(-length // splits), 64))
        if tc and hpb == 1:
            split_len = min(split_len, LONG_ROW_SPLIT)
        if split_len >= length:
            split_len = 0
    short = not tc and hpb == 1 and splits > 1 and length <= ONE_HEAD_UNSPLIT
    if short:
        split_len = 0
    long_rows = not tc and hpb == 1 and split_len == 0 and length > ONE_HEAD_MAX_UNSPLIT
    if long_rows:
        split_len = LONG_ROW_SPLIT
    if tc:
        threads = tensor_core_threads(hpb)
    else:
        threads = 256 if long_rows or (split_len == 0 and (short or (hpb == 1 and length >= 2048))) else 128
    pdl = kernel == "tensor_cores" and cache_bytes <= TC_PDL_MAX_BYTES
    return LaunchConfig(threads=threads, heads_per_block=hpb, split_len=split_len, tensor_cores=tc, pdl=pdl)


def length_bucket(length):
    """Lengths share a configuration within powers of two (1..128 is one bucket)."""
    return max(128, 1 << (length - 1).bit_length())


def fit_splits(config, max_len):
    """The grid of a split launch covers the whole cache (max_len), so a split length chosen
    for a short current length may give too many splits: lengthen it to stay within MAX_SPLITS."""
    if config.split_len == 0 or -(-max_len // config.split_len) <= MAX_SPLITS:
        return config
    return replace(config, split_len=round_up(-(-max_len // MAX_SPLITS), 64))
