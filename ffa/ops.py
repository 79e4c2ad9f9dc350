"""The `ffa::decode` custom op: CUDA tensors go to the native library, CPU tensors to the
reference. Registered through torch.library so that it runs on the current stream, can be
captured in CUDA graphs and traced by torch.compile (the fake implementation gives shapes).

Arguments are assumed valid (attention.py checks them); the library re-checks everything
that protects memory.
"""

from typing import Optional

import torch

from . import _lib
from .reference import decode_reference

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def _positions(tensor, scalar, batch, device):
    if tensor is None:
        return torch.full((batch,), scalar, dtype=torch.int64, device=device)
    return tensor.to(device=device, dtype=torch.int64)


def _vector_rows(x):
    """x itself if its rows are aligned 16-byte vectors as the kernel reads them, else a copy."""
    vec = 16 // x.element_size()
    if x.stride(-1) != 1 or x.data_ptr() % 16 or x.stride(0) % vec or x.stride(1) % vec:
        return x.clone(memory_format=torch.contiguous_format)
    return x


def _cuda_decode(out, q, new_k, new_v, k_cache, v_cache, pos, pos_int, start, start_int, scale, p,
                 threads, heads_per_block, split_len, workspace):
    batch, heads, head_dim = q.shape
    q, new_k, new_v = _vector_rows(q), _vector_rows(new_k), _vector_rows(new_v)
    P = _lib.DecodeParams(
        abi_version=_lib.ABI_VERSION, dtype=_lib.DTYPE_CODES[_DTYPE_NAMES[q.dtype]],
        batch=batch, heads=heads, kv_heads=k_cache.shape[1], head_dim=head_dim, max_len=k_cache.shape[2],
        q=q.data_ptr(), q_stride_b=q.stride(0), q_stride_h=q.stride(1),
        new_k=new_k.data_ptr(), new_k_stride_b=new_k.stride(0), new_k_stride_h=new_k.stride(1),
        new_v=new_v.data_ptr(), new_v_stride_b=new_v.stride(0), new_v_stride_h=new_v.stride(1),
        k_cache=k_cache.data_ptr(), k_stride_b=k_cache.stride(0), k_stride_h=k_cache.stride(1),
        k_stride_s=k_cache.stride(2),
        v_cache=v_cache.data_ptr(), v_stride_b=v_cache.stride(0), v_stride_h=v_cache.stride(1),
        v_stride_s=v_cache.stride(2),
        out=out.data_ptr(), out_stride_b=out.stride(0), out_stride_h=out.stride(1),
        pos_ptr=pos.data_ptr() if pos is not None else None,
        pos_bits=pos.element_size() * 8 if pos is not None else 0, pos_scalar=pos_int,
        start_ptr=start.data_ptr() if start is not None else None,
        start_bits=start.element_size() * 8 if start is not None else 0, start_scalar=start_int,
        softmax_scale=scale, prune_p=p,
        threads=threads, heads_per_block=heads_per_block, split_len=split_len,
        workspace=workspace.data_ptr() if workspace.numel() else None,
        workspace_bytes=workspace.numel() * workspace.element_size(),
        stream=torch.cuda.current_stream(q.device).cuda_stream,
    )
    if q.device.index != torch.cuda.current_device():
        with torch.cuda.device(q.device):
            _lib.decode(P)
    else:
        _lib.decode(P)


def decode_into(out: torch.Tensor, q: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, pos: Optional[torch.Tensor], pos_int: int,
                start: Optional[torch.Tensor], start_int: int, scale: float, p: float,
                threads: int, heads_per_block: int, split_len: int, workspace: torch.Tensor) -> None:
    """One decode step (see reference.py for the semantics), written into `out` [batch, heads, head_dim]."""
    if q.is_cuda:
        _cuda_decode(out, q, new_k, new_v, k_cache, v_cache, pos, pos_int, start, start_int,
                     scale, p, threads, heads_per_block, split_len, workspace)
        return
    batch = q.shape[0]
    out.copy_(decode_reference(q, new_k, new_v, k_cache, v_cache,
                               _positions(pos, pos_int, batch, q.device),
                               _positions(start, start_int, batch, q.device), scale, p))


# The registered op, for torch.compile and export. Eager callers use decode_into directly:
# the dispatcher adds tens of microseconds per call, more than a small decode step takes.
decode = torch.library.custom_op("ffa::decode", decode_into, mutates_args=("out", "k_cache", "v_cache", "workspace"))


@decode.register_fake
def _(out, q, new_k, new_v, k_cache, v_cache, pos, pos_int, start, start_int, scale, p,
      threads, heads_per_block, split_len, workspace):
    return None


def workspace_bytes(batch, heads, head_dim, max_len, config):
    """Bytes of split workspace a launch needs: int32 completion counters [batch, heads] (padded
    to 16 bytes; zeroed once before first use, left zero by every launch), then float32 partial
    outputs [batch, heads, splits, head_dim] and log-sum-exps [batch, heads, splits]. Mirrors
    ffa_workspace_bytes in csrc/ffa_api.cu (a GPU test holds the two equal); plain arithmetic
    so that it traces."""
    if config.split_len == 0:
        return 0
    rows = batch * heads * (-(-max_len // config.split_len))
    counters = (batch * heads * 4 + 15) // 16 * 16
    return counters + rows * (head_dim + 1) * 4
