"""ffa.measure: the layer-rotation protocol's arithmetic and the read ceiling (the library's
read kernels), which the tuner and the benchmarks time with."""

import math

import pytest
import torch

from ffa import _lib
from ffa.measure import COLD_FACTOR, RotationTimer, copies_for, l2_bytes, read_bytes

L2 = 60 << 20


@pytest.mark.parametrize("nbytes", [1, 2 << 20, 20 << 20, 90 << 20, 180 << 20, 8 << 30])
def test_copies_cover_the_l2_several_times(nbytes):
    n = copies_for(nbytes, L2)
    assert n >= 2
    assert n * nbytes >= COLD_FACTOR * L2 or n == 4096
    assert n == 2 or (n - 1) * nbytes < COLD_FACTOR * L2  # no more than needed


def test_copies_are_capped():
    assert copies_for(16, L2, most=64) == 64


@pytest.mark.parametrize("tensors", [(), (torch.zeros(8),), (torch.zeros(4, 4).t(),), (1, 2, 3)])
def test_read_bytes_refuses_what_it_cannot_read(tensors):
    with pytest.raises(ValueError, match="read_bytes"):
        read_bytes(*tensors)


@pytest.mark.gpu
def test_read_kernels_run_in_a_graph_and_take_longer_on_more_bytes():
    """Both read kernels read two ranges in one launch inside a captured graph; reading 8x the
    bytes per call takes longer (no absolute timing is assumed)."""
    l2 = l2_bytes(torch.device("cuda"))
    timer = RotationTimer(min_replays=5, max_replays=10)
    small = [torch.randn(1 << 20, device="cuda", dtype=torch.float16) for _ in range(copies_for(4 << 20, l2) * 2)]
    large = [torch.randn(8 << 20, device="cuda", dtype=torch.float16) for _ in range(copies_for(32 << 20, l2) * 2)]
    bulk_options = [False] + ([True] if torch.cuda.get_device_capability() >= (9, 0) else [])
    for bulk in bulk_options:
        few = timer([lambda a=a, b=b: read_bytes(a, b, bulk=bulk) for a, b in zip(small[::2], small[1::2])])
        many = timer([lambda a=a, b=b: read_bytes(a, b, bulk=bulk) for a, b in zip(large[::2], large[1::2])])
        assert 0 < few < many and math.isfinite(many)


@pytest.mark.gpu
def test_bulk_read_needs_hopper_and_sizes_must_be_whole_chunks():
    x = torch.zeros(1024, device="cuda", dtype=torch.float16)
    if torch.cuda.get_device_capability() < (9, 0):
        with pytest.raises(_lib.UnsupportedError, match="compute capability 9.0"):
            read_bytes(x, bulk=True)
    else:
        read_bytes(x, x[:512], bulk=True)
        torch.cuda.synchronize()
    with pytest.raises(ValueError, match="multiple of 16 bytes"):
        read_bytes(torch.zeros(3, device="cuda", dtype=torch.float16))
