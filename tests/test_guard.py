"""The decode step writes exactly the rows it should, and reads only the rows it should.

The caches are strided views inside one larger buffer (K and V interleaved, with untouched
slots between them); everything outside the views holds a sentinel, 0xFF bytes, which is NaN
in every float dtype. The output and the split workspace sit inside sentinel buffers too; one
zeroed workspace serves every launch shape, as in FastForwardAttn, and each launch must stay
inside its share of it and leave the split counters at its start zero again.
Many steps at random positions (t = 0, t = max_len - 1, ragged batches with sequences at
both ends, left padding, pruning, softcapping, attention sinks (inside a sentinel buffer too), every
launch shape) must change no byte but the rows at t,
write new_k/new_v there bit for bit, and give the reference's answer (a read of a sentinel
would turn it into NaN). FastForwardAttn allocates its own cache, so this runs at the op
level, ffa.ops.decode_into, on the CPU reference path and on the GPU.
"""

import math

import pytest
import torch

from cases import pruning_bound
from ffa import LaunchConfig, ops
from ffa.launch import features_apply, tensor_cores_apply, tma_applies
from ffa.reference import decode_reference
from test_gpu_kernel import TOL as GPU_TOL

TOL = {torch.float64: 1e-12, **GPU_TOL}  # error allowed, relative to the largest |v|
BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
        torch.bfloat16: torch.int16}
BATCH, KV_HEADS, HEADS, MAX_LEN = 4, 2, 4, 40
PAD = 16  # extra elements per row in the sentinel buffers; views start 8 elements in
LAUNCHES = [LaunchConfig(256, 1, 0), LaunchConfig(128, 2, 0), LaunchConfig(64, 1, 16),
            LaunchConfig(128, 2, 16), LaunchConfig(256, 1, 48)]  # 48 >= MAX_LEN: one split
TENSOR_CORE_LAUNCHES = [LaunchConfig(128, 2, 0, True), LaunchConfig(64, 2, 16, True),
                        LaunchConfig(256, 1, 48, True)]
# Its launch features (compute capability 9.0+): clusters of 2 (two clusters, the last padded past the
# splits) and of 4 (one cluster), programmatic dependent launch.
TENSOR_CORE_FEATURE_LAUNCHES = [LaunchConfig(64, 2, 16, True, cluster=2), LaunchConfig(128, 1, 16, True, pdl=True),
                                LaunchConfig(256, 2, 16, True, pdl=True, cluster=4)]
# The TMA kernel: the smallest tiles (32 rows), splits shorter than a tile, of one tile and of two;
# clusters of 2 (two clusters, the last padded past the splits) and of 4 and 8 (one cluster).
TMA_LAUNCHES = [LaunchConfig(128, 2, 0, tma=True, stages=2, tile_rows=32), LaunchConfig(64, 1, 32, tma=True, stages=3,
                tile_rows=32, pdl=True), LaunchConfig(256, 2, 16, tma=True, stages=4, tile_rows=32),
                LaunchConfig(128, 1, 64, tma=True, stages=2, tile_rows=32),
                LaunchConfig(128, 2, 16, tma=True, stages=2, tile_rows=32, cluster=2),
                LaunchConfig(64, 1, 16, tma=True, stages=2, tile_rows=32, pdl=True, cluster=4),
                LaunchConfig(128, 2, 32, tma=True, stages=2, tile_rows=32, cluster=8)]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
STEPS = 40


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny problems: one CPU thread


def sentinel(shape, dtype, device):
    buf = torch.empty(shape, dtype=dtype, device=device)
    buf.view(torch.uint8).fill_(0xFF)
    return buf


def bits(x):
    return x.view(BITS.get(x.dtype, x.dtype))


def host64(x):
    """A float64 copy on the CPU (never a view of x, even when x is float64 on the CPU)."""
    return x.to("cpu", torch.float64, copy=True)


