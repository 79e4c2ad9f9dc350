"""The public API on CPU tensors: semantics (via the reference path) and input checking."""

import ctypes
import math

import pytest
import torch

from cases import Case, make_inputs, pruning_bound
from ffa import FastForwardAttn, LaunchConfig, _lib, ops
from ffa.launch import kernel_applies, library_facts, tensor_cores_apply


def naive(K, V, q, scale, softcap=None, sinks=None):
    """softmax(q K^T * scale) V per (batch, head), float64, K/V already expanded to q's heads;
    with softcap, the logits s are capped to softcap * tanh(s / softcap) first; with sinks [heads],
    the weights are e^s_i / (sum_j e^s_j + e^sinks[h])."""
    s = torch.einsum("bhd,bhld->bhl", q, K) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    w = s.exp()
    denominator = w.sum(-1, keepdim=True)
    if sinks is not None:
        denominator = denominator + sinks.exp()[None, :, None]
    return torch.einsum("bhl,bhld->bhd", w / denominator, V)


def test_original_api_and_import_line():
    from ff_attention import FastForwardAttn as FFA
    assert FFA is FastForwardAttn
    B, H, P, D, steps = 2, 4, 10, 64, 5
    K, V = torch.rand(B, H, P, D, dtype=torch.float64), torch.rand(B, H, P, D, dtype=torch.float64)
    ffa = FFA(K, V, P + steps, False)
    keys, values = K, V
    for t in range(P, P + steps):
        q, k, v = (torch.rand(B, H, 1, D, dtype=torch.float64) for _ in range(3))
        out = ffa.attention(q, k, v, 1 / math.sqrt(D), t, 0)
        keys, values = torch.cat([keys, k], 2), torch.cat([values, v], 2)
        assert out.shape == (B, H, D)
        torch.testing.assert_close(out, naive(keys, values, q[:, :, 0], 1 / math.sqrt(D)), rtol=1e-12, atol=1e-12)
    k_cache, v_cache = ffa.get_cache()
    torch.testing.assert_close(k_cache, keys)
    torch.testing.assert_close(v_cache, values)


@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2), (8, 1)])
def test_grouped_query_attention_reads_its_kv_head(heads, kv_heads):
    c = Case(batch=3, heads=heads, kv_heads=kv_heads, dtype=torch.float64)
    K, V, q, k, v, t, start = make_inputs(c)
    f = FastForwardAttn(K, V, c.max_len)
    out = f.attention(q, k, v, 0.3, c.prompt_len)
    g = heads // kv_heads
    keys = torch.cat([K, k], 2).repeat_interleave(g, 1)
    values = torch.cat([V, v], 2).repeat_interleave(g, 1)
    torch.testing.assert_close(out, naive(keys, values, q[:, :, 0], 0.3))


def test_ragged_positions_and_left_padding():
    c = Case(batch=4, heads=4, kv_heads=2, dtype=torch.float64, ragged=True, padded=True)
    K, V, q, k, v, t, start = make_inputs(c)
    f = FastForwardAttn(K, V, c.max_len)
    out = f.attention(q, k, v, 0.2, t, start=start)
    for b in range(c.batch):  # each sequence on its own, unpadded
        keys = torch.cat([K[b:b + 1, :, start[b]:t[b]], k[b:b + 1]], 2).repeat_interleave(2, 1)
        values = torch.cat([V[b:b + 1, :, start[b]:t[b]], v[b:b + 1]], 2).repeat_interleave(2, 1)
        torch.testing.assert_close(out[b:b + 1], naive(keys, values, q[b:b + 1, :, 0], 0.2))
        assert torch.equal(f.k_cache[b, :, t[b]], k[b, :, 0])


