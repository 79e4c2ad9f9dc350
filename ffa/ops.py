"""The `ffa::decode` custom op: CUDA tensors go to the native library, CPU tensors to the
reference. Registered through torch.library so that it runs on the current stream, can be
captured in CUDA graphs and traced by torch.compile (the fake implementation gives shapes).

FastForwardAttn's eager CUDA calls skip the op and its 3-D views: they call `cuda_decode`
with a `launch_params` struct they keep per head count and launch, which is the cheapest way
from Python to the kernel (an eager decode step is short enough for host time to dominate).

Arguments are assumed valid (attention.py checks them); the library re-checks everything
that protects memory.
"""

from typing import List, Optional

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import _lib
from .launch import LaunchConfig, library_facts
from .reference import decode_reference

_DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def _positions(tensor, scalar, batch, device):
    if tensor is None:
        return torch.full((batch,), scalar, dtype=torch.int64, device=device)
    return tensor.to(device=device, dtype=torch.int64)


def _rows(x, vec):
    """The rows of x ([batch, heads, head_dim] or [batch, heads, 1, head_dim]) as the kernel
    reads them: (tensor, pointer, batch stride, head stride). x's own when its rows are aligned
    vectors of `vec` elements (16 bytes), else those of a contiguous copy, which the caller
    holds until the launch is queued (a copy freed before could be handed out again at once)."""
    stride, ptr = x.stride(), x.data_ptr()
    if stride[-1] != 1 or ptr % 16 or stride[0] % vec or stride[1] % vec:
        x = x.clone(memory_format=torch.contiguous_format)
        stride, ptr = x.stride(), x.data_ptr()
    return x, ptr, stride[0], stride[1]


def launch_params(k_cache, v_cache, heads, config, workspace):
    """The DecodeParams fields that stay fixed from step to step for one cache, query head
    count, launch (a LaunchConfig) and workspace; `cuda_decode` fills in the rest. It holds the tensors it
    points into, so that they live as long as it does."""
    batch, kv_heads, max_len, head_dim = k_cache.shape
    params = _lib.DecodeParams(
        abi_version=_lib.ABI_VERSION, dtype=_lib.DTYPE_CODES[_DTYPE_NAMES[k_cache.dtype]],
        batch=batch, heads=heads, kv_heads=kv_heads, head_dim=head_dim, max_len=max_len,
        k_cache=k_cache.data_ptr(), k_stride_b=k_cache.stride(0), k_stride_h=k_cache.stride(1),
        k_stride_s=k_cache.stride(2),
        v_cache=v_cache.data_ptr(), v_stride_b=v_cache.stride(0), v_stride_h=v_cache.stride(1),
        v_stride_s=v_cache.stride(2),
        threads=config.threads, heads_per_block=config.heads_per_block, split_len=config.split_len,
        kernel=library_facts()["kernels"][config.kernel]["code"], stages=config.stages, tile_rows=config.tile_rows,
        pdl=int(config.pdl), cluster=config.cluster,
        workspace=workspace.data_ptr() if workspace.numel() else None,
        workspace_bytes=workspace.numel() * workspace.element_size(),
    )
    params.tensors = (k_cache, v_cache, workspace)
    return params


def cuda_decode(fixed, out, q, new_k, new_v, pos, pos_int, start, start_int, scale, p, softcap, sinks=None):
    """Queue one decode step on the current stream of q's device: a copy of `fixed` (from
    launch_params) completed with this step's tensors and numbers. A copy, not `fixed` itself:
    the library call releases the GIL, and another thread's step must not rewrite the struct
    under it. q, new_k and new_v may keep their position dimension ([batch, heads, 1,
    head_dim]): the kernel reads rows through their batch and head strides, so no view is made.
    softcap 0: logits not capped; sinks: None, or [heads] contiguous of q's dtype."""
    P = _lib.DecodeParams.from_buffer_copy(fixed)
    vec = 16 // q.element_size()
    q, P.q, P.q_stride_b, P.q_stride_h = _rows(q, vec)
    new_k, P.new_k, P.new_k_stride_b, P.new_k_stride_h = _rows(new_k, vec)
    new_v, P.new_v, P.new_v_stride_b, P.new_v_stride_h = _rows(new_v, vec)
    out_stride = out.stride()
    P.out, P.out_stride_b, P.out_stride_h = out.data_ptr(), out_stride[0], out_stride[1]
    if pos is not None:
        P.pos_ptr, P.pos_bits = pos.data_ptr(), pos.element_size() * 8
    if start is not None:
        P.start_ptr, P.start_bits = start.data_ptr(), start.element_size() * 8
    P.pos_scalar, P.start_scalar, P.softmax_scale, P.prune_p, P.softcap = pos_int, start_int, scale, p, softcap
    if sinks is not None:
        P.sinks = sinks.data_ptr()
    # torch's raw bindings, as Inductor's generated code uses them: torch.cuda.current_stream
    # builds a Stream object, which costs microseconds per call.
    device = q.get_device()
    P.stream = torch._C._cuda_getCurrentRawStream(device)
    if device != torch._C._cuda_getDevice():
        with torch.cuda.device(device):
            _lib.decode(P)
    else:
        _lib.decode(P)