def cache_views(buf, head_dim):
    """The K and V caches [BATCH, KV_HEADS, MAX_LEN, head_dim] inside `buf`: batches 1..BATCH,
    kv slots 0, 3, .. (K) and 1, 4, .. (V), positions 2 .., elements 8 .. of each row."""
    view = lambda slot: buf[1:BATCH + 1, slot::3, 2:MAX_LEN + 2, 8:head_dim + 8]
    return view(0), view(1)


class Guarded:
    """The caches, output and workspace of one problem, each inside its sentinel buffer."""

    def __init__(self, dtype, device, head_dim, gen):
        self.dtype, self.device, self.head_dim = dtype, device, head_dim
        self.cache_buf = sentinel((BATCH + 2, 3 * KV_HEADS, MAX_LEN + 5, head_dim + PAD), dtype, device)
        self.k_cache, self.v_cache = cache_views(self.cache_buf, head_dim)
        for c in (self.k_cache, self.v_cache):  # a prompt that fills every position
            c.copy_(self.random(c.shape, gen))
        self.out_buf = sentinel((BATCH + 1, HEADS, head_dim + PAD), dtype, device)
        self.out = self.out_buf[:BATCH, :, 8:head_dim + 8]
        self.out_inside = torch.zeros(self.out_buf.shape, dtype=torch.bool)
        self.out_inside[:BATCH, :, 8:head_dim + 8] = True
        # zeroed once, 256 sentinel bytes around
        size = max(self.workspace_bytes(c) for c in LAUNCHES + TENSOR_CORE_LAUNCHES + TENSOR_CORE_FEATURE_LAUNCHES
                   + TMA_LAUNCHES)
        self.ws_buf = torch.full((size + 512,), 0xFF, dtype=torch.uint8, device=device)
        self.ws_buf[256:256 + size] = 0
        self.sinks_buf = sentinel((HEADS + PAD,), dtype, device)  # a sink read past its heads would be NaN
        self.sinks = self.sinks_buf[8:HEADS + 8]
        self.sinks.copy_(3 * self.random((HEADS,), gen))

    def random(self, shape, gen):
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(self.device, self.dtype)

    def workspace_bytes(self, config):
        return ops.workspace_bytes(BATCH, HEADS, self.head_dim, MAX_LEN, config) if self.device == "cuda" else 0

    def launch(self, out, q, new_k, new_v, pos, pos_int, start, start_int, scale, p, config, softcap=0.0,
               sinks=None):
        """ops.decode_into over this problem's caches and its share of the workspace; then no
        workspace byte past that share changed, and the split counters are zero again."""
        need = self.workspace_bytes(config)
        before = self.ws_buf.clone()
        ops.decode_into(out, q, new_k, new_v, self.k_cache, self.v_cache, pos, pos_int, start, start_int,
                        scale, p, softcap, sinks, config.fields(), self.ws_buf[256:256 + need])
        share = torch.zeros(self.ws_buf.shape, dtype=torch.bool, device=self.device)
        share[256:256 + need] = True
        assert torch.equal(self.ws_buf[~share], before[~share]), f"{config}: workspace bytes past its share changed"
        counters = (BATCH * HEADS * 4 + 15) // 16 * 16 if need else 0  # int32 [batch, heads], 16-byte padded
        assert not self.ws_buf[256:256 + counters].any(), f"{config}: split counters not left at zero"

    def step(self, q, new_k, new_v, t, start, config, p, softcap, sinks, t_form, start_form):
        """One decode_into call. t and start are int64 CPU tensors [BATCH]; *_form says how
        they are passed: "int" (when all equal), or a tensor of int32 or int64 on the device;
        sinks: whether the step takes self.sinks. Checks every guard and the output."""
        def as_arg(values, form):
            if form == "int" and bool((values == values[0]).all()):
                return None, int(values[0])
            return values.to(self.device, torch.int32 if form == "int32" else torch.int64), 0
        pos, pos_int = as_arg(t, t_form)
        st, st_int = as_arg(start, start_form)
        scale = 1 / math.sqrt(self.head_dim)

        kc, vc = host64(self.k_cache), host64(self.v_cache)
        sinks = self.sinks if sinks else None
        sinks64 = host64(sinks) if sinks is not None else None
        ref = decode_reference(host64(q), host64(new_k), host64(new_v), kc, vc, t, start, scale, 0.0, softcap,
                               sinks64)
        expected = self.cache_buf.clone()  # every byte as it is, but the rows at t
        ek, ev = cache_views(expected, self.head_dim)
        rows, at = torch.arange(BATCH, device=self.device), t.to(self.device)
        ek[rows, :, at], ev[rows, :, at] = new_k, new_v
        inputs = [x.clone() for x in (q, new_k, new_v)]
        out_before = self.out_buf.clone()

        self.launch(self.out, q, new_k, new_v, pos, pos_int, st, st_int, scale, p, config, softcap, sinks)

        changed = (bits(self.cache_buf) != bits(expected)).nonzero()
        assert changed.numel() == 0, f"{len(changed)} cache elements differ, first at {changed[0].tolist()}"
        around = (bits(self.out_buf) != bits(out_before)).cpu() & ~self.out_inside
        assert not around.any(), "bytes around the output changed"
        for x, before in zip((q, new_k, new_v), inputs):
            assert torch.equal(bits(x), bits(before)), "an input tensor was written"
        allowed = TOL[self.dtype] * vc.abs().max()  # kc, vc now hold the new rows too
        if p > 0:  # rows whose weight is within 0.1% of p may go either way
            allowed = allowed + pruning_bound(host64(q)[:, :, None], kc, vc, t, start, scale, p * (1 + 1e-3),
                                              softcap, sinks64)
        excess = ((host64(self.out) - ref).abs() - allowed).max()
        assert excess <= 0, f"output differs from the reference by {excess:.3g} more than allowed"