def test_sdpa_kernel_computes_the_same_step():
    """kernel="sdpa" (two cache copies + torch's SDPA over the masked cache) gives the same
    outputs and cache contents as FFA's step, ragged and left-padded, grouped heads; it refuses
    pruning."""
    c = Case(batch=4, heads=8, kv_heads=2, dtype=torch.float64, ragged=True, padded=True)
    K, V, q, k, v, t, start = make_inputs(c)
    ffa_, sdpa = FastForwardAttn(K, V, c.max_len), FastForwardAttn(K, V, c.max_len, kernel="sdpa")
    out = ffa_.attention(q, k, v, 0.2, t, start=start)
    torch.testing.assert_close(sdpa.attention(q, k, v, 0.2, t, start=start), out, rtol=1e-12, atol=1e-12)
    for a, b in zip(sdpa.get_cache(), ffa_.get_cache()):
        written = torch.arange(c.max_len)[None, :] <= t[:, None]  # FFA's cache is uninitialized beyond
        assert torch.equal(a[written[:, None, :].expand(-1, c.kv_heads, -1)],
                           b[written[:, None, :].expand(-1, c.kv_heads, -1)])
    with pytest.raises(ValueError, match="pruning"):
        sdpa.attention(q, k, v, 0.2, t, 1e-3, start=start)
    with pytest.raises(ValueError, match="softcapping"):
        sdpa.attention(q, k, v, 0.2, t, start=start, softcap=30.0)
    with pytest.raises(ValueError, match="sinks"):
        sdpa.attention(q, k, v, 0.2, t, start=start, sinks=torch.zeros(c.heads, dtype=c.dtype))


@pytest.mark.parametrize("p", [0.0, 0.01])
def test_sinks_join_each_heads_denominator(p):
    """Attention sinks from hardly any weight to most of it, one per query head (grouped heads,
    ragged positions, left padding, a softcap): the output equals e^s_i / (sum_j e^s_j + e^sink)
    weights of V per sequence, differs from the sinkless one, and pruning keeps its bound on the
    weights with the sink in the denominator."""
    c = Case(batch=3, heads=4, kv_heads=2, prompt_len=40, dtype=torch.float64, ragged=True, padded=True)
    K, V, q, k, v, t, start = make_inputs(c, torch.Generator().manual_seed(0))
    sinks = torch.tensor([-2.0, 1.0, 3.0, 5.0], dtype=c.dtype)
    for cap in (None, 5.0):
        f = FastForwardAttn(K, V, c.max_len)
        out = f.attention(q, k, v, 0.5, t, p, start=start, softcap=cap, sinks=sinks)
        sinkless = FastForwardAttn(K, V, c.max_len).attention(q, k, v, 0.5, t, start=start, softcap=cap)
        expected = torch.cat([naive(f.k_cache[b:b + 1, :, start[b]:t[b] + 1].repeat_interleave(2, 1),
                                    f.v_cache[b:b + 1, :, start[b]:t[b] + 1].repeat_interleave(2, 1),
                                    q[b:b + 1, :, 0], 0.5, cap, sinks) for b in range(c.batch)])
        bound = pruning_bound(q, f.k_cache, f.v_cache, t, start, 0.5, p, cap or 0.0, sinks) if p else 0
        assert ((out - expected).abs() <= bound + 1e-12).all()
        assert ((out - sinkless).abs().amax((0, 2)) > 1e-3).all(), "a head's sink changed nothing"
        # each output is the sinkless one scaled by the weight the positions keep: (0, 1)
        if p == 0:
            kept = out / sinkless
            assert ((kept > 0) & (kept < 1)).all()


