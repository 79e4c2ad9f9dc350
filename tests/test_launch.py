"""The launch heuristic (ffa.launch.heuristic): its invariants over a grid of shapes, the
choices the H100 measurements behind it picked (bench/results/h100/kernel-targets-h100.md), and the
length FastForwardAttn hands it."""

import itertools

import pytest
import torch

from ffa import FastForwardAttn, LaunchConfig
from ffa.launch import (CUDA_CORE_MAX_HEADS_PER_BLOCK, LONG_ROW_SPLIT, MIN_SPLIT, MIN_SPLIT_TENSOR_CORES,
                        ONE_HEAD_MAX_UNSPLIT, RESIDENT_MULTI_HEAD, RESIDENT_ONE_HEAD,
                        SHORT_SPLIT_TENSOR_CORES, TENSOR_CORES_MAX_BYTES, TMA_MIN_BYTES, heuristic, heuristic_tma,
                        hopper_kernel, largest_heads_per_block)

SHAPES = list(itertools.product((1, 2, 5, 16, 128), (1, 4, 32), (1, 2, 3, 4, 6, 8), (64, 1000, 4096, 65536),
                                (1, 8, 132)))


def grid_blocks(batch, kv_heads, group, length, config):
    splits = -(-length // config.split_len) if config.split_len else 1
    return batch * kv_heads * (group // config.heads_per_block) * splits


def wave(config, sm_count):
    return (RESIDENT_ONE_HEAD if config.heads_per_block == 1 else RESIDENT_MULTI_HEAD) * sm_count


def test_valid_configs_that_fill_at_most_one_wave():
    for batch, kv_heads, group, length, sms in SHAPES:
        c = heuristic(batch, kv_heads, group, length, sms)
        assert group % c.heads_per_block == 0 and c.heads_per_block <= CUDA_CORE_MAX_HEADS_PER_BLOCK
        assert c.threads in (128, 256)
        assert c.split_len == 0 or (c.split_len % 64 == 0 and MIN_SPLIT <= c.split_len < length)
        blocks = grid_blocks(batch, kv_heads, group, length, c)
        if c.heads_per_block == 1 and length > ONE_HEAD_MAX_UNSPLIT:  # long one-head rows: always split
            assert c.split_len and (c.split_len == LONG_ROW_SPLIT or blocks <= wave(c, sms)), c
        elif c.split_len:  # a split is only ever there to fill the wave, never to overfill it
            assert blocks <= wave(c, sms), (batch, kv_heads, group, length, sms, c)
            assert 2 * blocks > wave(c, sms) or c.split_len == MIN_SPLIT, (batch, kv_heads, group, length, sms, c)


def test_fewer_heads_per_block_only_when_the_cache_is_too_small_for_a_wave():
    for batch, kv_heads, group, length, sms in SHAPES:
        c = heuristic(batch, kv_heads, group, length, sms)
        largest = max(h for h in range(1, CUDA_CORE_MAX_HEADS_PER_BLOCK + 1) if group % h == 0)
        if c.heads_per_block < largest:
            pieces = max(1, length // MIN_SPLIT)
            assert batch * kv_heads * (group // largest) * pieces < RESIDENT_MULTI_HEAD * sms


def test_choices_measured_on_an_h100():
    h100 = 132
    # batch 1, 8 kv heads of 4, 1k context: one-head 64-position blocks (1.7x faster than 4-head 128)
    assert heuristic(1, 8, 4, 1024, h100) == LaunchConfig(128, 1, 64)
    # batch 16 x 32 heads, 1k: 512 blocks already fill the wave; a split would start a second one
    assert heuristic(16, 32, 1, 1024, h100) == LaunchConfig(128, 1, 0)
    # batch 32 x 8 kv heads of 4, 4k: 2 splits (3 spilled a partial second wave)
    assert heuristic(32, 8, 4, 4096, h100) == LaunchConfig(128, 4, 2048)
    # group of 8 shares reads 4 heads at a time
    assert heuristic(8, 4, 8, 1152, h100).heads_per_block == 4
    # long unsplit rows take 256 threads
    assert heuristic(128, 32, 1, 2048, h100) == LaunchConfig(256, 1, 0)
    # longer ones than 4096 positions are split in pieces of 2048 even when the grid fills the GPU
    assert heuristic(64, 32, 1, 8192, h100) == LaunchConfig(256, 1, 2048)
    assert heuristic(32, 32, 1, 4096, h100) == LaunchConfig(256, 1, 0)
    # one-head caches of up to 256 positions are not split: the default launch's shape (faster
    # than 64-position splits in the original FFA release's protocol at x = 256)
    assert heuristic(1, 32, 1, 256, h100) == heuristic(4, 32, 1, 200, h100) == LaunchConfig(256, 1, 0)
    assert heuristic(16, 32, 1, 256, h100) == LaunchConfig(128, 1, 0)  # 512 blocks: no split anyway
    assert heuristic(1, 32, 1, 512, h100).split_len == 64


def test_tensor_core_choices():
    """With tensor cores available the heuristic uses them where the H100 measured them faster
    (bench/results/h100/kernel-tensor-cores-h100.md), with about one block per SM (two of one head), splits of at least
    MIN_SPLIT_TENSOR_CORES positions (SHORT_SPLIT_TENSOR_CORES where even those fill no wave), 256
    threads for blocks of several heads; never where they do not apply."""
    for batch, kv_heads, group, length, sms in SHAPES:
        for head_dim in (64, 128):
            c = heuristic(batch, kv_heads, group, length, sms, head_dim, tensor_cores=True)
            assert c == heuristic(batch, kv_heads, group, length, sms) or c.tensor_cores
            if not c.tensor_cores:
                continue
            kv_bytes = 2 * batch * kv_heads * length * head_dim * 2
            assert largest_heads_per_block(group) > 4 or (group > 1 and kv_bytes <= TENSOR_CORES_MAX_BYTES)
            short = batch * kv_heads * group * max(1, length // MIN_SPLIT_TENSOR_CORES) < 2 * sms
            assert c.split_len == 0 or (c.split_len < length and grid_blocks(batch, kv_heads, group, length, c)
                                        <= sms * (2 if c.heads_per_block == 1 else 1)
                                        and c.split_len >= (SHORT_SPLIT_TENSOR_CORES if short else
                                                            MIN_SPLIT_TENSOR_CORES)), c
            assert c.threads == (256 if c.heads_per_block > 1 else 128)
            assert not heuristic(batch, kv_heads, group, length, sms, head_dim, tensor_cores=False).tensor_cores
    h100 = 132
    # a group of 8 reads K/V once for all 8 heads, on tensor cores (faster than 4-head CUDA-core blocks)
    assert heuristic(32, 4, 8, 4096, h100, 128, True) == LaunchConfig(256, 8, 0, True)
    # groups of 4 on a 1 GB cache stay on CUDA cores (the tensor-core kernel is slower there)
    assert heuristic(64, 8, 4, 8192, h100, 128, True) == heuristic(64, 8, 4, 8192, h100)
    # one head per kv head: CUDA cores (tiny caches too: faster on tensor cores with a cold L2
    # only, slower in the original FFA release's protocol, where the cache stays in L2)
    assert heuristic(8, 32, 1, 4096, h100, 64, True) == heuristic(8, 32, 1, 4096, h100)
    assert heuristic(1, 32, 1, 256, h100, 64, True) == heuristic(1, 32, 1, 256, h100)
    # batch 1, 8 kv heads of 4 over 64k positions: 16 splits of 4096 (128 blocks)
    assert heuristic(1, 8, 4, 65536, h100, 64, True) == LaunchConfig(256, 4, 4096, True)


def test_attention_asks_for_the_bucket_but_never_beyond_the_cache():
    K = torch.zeros(10, 32, 1000, 32)
    f = FastForwardAttn(K, K, 1128)
    f._sm_count = 132  # as on an H100; the CPU path runs the reference whatever the launch
    # t = 1100 is in the 2048 bucket, but no sequence of this cache is longer than 1128
    assert f.launch_config(32, 1101) == heuristic(10, 32, 1, 1128, 132) == LaunchConfig(128, 1, 576)
    assert heuristic(10, 32, 1, 2048, 132).split_len == 1024  # 1024 + 104: two uneven blocks


def test_pruning_steps_of_grouped_heads_take_tensor_cores():
    """p > 0 skips V reads to any gain only in tensor-core blocks of several heads (CUDA-core
    blocks of 2-4 heads are bound by instructions, bench/results/h100/kernel-tensor-cores-h100.md):
    FastForwardAttn picks the heuristic's tensor-core launch for such steps, even past the
    cache size where p = 0 stays on CUDA cores, and keeps one-head groups as they are."""
    h100 = 132
    exact = heuristic(32, 8, 4, 8192, h100, 128, True)
    pruned = heuristic(32, 8, 4, 8192, h100, 128, True, prune=True)
    assert not exact.tensor_cores and pruned.tensor_cores and pruned.heads_per_block == 4
    assert heuristic(8, 32, 1, 16384, h100, 128, True, prune=True) == heuristic(8, 32, 1, 16384, h100)
    assert not heuristic(32, 8, 4, 8192, h100, 128, False, prune=True).tensor_cores

    K = torch.zeros(32, 8, 8191, 128, dtype=torch.float16)
    f = FastForwardAttn(K, K, 8192)
    f._sm_count, f._tensor_cores = h100, True  # as on an H100 (the CPU path ignores the launch)
    assert f.launch_config(32, 8192) == exact
    assert f.launch_config(32, 8192, prune=True) == pruned
    assert f.prepare(32, p=1e-3) == pruned and f.prepare(32) == exact
    f._tensor_cores = False
    assert f.launch_config(8, 8192, prune=True) == f.launch_config(8, 8192)  # no tensor cores: as for p = 0


@pytest.mark.parametrize("tma,tensor_cores", [(True, True), (False, True), (False, False)])
def test_heuristic_traces_under_torch_compile(tma, tensor_cores):
    """FastForwardAttn.attention picks its launch while torch.compile traces it (fullgraph): the
    heuristic, and the library facts it reads, must trace without a graph break."""
    def scaled(x):
        c = heuristic(1, 8, 4, 4096, 132, 128, tensor_cores, tma=tma)
        return x * (c.threads + c.heads_per_block + c.split_len + c.stages + c.tile_rows)

    expected = heuristic(1, 8, 4, 4096, 132, 128, tensor_cores, tma=tma)
    total = expected.threads + expected.heads_per_block + expected.split_len + expected.stages + expected.tile_rows
    out = torch.compile(scaled, fullgraph=True, backend="eager")(torch.ones(2))
    assert torch.equal(out, torch.full((2,), float(total)))


@pytest.mark.parametrize("config", [LaunchConfig(), LaunchConfig(64, 2, 128, tensor_cores=True),
                                    LaunchConfig(256, 32, 4096, tma=True, stages=3, tile_rows=64, pdl=True),
                                    LaunchConfig(128, 4, 0, tma=True, stages=2, tile_rows=128),
                                    LaunchConfig(128, 16, 1024, tma=True, stages=2, tile_rows=128, pdl=True, cluster=8),
                                    LaunchConfig(128, 1, 256, tensor_cores=True, cluster=4),
                                    LaunchConfig(256, 8, 512, tensor_cores=True, pdl=True, cluster=2)])
def test_launch_key_and_fields_round_trip(config):
    """The short form (tuner output, benchmark JSON) and the custom op's int list both give the
    launch back; the key names the kernel and its ring."""
    assert LaunchConfig.parse(config.key()) == config
    assert LaunchConfig.from_fields(config.fields()) == config
    assert ("/tma" in config.key()) == config.tma and ("/tc" in config.key()) == config.tensor_cores
    assert (f"c{config.cluster}" in config.key()) == (config.cluster > 1)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_hopper_kernel_choice(head_dim):
    """Where the TMA kernel applies (Hopper), p = 0 steps take the tensor-core kernel wherever it
    applies, one head included, except larger groups than a tensor-core block holds on large grids
    over TMA_MIN_BYTES of K+V (the TMA kernel); without tensor cores (head_dim 256) the TMA kernel
    over TMA_MIN_BYTES and the CUDA-core one at or below it; pruning steps keep the off-Hopper
    choice (bench/results/candidates-h200.md, bench/results/tuner-cache-h200.json)."""
    tc = head_dim != 256
    for group, kv_heads in ((1, 32), (4, 8), (8, 4)):
        at_threshold = TMA_MIN_BYTES // (2 * kv_heads * head_dim * 2)  # positions of a batch-1 cache of that size
        for length in (1024, at_threshold, 2 * at_threshold):
            c = heuristic(1, kv_heads, group, length, 132, head_dim, tc, tma=True)
            if tc:
                assert c.tensor_cores and c.heads_per_block <= group, c
            elif length > at_threshold:
                assert c.tma and c.pdl and c.heads_per_block == group
                assert c.tile_rows == 64 and c.split_len % c.tile_rows == 0 and c.threads <= 128
            else:
                assert c == heuristic(1, kv_heads, group, length, 132, head_dim), c
            pruning = heuristic(1, kv_heads, group, length, 132, head_dim, tc, prune=True, tma=True)
            assert pruning == heuristic(1, kv_heads, group, length, 132, head_dim, tc, prune=True)
            assert not heuristic(1, kv_heads, group, length, 132, head_dim, tc, tma=False).tma
    if tc:
        # groups of 16 and 32: TMA from batch x kv_heads 128 (16 heads) and 32 (32 heads) on, over 32 MB
        assert hopper_kernel(64, 2, 16, 8192, head_dim, True) == "tma"
        assert hopper_kernel(32, 2, 16, 4096, head_dim, True) == "tensor_cores"
        assert hopper_kernel(32, 1, 32, 8192, head_dim, True) == "tma"
        assert hopper_kernel(16, 1, 32, 16384, head_dim, True) == "tensor_cores"
        assert hopper_kernel(128, 2, 16, 64, head_dim, True) == "tensor_cores"  # 4 MB: under the threshold


def test_hopper_one_head_tensor_core_launch():
    """One-head tensor-core blocks (Hopper): 128 threads; over TMA_MIN_BYTES enough blocks per SM for
    TC_BYTES_IN_FLIGHT_PER_SM in flight (two at head_dim 64, one at 128), in pieces of at most
    LONG_ROW_SPLIT positions; below it one block per SM (bench/results/candidates-h200.md)."""
    from ffa.launch import tensor_core_blocks_per_sm
    assert [tensor_core_blocks_per_sm(128, 64), tensor_core_blocks_per_sm(128, 128)] == [2, 1]
    assert tensor_core_blocks_per_sm(256, 64) == tensor_core_blocks_per_sm(256, 128) == 1
    assert heuristic(1, 32, 1, 16384, 132, 64, True, tma=True) == LaunchConfig(128, 1, 2048, True)  # 256 blocks
    assert heuristic(1, 32, 1, 65536, 132, 128, True, tma=True) == LaunchConfig(128, 1, LONG_ROW_SPLIT, True)
    assert heuristic(8, 32, 1, 4096, 132, 128, True, tma=True) == LaunchConfig(128, 1, 0, True)
    assert heuristic(1, 32, 1, 1024, 132, 64, True, tma=True) == LaunchConfig(128, 1, 256, True, pdl=True)  # 128 blocks
    assert heuristic(4, 8, 1, 4096, 132, 128, True, tma=True) == LaunchConfig(128, 1, 1024, True)


def test_short_caches_take_short_tensor_core_splits():
    """At batch 1 over 1,024 positions no grid of 512-position pieces fills a wave: 2-head blocks in
    8 pieces of SHORT_SPLIT_TENSOR_CORES (128 blocks, within 1/16 of 132 SMs), while batch 16 runs
    4-head blocks unsplit (bench/results/candidates-h200.md)."""
    assert heuristic(1, 2, 16, 1024, 132, 128, True, tma=True) == LaunchConfig(256, 2, SHORT_SPLIT_TENSOR_CORES, True,
                                                                            pdl=True)
    assert heuristic(1, 8, 4, 1024, 132, 64, True) == LaunchConfig(256, 2, SHORT_SPLIT_TENSOR_CORES, True)
    assert heuristic(16, 2, 16, 1024, 132, 128, True, tma=True) == LaunchConfig(256, 4, 0, True, pdl=True)


def test_whole_group_blocks_take_short_pieces():
    """Groups of 8 on 8 MB caches (batch x kv_heads 8-32): 8-head blocks in 256-position pieces, not
    2-head blocks in long pieces, where a whole-group block fills a wave only in short pieces
    (bench/results/tuner-cache-h200.json); a group larger than a block holds keeps its choice."""
    for batch, length in ((1, 4096), (4, 1024)):
        for head_dim in (64, 128):
            assert heuristic(batch, 8, 8, length, 132, head_dim, True, tma=True) == LaunchConfig(
                256, 8, 2 * SHORT_SPLIT_TENSOR_CORES, True, pdl=True)
    assert heuristic(16, 2, 16, 1024, 132, 128, True, tma=True).heads_per_block == 4  # unsplit 4-head blocks


def test_groups_keep_their_shared_reads_on_tensor_cores():
    """A group of several heads becomes one-head tensor-core blocks only where they make
    ONE_HEAD_TC_WAVES blocks per SM: groups of 4 over 1,024-4,096 positions at batch x kv_heads 8-32
    keep 4-head blocks in short pieces (bench/results/tuner-cache-h200.json)."""
    from ffa.launch import ONE_HEAD_TC_WAVES
    for batch, length in ((1, 4096), (4, 1024)):
        for tma in (False, True):
            c = heuristic(batch, 8, 4, length, 132, 64, True, tma=tma)
            assert c == LaunchConfig(256, 4, 2 * SHORT_SPLIT_TENSOR_CORES, True, pdl=tma), c
    # 8 x 4 one-head blocks in 8 pieces of 512 (256) fill one wave but not ONE_HEAD_TC_WAVES
    assert 132 <= 8 * 4 * (4096 // 512) < ONE_HEAD_TC_WAVES * 132


def test_hopper_tensor_core_launches_take_pdl_on_small_caches():
    """On Hopper a p = 0 tensor-core launch over at most TC_PDL_MAX_BYTES of K+V takes programmatic
    dependent launch, a larger one not, nor one off Hopper or a pruning step
    (bench/results/candidates-features-h200.json)."""
    from ffa.launch import TC_PDL_MAX_BYTES, kv_bytes
    at = TC_PDL_MAX_BYTES // kv_bytes(1, 8, 1, 128)  # positions of a batch-1 cache of that size
    assert heuristic(1, 8, 4, at, 132, 128, True, tma=True).pdl
    assert not heuristic(1, 8, 4, 2 * at, 132, 128, True, tma=True).pdl
    assert not heuristic(1, 8, 4, at, 132, 128, True).pdl
    assert not heuristic(1, 8, 4, at, 132, 128, True, prune=True, tma=True).pdl


def test_tma_launch_blocks_per_sm():
    """Two TMA blocks share an SM only where both rings fit and a block has at most 128 consumer
    threads: 32 heads at head_dim 64 (256 threads) split for one block per SM."""
    wide = heuristic_tma(64, 1, 32, 8192, 132, 64)
    assert wide.threads == 256 and wide.split_len == 4096
    narrow = heuristic_tma(64, 2, 16, 8192, 132, 64)
    assert narrow.threads == 128 and narrow.split_len == 4096  # 128 blocks in 2 pieces: 2 per SM


def test_tma_thread_limits_come_from_the_library():
    """The library reports the most threads of a TMA block per head_dim; the heuristic's TMA launches
    stay within it for every group size the block holds."""
    from ffa.launch import heuristic_tma, library_facts, max_heads_per_block, thread_counts, tma_max_threads
    dims = library_facts()["kernels"]["tma"]["head_dims"]
    assert sorted(int(d) for d in library_facts()["tma"]["max_threads"]) == sorted(dims)
    assert {d: tma_max_threads(d) for d in dims} == {64: 256, 128: 256, 256: 128}
    assert all(tma_max_threads(d) in thread_counts() for d in dims)
    for d in dims:
        for group in (1, 4, 16, max_heads_per_block("tma")):
            assert heuristic_tma(1, 2, group, 65536, 132, d).threads <= tma_max_threads(d)
