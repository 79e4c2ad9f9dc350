"""The CUDA kernel against the float64 reference, over the whole supported matrix."""

import math

import pytest
import torch

from cases import Case, exact, make_inputs, make_sinks, pruning_bound, rel_l2
from ffa import FastForwardAttn, LaunchConfig, ops
from ffa._lib import UnsupportedError
from ffa.launch import features_apply, head_dims, tensor_cores_apply, tma_applies

pytestmark = pytest.mark.gpu

# Relative L2 error allowed against float64, per dtype (output rounding dominates).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float16, torch.bfloat16, torch.float32]
HEAD_DIMS = list(head_dims())  # the library's
HEADS = {"mha": (8, 8), "gqa": (8, 2), "mqa": (8, 1)}
LAUNCHES = ["default", "split"]
# The tensor-core kernel (fp16/bf16, head_dim 64/128), unsplit and split, and with its launch features
# (compute capability 9.0+) split with programmatic dependent launch and split in clusters of 4
# blocks; the TMA kernel (fp16/bf16, head_dim 64/128/256, compute capability 9.0+) unsplit, split,
# split with programmatic dependent launch, and split in clusters of 4 blocks.
TENSOR_CORE_LAUNCHES = ["tensor_cores", "tensor_cores_split"]
TENSOR_CORE_FEATURE_LAUNCHES = ["tensor_cores_split_pdl", "tensor_cores_split_cluster"]
TMA_LAUNCHES = ["tma", "tma_split", "tma_split_pdl", "tma_split_cluster"]
CAPABILITY = torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


def kernel_matrix():
    """(dtype, head_dim, launch) for every launch that applies to the dtype and head_dim on this GPU."""
    return [(dtype, d, launch) for dtype in DTYPES for d in HEAD_DIMS
            for launch in LAUNCHES + (TENSOR_CORE_LAUNCHES if tensor_cores_apply(dtype, d, (8, 0)) else [])
            + (TENSOR_CORE_FEATURE_LAUNCHES if tensor_cores_apply(dtype, d, (8, 0))
               and features_apply("tensor_cores", CAPABILITY) else [])
            + (TMA_LAUNCHES if tma_applies(dtype, d, CAPABILITY) else [])]


def launch_for(name, heads, kv_heads):
    if name == "default":
        return None
    group = heads // kv_heads
    split = 0 if name in ("tensor_cores", "tma") else 64
    if name.startswith("tma"):  # unsplit: 4 stages of 32 rows; split: 2 tiles of 32 rows per split
        return LaunchConfig(threads=128, heads_per_block=group, split_len=split, tma=True,
                            stages=4 if split == 0 else 2, tile_rows=32, pdl=name.endswith("pdl"),
                            cluster=4 if name.endswith("cluster") else 1)
    return LaunchConfig(threads=128, heads_per_block=min(group, 8), split_len=split,
                        tensor_cores=name.startswith("tensor_cores"), pdl=name.endswith("pdl"),
                        cluster=4 if name.endswith("cluster") else 1)


def run_case(c, launch_name, seed):
    gen = torch.Generator().manual_seed(seed)
    K, V, q, k, v, t, start = make_inputs(c, gen)
    sinks = make_sinks(c, gen)
    rounded = [x.to(c.dtype).double() for x in (K, V, q, k, v)]  # what the kernel sees
    K, V, q, k, v = rounded
    sinks = sinks.to(c.dtype).double() if sinks is not None else None
    scale = 1 / math.sqrt(c.head_dim)
    ref, kc, vc = exact(K, V, q, k, v, t, start, scale, c.max_len, c.softcap, sinks)

    dev = lambda x: x.to("cuda", c.dtype)
    f = FastForwardAttn(dev(K), dev(V), c.max_len, launch_name == "default",
                        launch=launch_for(launch_name, c.heads, c.kv_heads))
    out = torch.full((c.batch, c.heads, c.head_dim), float("nan"), dtype=c.dtype, device="cuda")
    tt = t.cuda() if c.ragged else int(t[0])
    st = start.cuda() if c.padded or c.window else 0
    f.attention(dev(q), dev(k), dev(v), scale, tt, c.p, start=st, out=out, softcap=c.softcap or None,
                sinks=dev(sinks) if sinks is not None else None)
    torch.cuda.synchronize()

    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite output"
    for b in range(c.batch):  # the new row landed at t[b]
        assert torch.equal(f.k_cache[b, :, t[b]].cpu(), dev(k)[b, :, 0].cpu())
        assert torch.equal(f.v_cache[b, :, t[b]].cpu(), dev(v)[b, :, 0].cpu())
    if c.p == 0:
        err = rel_l2(out, ref)
        assert err < TOL[c.dtype], f"relative L2 error {err:.3g}"
    else:
        bound = pruning_bound(q, kc, vc, t, start, scale, c.p, c.softcap, sinks)
        slack = 4 * TOL[c.dtype] * ref.abs().max()
        excess = ((out.double().cpu() - ref).abs() - bound - slack).max()
        assert excess <= 0, f"pruning error exceeds its bound by {excess:.3g}"