@pytest.mark.parametrize("p", [0.0, 0.01])
def test_softcap_caps_every_logit_before_the_softmax(p):
    """Logits of order 30 under caps of 5 and 50: the capped answer equals softmax(cap * tanh(s /
    cap)) V per sequence over its window (left padding, ragged positions), differs from the
    uncapped one, and pruning keeps its bound on the capped weights."""
    c = Case(batch=3, heads=4, kv_heads=2, prompt_len=40, dtype=torch.float64, ragged=True, padded=True)
    # seeded: with fresh draws a short window's softmax can be peaked enough under both caps that the
    # cap of 50 moves no output by 1e-3
    K, V, q, k, v, t, start = make_inputs(c, torch.Generator().manual_seed(0))
    q = q * 4
    for cap in (5.0, 50.0):
        f = FastForwardAttn(K, V, c.max_len)
        out = f.attention(q, k, v, 0.5, t, p, start=start, softcap=cap)
        uncapped = FastForwardAttn(K, V, c.max_len).attention(q, k, v, 0.5, t, start=start)
        expected = torch.cat([naive(f.k_cache[b:b + 1, :, start[b]:t[b] + 1].repeat_interleave(2, 1),
                                    f.v_cache[b:b + 1, :, start[b]:t[b] + 1].repeat_interleave(2, 1),
                                    q[b:b + 1, :, 0], 0.5, cap) for b in range(c.batch)])
        bound = pruning_bound(q, f.k_cache, f.v_cache, t, start, 0.5, p, cap) if p else 0
        assert ((out - expected).abs() <= bound + 1e-12).all()
        assert (out - uncapped).abs().max() > 1e-3, f"softcap={cap} changed nothing"
        if p:
            assert not torch.equal(out, FastForwardAttn(K, V, c.max_len).attention(q, k, v, 0.5, t, start=start,
                                                                                 softcap=cap)), "nothing pruned"


def test_int32_position_tensor_equals_int():
    c = Case(dtype=torch.float64)
    K, V, q, k, v, t, start = make_inputs(c)
    a = FastForwardAttn(K, V, c.max_len).attention(q, k, v, 0.1, c.prompt_len)
    b = FastForwardAttn(K, V, c.max_len).attention(q, k, v, 0.1, t.to(torch.int32))
    assert torch.equal(a, b)


def test_pruning_obeys_its_bound_and_skips_rows():
    c = Case(batch=2, heads=4, kv_heads=4, prompt_len=200, max_len=256, dtype=torch.float64, p=0.01)
    K, V, q, k, v, t, start = make_inputs(c)
    q = q * 3  # a peakier distribution, so some weights are above and many below p
    exact = FastForwardAttn(K, V, c.max_len).attention(q, k, v, 0.125, c.prompt_len, 0.0)
    f = FastForwardAttn(K, V, c.max_len)
    pruned = f.attention(q, k, v, 0.125, c.prompt_len, c.p)
    bound = pruning_bound(q, f.k_cache, f.v_cache, t, start, 0.125, c.p)
    assert ((pruned - exact).abs() <= bound + 1e-12).all()
    assert not torch.equal(pruned, exact), "p > 0 skipped nothing on a distribution with small weights"


def test_float32_inputs_accumulate_accurately():
    c = Case(batch=2, heads=4, kv_heads=4, prompt_len=500, max_len=512, dtype=torch.float32)
    K, V, q, k, v, t, start = make_inputs(c)
    out = FastForwardAttn(K.float(), V.float(), c.max_len).attention(q.float(), k.float(), v.float(), 0.125, 500)
    ref = FastForwardAttn(K, V, c.max_len).attention(q, k, v, 0.125, 500)
    assert out.dtype == torch.float32
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-6


def test_output_buffer_is_written():
    c = Case(dtype=torch.float64)
    K, V, q, k, v, t, start = make_inputs(c)
    out = torch.full((c.batch, c.heads, c.head_dim), float("nan"), dtype=torch.float64)
    got = FastForwardAttn(K, V, c.max_len).attention(q, k, v, 0.1, c.prompt_len, out=out)
    assert got is out and torch.isfinite(out).all()


def test_launch_config_choice():
    K = torch.zeros(1, 8, 4, 64)
    assert FastForwardAttn(K, K, 16, True).launch_config(32, 16) == LaunchConfig(256, 1, 0)
    fixed = LaunchConfig(64, 2, 128)
    assert FastForwardAttn(K, K, 16, launch=fixed).launch_config(32, 16) == fixed
    cfg = FastForwardAttn(K, K, 16).launch_config(32, 16)
    assert cfg.heads_per_block == 4  # the whole group of 4 query heads shares one K/V read