def step_positions(step, gen):
    """t and start for step `step`: the edges come first, then ragged batches with one
    sequence at 0 and one at MAX_LEN - 1, and left padding on every other step."""
    if step == 0:
        t = torch.zeros(BATCH, dtype=torch.long)
    elif step == 1:
        t = torch.full((BATCH,), MAX_LEN - 1)
    else:
        t = torch.randint(0, MAX_LEN, (BATCH,), generator=gen)
        if step % 3 == 0:
            t[0], t[-1] = 0, MAX_LEN - 1
        elif step % 3 == 1:
            t[:] = t[0]
    start = torch.zeros(BATCH, dtype=torch.long)
    if step % 2:
        start = (torch.rand(BATCH, generator=gen, dtype=torch.float64) * (t + 1)).long()
        start[-1] = t[-1]  # a sequence that attends to its new row alone
    return t, start


def launches_for(dtype, head_dim, device):
    """Every launch shape, with the tensor-core and TMA kernels' where they apply (the CPU reference
    ignores the launch)."""
    capability = torch.cuda.get_device_capability() if device == "cuda" else (9, 0)
    tensor_cores = tensor_cores_apply(dtype, head_dim, capability)
    return (LAUNCHES + (TENSOR_CORE_LAUNCHES if tensor_cores else [])
            + (TENSOR_CORE_FEATURE_LAUNCHES if tensor_cores and features_apply("tensor_cores", capability) else [])
            + (TMA_LAUNCHES if tma_applies(dtype, head_dim, capability) else []))


def dtypes_for(device):
    gpu = [torch.float16, torch.bfloat16, torch.float32]
    return gpu + [torch.float64] if device == "cpu" else gpu