@pytest.mark.parametrize("p", [0.0, 0.01])
@pytest.mark.parametrize("shape", ["plain", "ragged_padded"])
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("dtype,head_dim,launch", kernel_matrix(), ids=str)
def test_matrix(dtype, head_dim, heads, launch, shape, p):
    h, kvh = HEADS[heads]
    c = Case(batch=3, heads=h, kv_heads=kvh, head_dim=head_dim, prompt_len=300, max_len=400,
             dtype=dtype, ragged=shape != "plain", padded=shape != "plain", p=p)
    run_case(c, launch, seed=torch.randint(0, 2**31, ()).item())


@pytest.mark.parametrize("p", [0.0, 0.01])
@pytest.mark.parametrize("dtype,head_dim,launch", kernel_matrix(), ids=str)
def test_softcap_and_sliding_window(dtype, head_dim, launch, p):
    """A Gemma 2 layer's step: logits capped (softcap 1 bends logits of order 1: the capped answer
    is far from the uncapped one), a sliding window of 50 of up to 301 positions (split blocks
    wholly before it read nothing), grouped heads, ragged positions."""
    c = Case(batch=3, heads=8, kv_heads=2, head_dim=head_dim, prompt_len=300, max_len=400, dtype=dtype,
             ragged=True, window=50, softcap=1.0, p=p)
    seed = torch.randint(0, 2**31, ()).item()
    K, V, q, k, v, t, start = make_inputs(c, torch.Generator().manual_seed(seed))
    assert int((t - start + 1).max()) == 50 and int(start.max()) > 200  # the window cuts the sequence
    scale = 1 / math.sqrt(head_dim)
    capped, uncapped = (exact(K, V, q, k, v, t, start, scale, c.max_len, cap)[0] for cap in (1.0, 0.0))
    assert rel_l2(uncapped, capped) > 10 * TOL[dtype]
    run_case(c, launch, seed)


@pytest.mark.parametrize("p", [0.0, 0.01])
@pytest.mark.parametrize("dtype,head_dim,launch", kernel_matrix(), ids=str)
def test_attention_sinks(dtype, head_dim, launch, p):
    """A gpt-oss layer's step: one sink logit per query head joins its softmax's denominator (make_sinks:
    from a sink of little weight to one of most; the answer is far from the sinkless one), grouped heads,
    ragged positions and left padding, so that split and cluster launches apply it in every combine."""
    c = Case(batch=3, heads=8, kv_heads=2, head_dim=head_dim, prompt_len=300, max_len=400, dtype=dtype,
             ragged=True, padded=True, sinks=True, p=p)
    seed = torch.randint(0, 2**31, ()).item()
    gen = torch.Generator().manual_seed(seed)
    K, V, q, k, v, t, start = make_inputs(c, gen)
    sinks = make_sinks(c, gen)
    scale = 1 / math.sqrt(head_dim)
    with_sinks, sinkless = (exact(K, V, q, k, v, t, start, scale, c.max_len, 0.0, s)[0] for s in (sinks, None))
    assert rel_l2(sinkless, with_sinks) > 10 * TOL[dtype]
    run_case(c, launch, seed)