def test_split_count_fits_a_huge_cache():
    from ffa.launch import MAX_SPLITS, fit_splits
    fitted = fit_splits(LaunchConfig(128, 1, 128), 2**21)  # 16384 splits of 128: too many
    assert fitted.split_len % 64 == 0 and -(-2**21 // fitted.split_len) <= MAX_SPLITS
    assert fit_splits(LaunchConfig(128, 1, 128), 2**20) == LaunchConfig(128, 1, 128)


# Input checking: every bad argument is named in a ValueError or TypeError.

def make(max_len=16, dtype=torch.float32, heads=4, kv_heads=2, d=64):
    K = torch.randn(2, kv_heads, 8, d, dtype=dtype)
    f = FastForwardAttn(K, K.clone(), max_len)
    for cache in f.get_cache():  # positions past the prompt are uninitialized: NaN would never compare equal
        cache[:, :, 8:] = 0
    q = torch.randn(2, heads, 1, d, dtype=dtype)
    k = torch.randn(2, kv_heads, 1, d, dtype=dtype)
    return f, q, k


@pytest.mark.parametrize("args,kwargs,exc,word", [
    ((torch.zeros(2, 2, 8), torch.zeros(2, 2, 8), 16), {}, ValueError, "K"),
    ((torch.zeros(2, 2, 8, 64), torch.zeros(2, 2, 9, 64), 16), {}, ValueError, "same shape"),
    ((torch.zeros(2, 2, 8, 64), torch.zeros(2, 2, 8, 64, dtype=torch.float64), 16), {}, TypeError, "dtype"),
    ((torch.zeros(2, 2, 8, 72), torch.zeros(2, 2, 8, 72), 16), {}, ValueError, "head_dim"),
    ((torch.zeros(2, 2, 8, 64), torch.zeros(2, 2, 8, 64), 4), {}, ValueError, "max_len"),
    ((torch.zeros(2, 2, 8, 64), torch.zeros(2, 2, 8, 64), 16.0), {}, TypeError, "max_len"),
    ((torch.zeros(2, 2, 8, 64, dtype=torch.int32), torch.zeros(2, 2, 8, 64, dtype=torch.int32), 16), {}, TypeError, "dtype"),
    (([1.0], torch.zeros(2, 2, 8, 64), 16), {}, TypeError, "K"),
    ((torch.zeros(2, 2, 8, 64), torch.zeros(2, 2, 8, 64), 16), {"launch": (128, 1, 0)}, TypeError, "launch"),
    ((torch.zeros(2, 2, 8, 64), torch.zeros(2, 2, 8, 64), 16), {"kernel": "cudnn"}, ValueError, "kernel"),
])
def test_constructor_rejects(args, kwargs, exc, word):
    with pytest.raises(exc, match=word):
        FastForwardAttn(*args, **kwargs)


BAD_CALLS = [
    (lambda f, q, k: dict(q=q[:, :3]), ValueError, "multiple"),
    (lambda f, q, k: dict(q=q.double()), TypeError, "q has dtype"),
    (lambda f, q, k: dict(q=q[:, :, :, :32]), ValueError, "q must have shape"),
    (lambda f, q, k: dict(q=torch.cat([q, q], 2)), ValueError, "one position"),
    (lambda f, q, k: dict(k=k[:1]), ValueError, "k must have shape"),
    (lambda f, q, k: dict(k=k[:, :, 0, :32]), ValueError, "k must have shape"),
    (lambda f, q, k: dict(k=k[None]), ValueError, "k must have 3 or 4 dimensions"),
    (lambda f, q, k: dict(k=[0.0]), TypeError, "k must be a torch.Tensor"),
    (lambda f, q, k: dict(v=k.half()), TypeError, "v has dtype"),
    (lambda f, q, k: dict(v=k.transpose(2, 3)), ValueError, "one position"),
    (lambda f, q, k: dict(v=k.to("meta")), ValueError, "v is on meta"),
    (lambda f, q, k: dict(t=16), ValueError, "t=16"),
    (lambda f, q, k: dict(t=-1), ValueError, "t=-1"),
    (lambda f, q, k: dict(t=3.0), TypeError, "t must be"),
    (lambda f, q, k: dict(t=True), TypeError, "t must be"),
    (lambda f, q, k: dict(t=None), TypeError, "t"),
    (lambda f, q, k: dict(t=torch.tensor([3.0, 4.0])), TypeError, "int32 or int64"),
    (lambda f, q, k: dict(t=torch.tensor([3, 4, 5])), ValueError, r"shape \[2\]"),
    (lambda f, q, k: dict(t=torch.tensor([3, 99])), ValueError, "99"),
    (lambda f, q, k: dict(start=9, t=8), ValueError, "start"),
    (lambda f, q, k: dict(start=torch.tensor([0, 9]), t=torch.tensor([8, 8])), ValueError, "start"),
    (lambda f, q, k: dict(p=1.0), ValueError, "p must"),
    (lambda f, q, k: dict(p=-0.1), ValueError, "p must"),
    (lambda f, q, k: dict(p=True), ValueError, "p must"),
    (lambda f, q, k: dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    (lambda f, q, k: dict(softmax_scale="0.1"), ValueError, "softmax_scale"),
    (lambda f, q, k: dict(softcap=0.0), ValueError, "softcap"),
    (lambda f, q, k: dict(softcap=-50.0), ValueError, "softcap"),
    (lambda f, q, k: dict(softcap=float("inf")), ValueError, "softcap"),
    (lambda f, q, k: dict(softcap=float("nan")), ValueError, "softcap"),
    (lambda f, q, k: dict(softcap=1e31), ValueError, "softcap"),
    (lambda f, q, k: dict(softcap="50"), ValueError, "softcap"),
    (lambda f, q, k: dict(softcap=True), ValueError, "softcap"),
    (lambda f, q, k: dict(sinks=[0.0] * 4), TypeError, "sinks must be None or a torch.Tensor"),
    (lambda f, q, k: dict(sinks=torch.zeros(2)), ValueError, r"sinks must be a contiguous tensor of shape \[4\]"),
    (lambda f, q, k: dict(sinks=torch.zeros(1, 4)), ValueError, r"shape \[4\]"),
    (lambda f, q, k: dict(sinks=torch.zeros(8)[::2]), ValueError, "contiguous"),
    (lambda f, q, k: dict(sinks=torch.zeros(4, dtype=torch.float64)), TypeError, "sinks has dtype"),
    (lambda f, q, k: dict(sinks=torch.zeros(4, device="meta")), ValueError, "sinks is on meta"),
    (lambda f, q, k: dict(out=torch.empty(2, 4, 32)), ValueError, "out"),
    (lambda f, q, k: dict(out=torch.empty(2, 64, 4).transpose(1, 2)), ValueError, "out"),
]


@pytest.mark.parametrize("change,exc,word", BAD_CALLS)
def test_attention_rejects(change, exc, word):
    f, q, k = make()
    args = dict(q=q, k=k, v=k, softmax_scale=0.125, t=8, p=0.0)
    args.update(change(f, q, k))
    with pytest.raises(exc, match=word):
        f.attention(**args)


@pytest.mark.parametrize("change,exc,word", BAD_CALLS)
def test_accepted_calls_let_no_bad_one_through(change, exc, word):
    """Good calls in every accepted form (4-D and 3-D rows, positions as ints and tensors),
    then the bad one: it still raises and changes nothing, and the next good call works."""
    f, q, k = make()
    good = [dict(q=q, k=k, v=k, t=8), dict(q=q[:, :, 0], k=k[:, :, 0], v=k[:, :, 0], t=torch.tensor([9, 9])),
            dict(q=q, k=k[:, :, 0], v=k, t=torch.tensor(10, dtype=torch.int32), start=torch.tensor([0, 2]),
                 softcap=30.0, sinks=torch.zeros(4))]
    for args in good:
        f.attention(softmax_scale=0.125, **args)
    cache = [c.clone() for c in f.get_cache()]
    args = dict(q=q, k=k, v=k, softmax_scale=0.125, t=8, p=0.0)
    args.update(change(f, q, k))
    with pytest.raises(exc, match=word):
        f.attention(**args)
    assert all(torch.equal(c, before) for c, before in zip(f.get_cache(), cache))
    f.attention(softmax_scale=0.125, **good[0])


def test_empty_prompt_and_last_position():
    K = torch.zeros(1, 2, 0, 32, dtype=torch.float64)
    f = FastForwardAttn(K, K, 3)
    for t in range(3):
        q, k, v = (torch.randn(1, 2, 1, 32, dtype=torch.float64) for _ in range(3))
        out = f.attention(q, k, v, 0.5, t)
        assert torch.isfinite(out).all()
    torch.testing.assert_close(out, naive(f.k_cache, f.v_cache, q[:, :, 0], 0.5))


def test_prepare_fixes_the_launch_a_device_position_step_uses():
    K = torch.zeros(2, 2, 4, 64)
    f = FastForwardAttn(K, K.clone(), 64)
    config = f.prepare(8)
    assert f.launch_config(8, f.max_len) == config
    assert torch.equal(f.k_cache[:, :, :4], K)  # preparing wrote nothing into the cache


def laid_out(x, layout):
    """x [batch, heads, 1, head_dim] in a layout callers pass; the last two need a copy."""
    if layout == "4-D":
        return x.clone()
    if layout == "3-D":
        return x[:, :, 0].clone()
    if layout == "transposed":  # Hugging Face's: a [batch, 1, heads, head_dim] projection, transposed
        b, h, _, d = x.shape
        return torch.empty(b, 1, h, d, dtype=x.dtype, device=x.device).copy_(x.transpose(1, 2)).transpose(1, 2)
    if layout == "misaligned":  # one element past an aligned address
        return torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)[1:].view(x.shape).copy_(x)
    assert layout == "strided"  # every other element of wider rows
    return torch.empty(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype, device=x.device)[..., ::2].copy_(x)


LAYOUTS = ["4-D", "3-D", "transposed", "misaligned", "strided"]


def read_rows(ptr, stride_b, stride_h, shape, dtype):
    """The rows [batch, heads, head_dim] the kernel reads at ptr with these element strides."""
    batch, heads, head_dim = shape
    size = dtype.itemsize
    rows = [torch.frombuffer(bytearray(ctypes.string_at(ptr + (b * stride_b + h * stride_h) * size, head_dim * size)),
                             dtype=dtype) for b in range(batch) for h in range(heads)]
    return torch.stack(rows).view(shape)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_eager_cuda_launch_describes_the_rows(layout, monkeypatch):
    """ops.cuda_decode (the eager CUDA path) on CPU tensors, with torch's CUDA bindings and the
    library call stubbed: the struct it passes describes q, k and v's rows in every layout (read
    back through its pointers and strides while the call runs, so a copy made for rows the
    kernel cannot read is alive and aligned), and every other field as launch_params and the
    step give it."""
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 4096, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: -1, raising=False)  # a CPU tensor's device
    batch, heads, kv_heads, d = 2, 8, 2, 64
    k_cache, v_cache = (torch.randn(batch, kv_heads, 32, d, dtype=torch.float16) for _ in range(2))
    q, k, v = (laid_out(torch.randn(batch, n, 1, d, dtype=torch.float16), layout) for n in (heads, kv_heads, kv_heads))
    out = torch.empty(batch, heads, d, dtype=torch.float16)
    t = torch.tensor([20, 7], dtype=torch.int32)
    fixed = ops.launch_params(k_cache, v_cache, heads, LaunchConfig(128, 4, 0, tensor_cores=True),
                              torch.empty(0, dtype=torch.uint8))
    seen = {}

    def decode(P):
        for name, x in (("q", q), ("new_k", k), ("new_v", v)):
            ptr, sb, sh = (getattr(P, name + f) for f in ("", "_stride_b", "_stride_h"))
            assert ptr % 16 == 0 and sb % 8 == 0 and sh % 8 == 0, name
            rows = x[:, :, 0] if x.dim() == 4 else x
            assert torch.equal(read_rows(ptr, sb, sh, rows.shape, x.dtype), rows), name
            seen[name] = ptr == x.data_ptr()
        seen["fields"] = {name: getattr(P, name) for name, _ in P._fields_}

    monkeypatch.setattr(_lib, "decode", decode)
    ops.cuda_decode(fixed, out, q, k, v, t, 0, None, 3, 0.125, 0.01, 30.0)
    assert seen["q"] == seen["new_k"] == seen["new_v"] == (layout not in ("misaligned", "strided"))
    fields = seen["fields"]
    assert fields == {**fields, "abi_version": _lib.ABI_VERSION, "dtype": _lib.DTYPE_CODES["float16"], "batch": batch,
                      "heads": heads, "kv_heads": kv_heads, "head_dim": d, "max_len": 32,
                      "k_cache": k_cache.data_ptr(), "k_stride_b": 2 * 32 * d, "k_stride_h": 32 * d, "k_stride_s": d,
                      "v_cache": v_cache.data_ptr(), "v_stride_b": 2 * 32 * d, "v_stride_h": 32 * d, "v_stride_s": d,
                      "out": out.data_ptr(), "out_stride_b": heads * d, "out_stride_h": d,
                      "pos_ptr": t.data_ptr(), "pos_bits": 32, "pos_scalar": 0,
                      "start_ptr": None, "start_bits": 0, "start_scalar": 3, "softmax_scale": 0.125, "prune_p": 0.01,
                      "softcap": 30.0, "threads": 128, "heads_per_block": 4, "split_len": 0, "kernel": 1,
                      "workspace": None, "workspace_bytes": 0, "stream": 4096}


