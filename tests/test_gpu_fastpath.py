"""The eager CUDA path of FastForwardAttn.attention: ops.cuda_decode with the fixed part of each
launch kept per head count and launch config. One cache, called with changing layouts, head
counts, position forms and launches, matches the float64 reference and the op path bit for bit
on every call, keeps its launches pointing into their current workspaces, and rejects each bad
input between good calls without touching the cache."""

import random

import pytest
import torch

from cases import rel_l2
from ffa import FastForwardAttn, LaunchConfig, ops
from ffa.reference import decode_reference
from test_api import LAYOUTS, laid_out
from test_gpu_kernel import TOL

pytestmark = pytest.mark.gpu

BATCH, KV_HEADS, HEAD_DIM, PROMPT, MAX_LEN = 3, 2, 128, 300, 512
HEADS = [2, 4, 8, 16]  # groups of 1 .. 8 query heads per kv head
LAUNCHES = [None, LaunchConfig(256, 1, 0), LaunchConfig(128, 1, 64), LaunchConfig(64, 1, 128),
            LaunchConfig(128, 2, 64)]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def make_cache(dtype, gen):
    """A FastForwardAttn whose every position holds finite values (so any t may be attended)."""
    K, V = (torch.randn(BATCH, KV_HEADS, PROMPT, HEAD_DIM, generator=gen).to("cuda", dtype) for _ in range(2))
    f = FastForwardAttn(K, V, MAX_LEN)
    for cache in f.get_cache():
        cache[:, :, PROMPT:] = torch.randn(cache[:, :, PROMPT:].shape, generator=gen).to("cuda", dtype)
    return f


def as_vector(x):
    """A position argument (int, 0-dim or [batch] tensor) as int64 [batch] on the CPU."""
    if isinstance(x, int):
        return torch.full((BATCH,), x)
    return x.reshape(-1).expand(BATCH).cpu().long()


def rows64(x):
    return (x[:, :, 0] if x.dim() == 4 else x).double().cpu()


def expected(f, q, k, v, scale, t, start, softcap, sinks):
    """The float64 reference of one step on copies of f's caches: (out, k_cache, v_cache)."""
    kc, vc = (c.double().cpu() for c in f.get_cache())
    out = decode_reference(rows64(q), rows64(k), rows64(v), kc, vc, as_vector(t), as_vector(start), scale, 0.0,
                           softcap or 0.0, sinks.double().cpu() if sinks is not None else None)
    return out, kc, vc