def decode_into(out: torch.Tensor, q: torch.Tensor, new_k: torch.Tensor, new_v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor, pos: Optional[torch.Tensor], pos_int: int,
                start: Optional[torch.Tensor], start_int: int, scale: float, p: float, softcap: float,
                sinks: Optional[torch.Tensor], launch: List[int], workspace: torch.Tensor) -> None:
    """One decode step (see reference.py for the semantics; softcap 0: none; sinks None: none), written
    into `out` [batch, heads, head_dim]; launch: LaunchConfig.fields()."""
    if q.is_cuda:
        config = LaunchConfig.from_fields(launch)
        fixed = launch_params(k_cache, v_cache, q.shape[1], config, workspace)
        cuda_decode(fixed, out, q, new_k, new_v, pos, pos_int, start, start_int, scale, p, softcap, sinks)
        return
    batch = q.shape[0]
    out.copy_(decode_reference(q, new_k, new_v, k_cache, v_cache,
                               _positions(pos, pos_int, batch, q.device),
                               _positions(start, start_int, batch, q.device), scale, p, softcap, sinks))


# SDPA backends in the order sdpa_decode_into tries them: a boolean mask rules flash attention out.
SDPA_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                 SDPBackend.MATH]


def sdpa_decode_into(out, q, new_k, new_v, k_cache, v_cache, pos, pos_int, start, start_int, scale):
    """What a static-cache decode step runs instead of FFA's kernel (FastForwardAttn's
    kernel="sdpa"): new_k/new_v copied into the cache at each sequence's position (two
    index_put), then torch's SDPA over the whole cache with a mask of positions start .. pos,
    native grouped-query heads, the backends tried in SDPA_PRIORITY order. The same step as
    decode_into with p = 0, within rounding; positions must lie in the cache. (sdpa_kernel's
    priority order needs a torch that has its set_priority argument.)"""
    batch, heads, head_dim = out.shape
    device = q.device
    pos, start = _positions(pos, pos_int, batch, device), _positions(start, start_int, batch, device)
    rows = torch.arange(batch, device=device)
    k_cache[rows, :, pos] = new_k
    v_cache[rows, :, pos] = new_v
    positions = torch.arange(k_cache.shape[2], device=device)
    mask = (positions >= start[:, None]) & (positions <= pos[:, None])
    with sdpa_kernel(SDPA_PRIORITY, set_priority=True):
        o = torch.nn.functional.scaled_dot_product_attention(
            q.reshape(batch, heads, 1, head_dim), k_cache, v_cache, attn_mask=mask[:, None, None, :], scale=scale,
            enable_gqa=heads != k_cache.shape[1])
    out.copy_(o.reshape(batch, heads, head_dim))


# The registered op, for torch.compile and export. Eager calls bypass it (FastForwardAttn calls
# cuda_decode, or decode_into on CPU): the dispatcher adds tens of microseconds per call, more
# than a small decode step takes.
decode = torch.library.custom_op("ffa::decode", decode_into, mutates_args=("out", "k_cache", "v_cache", "workspace"))


@decode.register_fake
def _(out, q, new_k, new_v, k_cache, v_cache, pos, pos_int, start, start_int, scale, p, softcap, sinks, launch,
      workspace):
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
