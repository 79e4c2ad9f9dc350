"""The op on torch's current stream, inside a captured CUDA graph and under torch.compile."""

import math

import pytest
import torch

from cases import Case, exact, make_inputs, rel_l2
from ffa import FastForwardAttn, LaunchConfig

pytestmark = pytest.mark.gpu


def setup_problem(dtype=torch.float16, max_len=512):
    c = Case(batch=4, heads=8, kv_heads=2, head_dim=128, prompt_len=200, max_len=max_len, dtype=dtype)
    K, V, q, k, v, t, start = make_inputs(c)
    return c, [x.to(dtype).double() for x in (K, V)]


@pytest.mark.parametrize("launch,kernel", [(None, "ffa"), (LaunchConfig(128, 4, 64), "ffa"), (None, "sdpa")])
def test_cuda_graph_replay_reads_positions_from_device(launch, kernel):
    c, (K, V) = setup_problem()
    dev = lambda x: x.to("cuda", c.dtype)
    f = FastForwardAttn(dev(K), dev(V), c.max_len, launch=launch, kernel=kernel)
    q = torch.empty(c.batch, c.heads, 1, c.head_dim, device="cuda", dtype=c.dtype)
    k = torch.empty(c.batch, c.kv_heads, 1, c.head_dim, device="cuda", dtype=c.dtype)
    v = torch.empty_like(k)
    t = torch.zeros(c.batch, dtype=torch.int32, device="cuda")
    out = torch.empty(c.batch, c.heads, c.head_dim, device="cuda", dtype=c.dtype)
    scale = 1 / math.sqrt(c.head_dim)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the default stream, as capture requires
        t.fill_(c.prompt_len)
        f.attention(q, k, v, scale, t, out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        f.attention(q, k, v, scale, t, out=out)

    kc, vc = K.clone(), V.clone()
    for step in range(5):
        pos = c.prompt_len + step
        nq, nk, nv = (torch.randn(s, dtype=torch.float64).to(c.dtype).double()
                      for s in (q.shape, k.shape, v.shape))
        q.copy_(dev(nq)), k.copy_(dev(nk)), v.copy_(dev(nv))
        t.fill_(pos)
        out.fill_(float("nan"))
        graph.replay()
        kc, vc = torch.cat([kc, nk], 2), torch.cat([vc, nv], 2)
        ref, _, _ = exact(kc, vc, nq, nk, nv, torch.full((c.batch,), pos),
                          torch.zeros(c.batch, dtype=torch.long), scale, c.max_len)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all()
        assert rel_l2(out, ref) < 2e-3


def test_torch_compile_fullgraph():
    c, (K, V) = setup_problem()
    dev = lambda x: x.to("cuda", c.dtype)
    f = FastForwardAttn(dev(K), dev(V), c.max_len)
    scale = 1 / math.sqrt(c.head_dim)

    def step(q, k, v, t):
        return f.attention(q, k, v, scale, t) * 2

    compiled = torch.compile(step, fullgraph=True)
    kc, vc = K.clone(), V.clone()
    for i in range(3):
        pos = c.prompt_len + i
        nq, nk, nv = (torch.randn(s, dtype=torch.float64).to(c.dtype).double()
                      for s in ((c.batch, c.heads, 1, c.head_dim), (c.batch, c.kv_heads, 1, c.head_dim),
                                (c.batch, c.kv_heads, 1, c.head_dim)))
        t = torch.full((c.batch,), pos, device="cuda")
        out = compiled(dev(nq), dev(nk), dev(nv), t)
        kc, vc = torch.cat([kc, nk], 2), torch.cat([vc, nv], 2)
        ref, _, _ = exact(kc, vc, nq, nk, nv, torch.full((c.batch,), pos),
                          torch.zeros(c.batch, dtype=torch.long), scale, c.max_len)
        assert rel_l2(out / 2, ref) < 2e-3
        assert torch.equal(f.k_cache[:, :, pos].cpu(), dev(nk)[:, :, 0].cpu())


def test_runs_on_side_stream():
    c, (K, V) = setup_problem()
    dev = lambda x: x.to("cuda", c.dtype)
    f = FastForwardAttn(dev(K), dev(V), c.max_len)
    s = torch.cuda.Stream()
    nq = torch.randn(c.batch, c.heads, 1, c.head_dim, dtype=torch.float64).to(c.dtype).double()
    nk = torch.randn(c.batch, c.kv_heads, 1, c.head_dim, dtype=torch.float64).to(c.dtype).double()
    with torch.cuda.stream(s):
        q, k = dev(nq), dev(nk)
        out = f.attention(q, k, k, 0.1, c.prompt_len)
    s.synchronize()
    ref, _, _ = exact(K, V, nq, nk, nk, torch.full((c.batch,), c.prompt_len),
                      torch.zeros(c.batch, dtype=torch.long), 0.1, c.max_len)
    assert rel_l2(out, ref) < 2e-3