def one_head_call():
    """The fixed launch fields (which hold the caches they point into), q and output of a one-head fp16
    step on an 8-position cache, for calling ops.cuda_decode (the C ABI's checks) directly."""
    K = torch.randn(1, 1, 4, 64, device="cuda", dtype=torch.float16)
    f = FastForwardAttn(K, K.clone(), 8)
    q = torch.randn(1, 1, 64, device="cuda", dtype=torch.float16)
    params = ops.launch_params(f.k_cache, f.v_cache, 1, LaunchConfig(128, 1, 0), f._no_workspace)
    return params, q, torch.empty_like(q)


def test_library_rejects_a_softcap_out_of_float_range():
    """The library's own check (for callers of the C ABI): a softcap that is negative, not a
    number, or whose base-2 value is no normal float32 is a ValueError naming it."""
    params, q, out = one_head_call()
    for softcap in (-1.0, float("nan"), float("inf"), 1e-39, 1e39):
        with pytest.raises(ValueError, match="softcap"):
            ops.cuda_decode(params, out, q, q, q, None, 4, None, 0, 0.125, 0.0, softcap)
    ops.cuda_decode(params, out, q, q, q, None, 4, None, 0, 0.125, 0.0, 1e-30)  # SOFTCAP_RANGE's ends pass
    ops.cuda_decode(params, out, q, q, q, None, 4, None, 0, 0.125, 0.0, 1e30)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()


def test_library_rejects_misaligned_sinks():
    """The library's own check (for callers of the C ABI): sinks not aligned to their elements are a
    ValueError naming them, and aligned ones pass."""
    params, q, out = one_head_call()
    sinks = torch.zeros(2, device="cuda", dtype=torch.float16)

    class Misaligned:  # a pointer one byte into the sinks
        def data_ptr(self):
            return sinks.data_ptr() + 1

    with pytest.raises(ValueError, match="sinks is not aligned"):
        ops.cuda_decode(params, out, q, q, q, None, 4, None, 0, 0.125, 0.0, 0.0, Misaligned())
    ops.cuda_decode(params, out, q, q, q, None, 4, None, 0, 0.125, 0.0, 0.0, sinks[1:])
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype,head_dim,launch", [m for m in kernel_matrix() if m[1] == 128], ids=str)
def test_long_context_many_subchunks(dtype, head_dim, launch):
    c = Case(batch=2, heads=4, kv_heads=4, head_dim=head_dim, prompt_len=5000, max_len=5001, dtype=dtype)
    run_case(c, launch, seed=torch.randint(0, 2**31, ()).item())


@pytest.mark.parametrize("heads,kv_heads,hpb", [(12, 2, 3), (14, 2, 7), (32, 2, 8), (10, 2, 5)])
def test_odd_groups(heads, kv_heads, hpb):
    c = Case(batch=2, heads=heads, kv_heads=kv_heads, head_dim=64, prompt_len=200, max_len=300,
             dtype=torch.float16, ragged=True)
    gen = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    K, V, q, k, v, t, start = [x.to(torch.float16).double() if x.is_floating_point() else x
                               for x in make_inputs(c, gen)]
    ref, _, _ = exact(K, V, q, k, v, t, start, 0.125, c.max_len)
    dev = lambda x: x.to("cuda", c.dtype)
    for split in (0, 64):
        for tensor_cores in (False, True):
            f = FastForwardAttn(dev(K), dev(V), c.max_len, launch=LaunchConfig(128, hpb, split, tensor_cores))
            out = f.attention(dev(q), dev(k), dev(v), 0.125, t.cuda())
            assert rel_l2(out, ref) < TOL[torch.float16], (split, tensor_cores)


@pytest.mark.skipif(not tma_applies(torch.float16, 64, CAPABILITY),
                    reason="the TMA kernel needs compute capability 9.0+")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("heads,kv_heads,hpb", [(32, 1, 32), (24, 1, 24), (17, 1, 17), (40, 2, 20), (16, 2, 8),
                                                (12, 2, 3), (64, 2, 16)])
