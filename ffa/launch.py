"""Launch configurations: what the kernel's launch fields mean, and the heuristic choice.

A LaunchConfig is the part of a launch that does not change results, only speed:
  threads          threads per block (64, 128, 256)
  heads_per_block  query heads that share one read of their kv head (divides the group size)
  split_len        positions per block; 0 means one block covers the whole sequence
The tuner (ffa.tuner) measures these per GPU; without its cache, `heuristic` decides.
"""

from dataclasses import asdict, dataclass, replace

MAX_HEADS_PER_BLOCK = 8
MAX_SPLITS = 8192  # the library's limit on ceil(max_len / split_len)
THREADS = (64, 128, 256)


@dataclass(frozen=True)
class LaunchConfig:
    threads: int = 128
    heads_per_block: int = 1
    split_len: int = 0

    def as_dict(self):
        return asdict(self)


def largest_heads_per_block(group):
    """The largest divisor of the group size that one block can hold."""
    return max(d for d in range(1, min(group, MAX_HEADS_PER_BLOCK) + 1) if group % d == 0)


def default_launch():
    """FasterTransformer's shape: one 256-thread block per (batch, query head), no split."""
    return LaunchConfig(threads=256, heads_per_block=1, split_len=0)


def round_up(x, m):
    return (x + m - 1) // m * m


def heuristic(batch, kv_heads, group, length, sm_count):
    """Share K/V reads across the whole group, then split the sequence until the grid has
    about four blocks per multiprocessor, keeping splits at least 128 positions long. Unsplit
    one-head blocks stream long rows and take 256 threads (measured faster on an H100); the
    rest take 128, which keeps more blocks resident."""
    hpb = largest_heads_per_block(group)
    blocks = batch * kv_heads * (group // hpb)
    target = 4 * sm_count
    split_len = 0
    if 0 < blocks < target and length > 128:
        splits = -(-target // blocks)
        split_len = max(128, round_up(-(-length // splits), 64))
        if split_len >= length:
            split_len = 0
    threads = 256 if split_len == 0 and hpb == 1 else 128
    return LaunchConfig(threads=threads, heads_per_block=hpb, split_len=split_len)


def length_bucket(length):
    """Lengths share a configuration within powers of two (1..128 is one bucket)."""
    bucket = 128
    while bucket < length:
        bucket *= 2
    return bucket


def fit_splits(config, max_len):
    """The grid of a split launch covers the whole cache (max_len), so a split length chosen
    for a short current length may give too many splits: lengthen it to stay within MAX_SPLITS."""
    if config.split_len == 0 or -(-max_len // config.split_len) <= MAX_SPLITS:
        return config
    return replace(config, split_len=round_up(-(-max_len // MAX_SPLITS), 64))
