"""The specification of one decode step, in plain PyTorch.

This is what the CUDA kernel must compute, and the path FFA takes for CPU tensors. It is
written for clarity, not speed: every shape and rule is visible here.

  q:        [batch, heads, head_dim]
  new_k/v:  [batch, kv_heads, head_dim]       (heads % kv_heads == 0; query head h reads
  k/v_cache:[batch, kv_heads, max_len, head_dim]                  kv head h // (heads // kv_heads))
  pos, start: int64 [batch]

Step: write new_k/new_v at cache position pos[b]; then for every query head
  s = scale * q . K[start[b] .. pos[b]]                (accumulated in float32, or float64)
  s = softcap * tanh(s / softcap)                      (attention-logit softcapping; softcap = 0: none)
  w = softmax(s), or with attention sinks [heads]     w_i = e^s_i / (sum_j e^s_j + e^sinks[h]): the sink, taken
                                                       as is (not scaled, not capped), weighs no value row
  out = sum_i w_i * V_i, where rows with w_i < p may be skipped (the reference skips exactly
        those; the kernel skips a subset of them), so |out - exact| <= sum_{w_i < p} w_i |V_i|.
"""

import torch


def accumulation_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def decode_reference(q, new_k, new_v, k_cache, v_cache, pos, start, scale, p, softcap=0.0, sinks=None):
    batch, heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    rows = torch.arange(batch, device=q.device)
    k_cache[rows, :, pos] = new_k
    v_cache[rows, :, pos] = new_v

    acc = accumulation_dtype(q.dtype)
    length = int(pos.max()) + 1 if batch else 0
    keys = k_cache[:, :, :length].to(acc)
    values = v_cache[:, :, :length].to(acc)
    qg = q.to(acc).view(batch, kv_heads, group, head_dim)
    logits = torch.einsum("bkgd,bkld->bkgl", qg, keys) * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    positions = torch.arange(length, device=q.device)
    outside = (positions < start[:, None]) | (positions > pos[:, None])  # [batch, length]
    logits = logits.masked_fill(outside[:, None, None, :], float("-inf"))
    if sinks is not None:  # one more logit per head, taken as is, then dropped from the weights
        sink = sinks.to(acc).view(1, kv_heads, group, 1).expand(batch, -1, -1, -1)
        weights = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
    else:
        weights = torch.softmax(logits, dim=-1)
    if p > 0:
        weights = torch.where(weights < p, torch.zeros_like(weights), weights)
    # Rows outside the range weigh 0, but 0 * NaN is NaN: what they hold must not matter.
    values = values.masked_fill(outside[:, None, :, None], 0)
    out = torch.einsum("bkgl,bkld->bkgd", weights, values)
    return out.reshape(batch, heads, head_dim).to(q.dtype)