def test_tma_head_groups(dtype, head_dim, heads, kv_heads, hpb):
    """The TMA kernel holds any group of 1-32 heads in one block (one or two m-tiles of 16, rows
    past the group zero), and a block may take part of a group; rings of 32 to 128 rows, 2 to 6
    stages, 64 to 256 consumer threads, unsplit and split (splits of one tile and of several),
    with and without programmatic dependent launch, in clusters of 8 (two, the last padded past the
    splits) and of 4 (one cluster holds every split); ragged positions."""
    c = Case(batch=2, heads=heads, kv_heads=kv_heads, head_dim=head_dim, prompt_len=700, max_len=777, dtype=dtype,
             ragged=True, padded=True)
    gen = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    K, V, q, k, v, t, start = [x.to(dtype).double() if x.is_floating_point() else x for x in make_inputs(c, gen)]
    ref, _, _ = exact(K, V, q, k, v, t, start, 0.125, c.max_len)
    dev = lambda x: x.to("cuda", dtype)
    for threads, split, stages, rows, pdl, cluster in [
            (128, 0, 4, 32, False, 1), (64, 64, 2, 64, True, 1), (256, 256, 3, 64, False, 1), (128, 512, 2, 128, True, 1),
            (256, 0, 6, 32, False, 1), (128, 64, 2, 64, True, 8), (64, 256, 2, 32, False, 4)]:
        config = LaunchConfig(threads, hpb, split, tma=True, stages=stages, tile_rows=rows, pdl=pdl, cluster=cluster)
        f = FastForwardAttn(dev(K), dev(V), c.max_len, launch=config)
        out = torch.full((c.batch, heads, head_dim), float("nan"), dtype=dtype, device="cuda")
        try:
            f.attention(dev(q), dev(k), dev(v), 0.125, t.cuda(), start=start.cuda(), out=out)
        except UnsupportedError as e:  # a ring too large for one block, or 256 threads (head_dim 256)
            assert head_dim == 256 and "at most 128 threads at head_dim 256" in str(e), e
            continue
        assert torch.isfinite(out).all(), config
        assert rel_l2(out, ref) < TOL[dtype], config


def test_float32_original_example_accuracy():
    """The original FFA release's example inputs (torch.rand, head_dim 64, 1,152 positions): within 1e-6."""
    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    B, H, D, P = 10, 32, 64, 1151
    K, V = torch.rand(B, H, P, D, dtype=torch.float64), torch.rand(B, H, P, D, dtype=torch.float64)
    q, k, v = (torch.rand(B, H, 1, D, dtype=torch.float64) for _ in range(3))
    t = torch.full((B,), P)
    ref, _, _ = exact(K, V, q, k, v, t, torch.zeros(B, dtype=torch.long), 1 / 8, P + 1)
    for default in (True, False):
        f = FastForwardAttn(K.float().cuda(), V.float().cuda(), P + 1, default)
        out = f.attention(q.float().cuda(), k.float().cuda(), v.float().cuda(), 1 / 8, P)
        assert rel_l2(out, ref) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads,kv_heads", [(16, 16), (16, 4)])
def test_error_no_worse_than_sdpa(dtype, heads, kv_heads):
    """Against float64, the kernel's error is at most 1.5x SDPA's on the same inputs."""
    torch.backends.cuda.matmul.allow_tf32 = False
    ours, theirs = [], []
    for _ in range(5):
        c = Case(batch=4, heads=heads, kv_heads=kv_heads, head_dim=128, prompt_len=1000,
                 max_len=1024, dtype=dtype)
        K, V, q, k, v, t, start = make_inputs(c)
        K, V, q, k, v = [x.to(dtype).double() for x in (K, V, q, k, v)]
        ref, kc, vc = exact(K, V, q, k, v, t, start, 1 / math.sqrt(128), c.max_len)
        dev = lambda x: x.to("cuda", dtype)
        for default in (True, False):
            f = FastForwardAttn(dev(K), dev(V), c.max_len, default)
            ours.append(rel_l2(f.attention(dev(q), dev(k), dev(v), 1 / math.sqrt(128), c.prompt_len), ref))
        L = c.prompt_len + 1
        g = heads // kv_heads
        kk = dev(kc[:, :, :L]).repeat_interleave(g, 1)
        vv = dev(vc[:, :, :L]).repeat_interleave(g, 1)
        s = torch.nn.functional.scaled_dot_product_attention(dev(q), kk, vv, scale=1 / math.sqrt(128))
        theirs.append(rel_l2(s[:, :, 0], ref))
    assert max(ours) <= 1.5 * (sum(theirs) / len(theirs)), (ours, theirs)