def test_library_refuses_more_head_groups_than_a_grid_holds():
    """The library checks a launch's shape before anything touches a GPU: more than 65535 head
    groups (blocks along the grid's y dimension) is a ValueError that names the limit."""
    _lib.load()  # without the compiled library: FFAError, saying how to build it

    def params(heads, heads_per_block):
        return _lib.DecodeParams(abi_version=_lib.ABI_VERSION, dtype=_lib.DTYPE_CODES["float16"], batch=1,
                                 heads=heads, kv_heads=heads // 8, head_dim=64, max_len=16, threads=128,
                                 heads_per_block=heads_per_block, split_len=0)

    with pytest.raises(ValueError, match="131070 is more than 65535 head groups"):
        _lib.workspace_bytes(params(8 * 65535, 4))
    assert _lib.workspace_bytes(params(8 * 65535, 8)) == 0  # 65535 groups: the most a launch holds


@pytest.mark.parametrize("dtype,head_dim", [("float16", 64), ("bfloat16", 128), ("float32", 128), ("float16", 80),
                                            ("bfloat16", 256), ("float16", 32)])
@pytest.mark.parametrize("kernel", ["tensor_cores", "tma"])
def test_library_knows_where_its_kernels_apply(kernel, dtype, head_dim):
    """A tensor-core or TMA launch is checked before anything touches a GPU: for a dtype or head_dim
    that kernel lacks it is an UnsupportedError (a ValueError) that names the kernel; a kernel
    code the library does not have is a ValueError. ffa.launch reads the same facts from the
    library (kernel_applies), and they are the ones the kernels are built for."""
    _lib.load()  # without the compiled library: FFAError, saying how to build it
    facts = library_facts()["kernels"][kernel]
    supported = dtype in facts["dtypes"] and head_dim in facts["head_dims"]
    assert supported == {"tensor_cores": dtype != "float32" and head_dim in (64, 128),
                         "tma": dtype != "float32" and head_dim in (64, 128, 256)}[kernel]

    def params(code):
        return _lib.DecodeParams(abi_version=_lib.ABI_VERSION, dtype=_lib.DTYPE_CODES[dtype], batch=2, heads=8,
                                 kv_heads=2, head_dim=head_dim, max_len=256, threads=128, heads_per_block=4,
                                 split_len=64, kernel=code, stages=3, tile_rows=64, cluster=1)

    torch_dtype = getattr(torch, dtype)
    assert kernel_applies(kernel, torch_dtype, head_dim, (9, 0)) == supported
    assert not kernel_applies(kernel, torch_dtype, head_dim, (7, 5))
    expected = ops.workspace_bytes(2, 8, head_dim, 256, LaunchConfig(128, 4, 64))
    if supported:
        assert _lib.workspace_bytes(params(facts["code"])) == expected
    else:
        with pytest.raises(_lib.UnsupportedError, match=f"kernel {facts['code']} has no {dtype} kernel for head_dim"):
            _lib.workspace_bytes(params(facts["code"]))
    with pytest.raises(ValueError, match="kernel 3 is not 0"):
        _lib.workspace_bytes(params(3))


