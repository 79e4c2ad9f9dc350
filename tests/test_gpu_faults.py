"""A GPU fault inside FFA's kernel surfaces as an FFAError that says it came from FFA (with
FFA_DEBUG_SYNC=1), not as an anonymous CUDA error later. Each case runs in its own process:
a fault leaves the CUDA context unusable."""

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.gpu

# A decode whose cache pointer is valid-looking (aligned) but unmapped: every guard in the C
# layer passes, and the kernel's first read faults.
FAULTING_DECODE = textwrap.dedent("""
    import torch
    from ffa import _lib, ops
    q = torch.randn(1, 4, 64, device="cuda", dtype=torch.float16)
    kc = torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.float16)
    out = torch.empty_like(q)
    P = _lib.DecodeParams(abi_version=_lib.ABI_VERSION, dtype=0, batch=1, heads=4, kv_heads=4, head_dim=64,
        max_len=64, q=q.data_ptr(), q_stride_b=256, q_stride_h=64, new_k=q.data_ptr(), new_k_stride_b=256,
        new_k_stride_h=64, new_v=q.data_ptr(), new_v_stride_b=256, new_v_stride_h=64,
        k_cache=1 << 47, k_stride_b=16384, k_stride_h=4096, k_stride_s=64,
        v_cache=kc.data_ptr(), v_stride_b=16384, v_stride_h=4096, v_stride_s=64,
        out=out.data_ptr(), out_stride_b=256, out_stride_h=64, pos_scalar=10, start_scalar=0,
        softmax_scale=0.125, threads=128, heads_per_block=1, split_len=0,
        stream=torch.cuda.current_stream().cuda_stream)
    try:
        _lib.decode(P)
        torch.cuda.synchronize()
    except Exception as e:
        print(type(e).__name__, e)
""")


def run(env):
    return subprocess.run([sys.executable, "-c", FAULTING_DECODE], capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=120)


def test_fault_in_ffa_kernel_is_attributed_with_debug_sync():
    done = run({"FFA_DEBUG_SYNC": "1"})
    assert "FFAError FFA's decode kernel failed on the GPU" in done.stdout, done.stdout + done.stderr


def test_fault_without_debug_sync_still_raises():
    done = run({"FFA_DEBUG_SYNC": "0"})
    assert "Error" in done.stdout and "illegal" in done.stdout.lower(), done.stdout + done.stderr