@pytest.mark.parametrize("head_dim", [64, 80])
@pytest.mark.parametrize("device", DEVICES)
def test_only_rows_at_t_change(device, head_dim):
    for dtype in dtypes_for(device):
        gen = torch.Generator().manual_seed(head_dim)
        g = Guarded(dtype, device, head_dim, gen)
        launches = launches_for(dtype, head_dim, device)
        for step in range(STEPS):
            t, start = step_positions(step, gen)
            q = g.random((BATCH, HEADS, head_dim), gen)
            new_k, new_v = (g.random((BATCH, KV_HEADS, head_dim), gen) for _ in range(2))
            config = launches[step % len(launches)]
            p = 0.02 if step % 4 == 3 else 0.0
            softcap = 0.5 if step % 5 >= 3 else 0.0
            sinks = step % 7 >= 4
            forms = ("int", "int32", "int64")
            g.step(q, new_k, new_v, t, start, config, p, softcap, sinks, forms[step % 3], forms[step // 3 % 3])


@pytest.mark.parametrize("device", DEVICES)
def test_rows_outside_start_to_t_are_never_read(device):
    """Every cache row outside [start, t] of its sequence holds NaN: the output stays finite
    and equals the reference on a copy where those rows hold zeros."""
    head_dim = 64
    t = torch.tensor([0, MAX_LEN - 1, 17, 30])
    start = torch.tensor([0, 5, 17, 0])
    for dtype in dtypes_for(device):
        gen = torch.Generator().manual_seed(1)
        g = Guarded(dtype, device, head_dim, gen)
        for c in (g.k_cache, g.v_cache):
            for b in range(BATCH):
                c[b, :, :start[b]] = float("nan")
                c[b, :, t[b] + 1:] = float("nan")
        q = g.random((BATCH, HEADS, head_dim), gen)
        new_k, new_v = (g.random((BATCH, KV_HEADS, head_dim), gen) for _ in range(2))
        clean_k, clean_v = (host64(c).nan_to_num(0.0) for c in (g.k_cache, g.v_cache))
        ref = decode_reference(host64(q), host64(new_k), host64(new_v), clean_k, clean_v, t, start, 0.125, 0.0)
        for config in launches_for(dtype, head_dim, device):
            out = torch.zeros(BATCH, HEADS, head_dim, dtype=dtype, device=device)
            g.launch(out, q, new_k, new_v, t.to(device), 0, start.to(device), 0, 0.125, 0.0, config)
            assert torch.isfinite(out).all(), f"{config}: a NaN row outside [start, t] was read"
            assert ((host64(out) - ref).abs() <= TOL[dtype] * clean_v.abs().max()).all()


@pytest.mark.gpu
def test_device_positions_out_of_range_write_nothing():
    """A device position of max_len or -1, or a start beyond t, makes that sequence's output
    NaN and writes nothing anywhere; the other sequences are computed as usual."""
    head_dim = 64
    t = torch.tensor([3, MAX_LEN, -1, 5])
    start = torch.tensor([0, 0, 0, 6])
    for dtype in dtypes_for("cuda"):
        for config in launches_for(dtype, head_dim, "cuda"):
            for index_dtype in (torch.int32, torch.int64):
                gen = torch.Generator().manual_seed(2)
                g = Guarded(dtype, "cuda", head_dim, gen)
                g.out.zero_()
                q = g.random((BATCH, HEADS, head_dim), gen)
                new_k, new_v = (g.random((BATCH, KV_HEADS, head_dim), gen) for _ in range(2))
                expected = g.cache_buf.clone()
                ek, ev = cache_views(expected, head_dim)
                ek[0, :, 3], ev[0, :, 3] = new_k[0], new_v[0]
                ref = decode_reference(host64(q[:1]), host64(new_k[:1]), host64(new_v[:1]),
                                       host64(g.k_cache[:1]), host64(g.v_cache[:1]), t[:1], start[:1], 0.125, 0.0)
                g.launch(g.out, q, new_k, new_v, t.to("cuda", index_dtype), 0, start.to("cuda", index_dtype), 0,
                         0.125, 0.0, config)
                assert torch.equal(bits(g.cache_buf), bits(expected)), f"{config}: a cache byte changed"
                assert torch.isnan(g.out[1:]).all(), f"{config}: an invalid sequence got a number"
                assert torch.isfinite(g.out[0]).all()
                assert (host64(g.out[:1]) - ref).abs().max() <= TOL[dtype] * g.v_cache.abs().max().item()
