"""The launch heuristic (ffa.launch.heuristic): its invariants over a grid of shapes, the
choices the H100 measurements behind it picked (bench/results/kernel-targets-h100.md), and the
length FastForwardAttn hands it."""

import itertools

import torch

from ffa import FastForwardAttn, LaunchConfig
from ffa.launch import (HEURISTIC_MAX_HEADS_PER_BLOCK, MIN_SPLIT, RESIDENT_MULTI_HEAD, RESIDENT_ONE_HEAD,
                        heuristic)

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
        assert group % c.heads_per_block == 0 and c.heads_per_block <= HEURISTIC_MAX_HEADS_PER_BLOCK
        assert c.threads in (128, 256)
        assert c.split_len == 0 or (c.split_len % 64 == 0 and MIN_SPLIT <= c.split_len < length)
        blocks = grid_blocks(batch, kv_heads, group, length, c)
        if c.split_len:  # a split is only ever there to fill the wave, never to overfill it
            assert blocks <= wave(c, sms), (batch, kv_heads, group, length, sms, c)
            assert 2 * blocks > wave(c, sms) or c.split_len == MIN_SPLIT, (batch, kv_heads, group, length, sms, c)


def test_fewer_heads_per_block_only_when_the_cache_is_too_small_for_a_wave():
    for batch, kv_heads, group, length, sms in SHAPES:
        c = heuristic(batch, kv_heads, group, length, sms)
        largest = max(h for h in range(1, HEURISTIC_MAX_HEADS_PER_BLOCK + 1) if group % h == 0)
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


def test_attention_asks_for_the_bucket_but_never_beyond_the_cache():
    K = torch.zeros(10, 32, 1000, 32)
    f = FastForwardAttn(K, K, 1128)
    f._sm_count = 132  # as on an H100; the CPU path runs the reference whatever the launch
    # t = 1100 is in the 2048 bucket, but no sequence of this cache is longer than 1128
    assert f.launch_config(32, 1101) == heuristic(10, 32, 1, 1128, 132) == LaunchConfig(128, 1, 576)
    assert heuristic(10, 32, 1, 2048, 132).split_len == 1024  # 1024 + 104: two uneven blocks
