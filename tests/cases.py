"""Random decode problems and their float64 answers, shared by the CPU and GPU tests."""

import math
from dataclasses import dataclass

import torch

from ffa.reference import decode_reference


@dataclass
class Case:
    batch: int = 2
    heads: int = 4
    kv_heads: int = 4
    head_dim: int = 64
    prompt_len: int = 37
    max_len: int = 64
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    ragged: bool = False  # each sequence at its own position
    padded: bool = False  # per-sequence start offsets (left padding)
    window: int = 0       # > 0: a sliding window, start = t - window + 1 where that is past the start
    p: float = 0.0
    softcap: float = 0.0  # > 0: logits capped to softcap * tanh(s / softcap)
    sinks: bool = False   # attention sinks (make_sinks)


def make_inputs(c, generator=None):
    """Fresh random K/V prompt, one step's q/k/v, positions t and starts."""
    g = generator
    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)
    K = rnd(c.batch, c.kv_heads, c.prompt_len, c.head_dim)
    V = rnd(c.batch, c.kv_heads, c.prompt_len, c.head_dim)
    q = rnd(c.batch, c.heads, 1, c.head_dim)
    k = rnd(c.batch, c.kv_heads, 1, c.head_dim)
    v = rnd(c.batch, c.kv_heads, 1, c.head_dim)
    if c.ragged:
        t = torch.randint(0, c.prompt_len + 1, (c.batch,), generator=g)
        t[0] = c.prompt_len  # one sequence at the end of the prompt
    else:
        t = torch.full((c.batch,), c.prompt_len)
    if c.padded:
        start = (torch.rand(c.batch, generator=g) * (t + 1).double()).long()
    else:
        start = torch.zeros(c.batch, dtype=torch.long)
    if c.window:
        start = torch.maximum(start, t - (c.window - 1))
    return K, V, q, k, v, t, start


def make_sinks(c, generator=None):
    """Attention sinks [heads] (float64) when c.sinks, else None: logits about log(prompt_len), where
    e^sink is of the order of the positions' own sum of weights, spread so that the heads range from a
    sink of little weight to one of most."""
    if not c.sinks:
        return None
    return math.log(c.prompt_len) + 2 * torch.randn(c.heads, generator=generator, dtype=torch.float64)


def exact(K, V, q, k, v, t, start, scale, max_len, softcap=0.0, sinks=None):
    """Float64 attention over start..t (p = 0) from the reference, and its caches."""
    b, kvh, _, d = K.shape
    kc = torch.zeros(b, kvh, max_len, d, dtype=torch.float64)
    vc = torch.zeros_like(kc)
    kc[:, :, : K.shape[2]] = K
    vc[:, :, : V.shape[2]] = V
    out = decode_reference(q[:, :, 0], k[:, :, 0], v[:, :, 0], kc, vc, t, start, scale, 0.0, softcap, sinks)
    return out, kc, vc


def pruning_bound(q, kc, vc, t, start, scale, p, softcap=0.0, sinks=None):
    """sum over rows with weight < p of w_i * |v_i|, per output element [batch, heads, d] (the
    weights with the sinks, when given, in their denominators)."""
    b, h, _, d = q.shape
    kvh = kc.shape[1]
    g = h // kvh
    length = int(t.max()) + 1
    logits = torch.einsum("bkgd,bkld->bkgl", q[:, :, 0].reshape(b, kvh, g, d), kc[:, :, :length]) * scale
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    pos = torch.arange(length)
    outside = (pos < start[:, None]) | (pos > t[:, None])
    logits = logits.masked_fill(outside[:, None, None], float("-inf"))
    if sinks is not None:
        sink = sinks.to(logits.dtype).view(1, kvh, g, 1).expand(b, -1, -1, -1)
        w = torch.softmax(torch.cat([logits, sink], -1), -1)[..., :-1]
    else:
        w = torch.softmax(logits, -1)
    w = torch.where(w < p, w, torch.zeros_like(w))
    values = vc[:, :, :length].abs().masked_fill(outside[:, None, :, None], 0)  # rows never written may hold NaN
    return torch.einsum("bkgl,bkld->bkgd", w, values).reshape(b, h, d)


def rel_l2(x, ref):
    x, ref = x.double().cpu(), ref.double().cpu()
    return float((x - ref).norm() / ref.norm())