@pytest.mark.parametrize("field,value,message", [("stages", 1, "stages 1 is outside"),
                                                 ("stages", 9, "stages 9 is outside"),
                                                 ("tile_rows", 48, "tile_rows 48 is not a multiple of 32"),
                                                 ("tile_rows", 288, "tile_rows 288"), ("pdl", 2, "pdl 2 is not 0 or 1"),
                                                 ("heads_per_block", 64, "at most 32 for kernel 2"),
                                                 ("cluster", 3, "cluster 3 is not 1, 2, 4 or 8"),
                                                 ("cluster", 16, "cluster 16 is not"),
                                                 ("cluster", 2, "cluster 2 needs a split launch")])
def test_library_checks_the_tma_launch_fields(field, value, message):
    """The TMA kernel's ring and launch fields are range-checked by the library, each error naming
    the field (the launch is unsplit: a cluster other than 1 is refused there, not ignored). The
    launch features (pdl, cluster) are checked the same way for the tensor-core kernel; the CUDA-core
    kernel ignores them, and the tensor-core kernel the ring's fields."""
    _lib.load()
    fields = dict(abi_version=_lib.ABI_VERSION, dtype=_lib.DTYPE_CODES["float16"], batch=1, heads=64, kv_heads=1,
                  head_dim=128, max_len=256, threads=128, heads_per_block=32, split_len=0, kernel=2, stages=4,
                  tile_rows=64, cluster=1)
    assert _lib.workspace_bytes(_lib.DecodeParams(**fields)) == 0
    assert _lib.workspace_bytes(_lib.DecodeParams(**{**fields, "split_len": 64, "cluster": 2})) > 0  # split: clusters
    with pytest.raises(ValueError, match=message):
        _lib.workspace_bytes(_lib.DecodeParams(**{**fields, field: value}))
    if field == "heads_per_block":
        return
    cuda_cores = {**fields, "heads_per_block": 8, "kernel": 0, field: value}
    assert _lib.workspace_bytes(_lib.DecodeParams(**cuda_cores)) == 0
    tensor_cores = {**cuda_cores, "kernel": 1}
    if field in ("pdl", "cluster"):
        with pytest.raises(ValueError, match=message):
            _lib.workspace_bytes(_lib.DecodeParams(**tensor_cores))
    else:
        assert _lib.workspace_bytes(_lib.DecodeParams(**tensor_cores)) == 0