def test_large_logits_stay_finite():
    c = Case(batch=2, heads=4, kv_heads=2, head_dim=64, prompt_len=500, max_len=512, dtype=torch.float16)
    K, V, q, k, v, t, start = make_inputs(c)
    q = q * 300  # logits of order 1e4 after scaling
    dev = lambda x: x.to("cuda", torch.float16)
    for launch in (None, LaunchConfig(128, 2, 64), LaunchConfig(128, 2, 64, tensor_cores=True)):
        f = FastForwardAttn(dev(K), dev(V), c.max_len, launch is None, launch=launch)
        out = f.attention(dev(q), dev(k), dev(v), 1.0, c.prompt_len)
        assert torch.isfinite(out).all()
        ref, _, _ = exact(*(x.to(torch.float16).double() for x in (K, V, q, k, v)), t, start, 1.0, c.max_len)
        assert rel_l2(out, ref) < 1e-2


def test_device_position_out_of_range_is_nan_and_writes_nothing():
    c = Case(batch=3, heads=4, kv_heads=4, head_dim=64, prompt_len=10, max_len=16, dtype=torch.float16)
    K, V, q, k, v, t, start = make_inputs(c)
    dev = lambda x: x.to("cuda", torch.float16)
    for default in (True, False):
        f = FastForwardAttn(dev(K), dev(V), c.max_len, default, launch=None if default else LaunchConfig(128, 1, 16))
        f.k_cache[:, :, c.prompt_len:] = 7
        before = f.k_cache.clone()
        bad = torch.tensor([5, 16, -1], device="cuda")
        out = f.attention(dev(q), dev(k), dev(v), 0.125, bad)
        assert torch.isfinite(out[0]).all() and torch.isnan(out[1:]).all()
        changed = (f.k_cache != before).any(-1)  # [batch, heads, positions]
        assert changed[0, :, 5].all() and changed.sum() == c.heads


@pytest.mark.parametrize("split_len", [0, 64, 1000])
def test_workspace_size_matches_library(split_len):
    from ffa import _lib, ops
    config = LaunchConfig(128, 2, split_len)
    P = _lib.DecodeParams(abi_version=_lib.ABI_VERSION, dtype=0, batch=3, heads=8, kv_heads=4, head_dim=96,
                          max_len=5000, threads=128, heads_per_block=2, split_len=split_len)
    assert ops.workspace_bytes(3, 8, 96, 5000, config) == _lib.workspace_bytes(P)


def test_one_cache_serves_changing_launch_configs():
    """Like the tuner: one FastForwardAttn, its workspace reused by launches of different
    split lengths and heads-per-block (the split counters must stay valid across them)."""
    c = Case(batch=2, heads=8, kv_heads=2, head_dim=128, prompt_len=900, max_len=1024, dtype=torch.float16)
    K, V, q, k, v, t, start = [x.to(torch.float16).double() if x.is_floating_point() else x for x in make_inputs(c)]
    ref, _, _ = exact(K, V, q, k, v, t, start, 0.1, c.max_len)
    dev = lambda x: x.to("cuda", c.dtype)
    f = FastForwardAttn(dev(K), dev(V), c.max_len)
    for config in [LaunchConfig(128, 4, 64), LaunchConfig(256, 1, 512), LaunchConfig(64, 2, 128, True),
                   LaunchConfig(128, 4, 0), LaunchConfig(128, 1, 64), LaunchConfig(256, 4, 64, True),
                   LaunchConfig(128, 4, 64)]:
        f.launch = config
        out = torch.full((c.batch, c.heads, c.head_dim), float("nan"), dtype=c.dtype, device="cuda")
        f.attention(dev(q), dev(k), dev(v), 0.1, c.prompt_len, out=out)
        assert torch.isfinite(out).all() and rel_l2(out, ref) < TOL[c.dtype], config