def random_step(f, rng, gen):
    """Keyword arguments of one valid call with a random head count, launch, layout per tensor,
    position form, softcap, sinks and output buffer; sets f.launch (as the tuner does)."""
    heads = rng.choice(HEADS)
    launch = rng.choice(LAUNCHES)
    f.launch = launch if launch is None or (heads // KV_HEADS) % launch.heads_per_block == 0 else None
    dtype = f.dtype
    q, k, v = (laid_out(torch.randn(BATCH, n, 1, HEAD_DIM, generator=gen).to("cuda", dtype), rng.choice(LAYOUTS))
               for n in (heads, KV_HEADS, KV_HEADS))
    ts = [rng.randrange(PROMPT, MAX_LEN) for _ in range(BATCH)]
    t = rng.choice([ts[0], torch.tensor(ts, device="cuda"), torch.tensor(ts, dtype=torch.int32, device="cuda"),
                    torch.tensor(ts[0], device="cuda"), torch.tensor(ts)])
    start = rng.choice([0, rng.randrange(0, PROMPT), torch.tensor([rng.randrange(0, PROMPT) for _ in range(BATCH)],
                                                                  device="cuda")])
    args = dict(q=q, k=k, v=v, softmax_scale=rng.choice([None, 0.05, 0.1]), t=t, start=start,
                softcap=rng.choice([None, None, 0.5, 30.0]),  # kept launches must keep neither
                sinks=rng.choice([None, (2 * torch.randn(heads, generator=gen) + 3).to("cuda", dtype)]))
    if rng.random() < 0.5:
        args["out"] = torch.full((BATCH, heads, HEAD_DIM), float("nan"), dtype=dtype, device="cuda")
    return args


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_changing_calls_on_one_cache_match_the_reference(dtype):
    seed = torch.randint(0, 2**31, ()).item()
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    f = make_cache(dtype, gen)
    for step in range(60):
        args = random_step(f, rng, gen)
        scale = args["softmax_scale"] or HEAD_DIM ** -0.5
        ref, kc, vc = expected(f, args["q"], args["k"], args["v"], scale, args["t"], args["start"], args["softcap"],
                               args["sinks"])
        out = f.attention(**args)
        torch.cuda.synchronize()
        where = f"seed {seed}, step {step}, launch {f.launch}"
        assert torch.isfinite(out).all(), where
        assert rel_l2(out, ref) < TOL[dtype], where
        assert torch.equal(f.k_cache.double().cpu(), kc) and torch.equal(f.v_cache.double().cpu(), vc), where
        for (heads, _), params in f._params.items():  # every kept launch points into its current workspace
            assert params.workspace is None or params.workspace == f._workspaces[heads].data_ptr(), where


@pytest.mark.parametrize("p", [0.0, 0.01])
def test_fast_path_equals_the_op_path(p):
    """The same step through attention() and through ops.decode_into (the op's eager body, with
    3-D views): bit-identical outputs and caches."""
    seed = torch.randint(0, 2**31, ()).item()
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    f = make_cache(torch.float16, gen)
    for step in range(20):
        args = random_step(f, rng, gen)
        args.pop("out", None)
        before = [c.clone() for c in f.get_cache()]
        fast = f.attention(p=p, **args)
        after = [c.clone() for c in f.get_cache()]
        for cache, saved in zip(f.get_cache(), before):
            cache.copy_(saved)

        q, k, v = (x[:, :, 0] if x.dim() == 4 else x for x in (args["q"], args["k"], args["v"]))
        pos = as_vector(args["t"]).to(f.device) if isinstance(args["t"], torch.Tensor) else None
        start = args["start"] if isinstance(args["start"], torch.Tensor) else None
        t_int = args["t"] if pos is None else 0
        start_int = args["start"] if start is None else 0
        config = f.launch_config(q.shape[1], MAX_LEN if pos is not None else t_int + 1, p > 0)
        op = torch.full_like(fast, float("nan"))
        ops.decode_into(op, q, k, v, f.k_cache, f.v_cache, pos, t_int, start, start_int,
                        args["softmax_scale"] or HEAD_DIM ** -0.5, p, args["softcap"] or 0.0, args["sinks"],
                        config.fields(),
                        f._workspace_for(q.shape[1], config))
        where = f"seed {seed}, step {step}, launch {config}"
        assert torch.equal(fast, op), where
        assert all(torch.equal(c, a) for c, a in zip(f.get_cache(), after)), where


def test_head_counts_and_split_lengths_alternate_on_one_cache():
    """Split launches for different head counts and split lengths alternate on one cache: every
    call is exact (a launch for fewer heads once wrote its partial outputs over the completion
    counters of a launch for more heads, sharing one workspace), and every kept launch points
    into its head count's workspace, also after a launch with more splits replaced it."""
    gen = torch.Generator().manual_seed(0)
    f = make_cache(torch.float16, gen)
    for heads, split_len in ((2, 128), (16, 128), (2, 128), (4, 128), (16, 64), (2, 64), (16, 128), (4, 64)):
        f.launch = LaunchConfig(128, 1, split_len)
        q = torch.randn(BATCH, heads, 1, HEAD_DIM, generator=gen).to("cuda", torch.float16)
        k, v = (torch.randn(BATCH, KV_HEADS, 1, HEAD_DIM, generator=gen).to("cuda", torch.float16) for _ in range(2))
        ref, _, _ = expected(f, q, k, v, 0.1, PROMPT, 0, None)
        out = f.attention(q, k, v, 0.1, PROMPT)
        assert rel_l2(out, ref) < TOL[torch.float16], (heads, split_len)
        for (h, _), params in f._params.items():
            assert params.workspace == f._workspaces[h].data_ptr(), (heads, split_len, h)


def bad_calls(good):
    """(label, changed arguments, exception, text the message must hold) for the good call."""
    q, k = good["q"], good["k"]
    return [
        ("q on the CPU", dict(q=q.cpu()), ValueError, "q is on cpu"),
        ("q dtype", dict(q=q.float()), TypeError, "q has dtype"),
        ("q heads", dict(q=q[:, :3]), ValueError, "multiple"),
        ("q two positions", dict(q=torch.cat([q, q], 2)), ValueError, "one position"),
        ("k head_dim", dict(k=k[..., :64]), ValueError, "k must have shape"),
        ("v batch", dict(v=k[:1]), ValueError, "v must have shape"),
        ("v dtype", dict(v=k.float()), TypeError, "v has dtype"),
        ("t = max_len", dict(t=MAX_LEN), ValueError, f"t={MAX_LEN}"),
        ("t host tensor", dict(t=torch.tensor([PROMPT, MAX_LEN, PROMPT])), ValueError, str(MAX_LEN)),
        ("t length", dict(t=torch.full((BATCH + 1,), PROMPT, device="cuda")), ValueError, "t must have shape"),
        ("t float", dict(t=torch.full((BATCH,), float(PROMPT), device="cuda")), TypeError, "int32 or int64"),
        ("start beyond t", dict(start=PROMPT + 1), ValueError, "start"),
        ("p", dict(p=1.0), ValueError, "p must"),
        ("softcap", dict(softcap=-1.0), ValueError, "softcap"),
        ("sinks on the CPU", dict(sinks=torch.zeros(q.shape[1], dtype=q.dtype)), ValueError, "sinks is on cpu"),
        ("sinks dtype", dict(sinks=torch.zeros(q.shape[1], device="cuda")), TypeError, "sinks has dtype"),
        ("out on the CPU", dict(out=torch.empty(BATCH, q.shape[1], HEAD_DIM, dtype=q.dtype)), ValueError, "out"),
        ("out strided", dict(out=torch.empty(BATCH, HEAD_DIM, q.shape[1], dtype=q.dtype, device="cuda")
                              .transpose(1, 2)), ValueError, "out"),
    ]


def test_bad_input_between_good_calls_is_rejected():
    gen = torch.Generator().manual_seed(1)
    f = make_cache(torch.float16, gen)
    new = lambda n: torch.randn(BATCH, n, 1, HEAD_DIM, generator=gen).to("cuda", torch.float16)
    good = dict(q=new(8), k=new(KV_HEADS), v=new(KV_HEADS), softmax_scale=0.1, t=PROMPT)
    for label, change, exc, text in bad_calls(good):
        f.attention(**good)  # the launch for these arguments is kept now
        before = [c.clone() for c in f.get_cache()]
        with pytest.raises(exc, match=text):
            f.attention(**{**good, **change})
        torch.cuda.synchronize()
        assert all(torch.equal(c, b) for c, b in zip(f.get_cache(), before)), label
    ref, _, _ = expected(f, good["q"], good["k"], good["v"], 0.1, PROMPT, 0, None)
    assert rel_l2(f.attention(**good), ref) < TOL[torch.float16]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cache_on_another_device_than_the_current_one():
    gen = torch.Generator().manual_seed(2)
    K, V, q, k, v = (torch.randn(BATCH, n, length, HEAD_DIM, generator=gen).to(torch.float16).double()
                     for n, length in ((KV_HEADS, PROMPT), (KV_HEADS, PROMPT), (8, 1), (KV_HEADS, 1), (KV_HEADS, 1)))
    dev = lambda x: x.to("cuda:1", torch.float16)
    f = FastForwardAttn(dev(K), dev(V), MAX_LEN)
    ref, _, _ = expected(f, q, k, v, 0.1, PROMPT, 0, None)
    assert torch.cuda.current_device() == 0
    out = f.attention(dev(q), dev(k), dev(v), 0.1, torch.full((BATCH,), PROMPT, device="cuda:1"))
    assert out.device == torch.device("cuda:1") and rel_l2(out, ref) < TOL[torch.float16]
