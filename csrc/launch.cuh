// The thin launch layer: maps a runtime (head_dim, heads-per-block) to a compiled kernel and
// launches it (one kernel per step, split launches included: see combine.cuh).
//
// Compiled shapes: head_dim in kHeadDims, heads-per-block template G in {1, 2, 4, 8} (a block
// with fewer heads uses the next G up). Each dtype's instantiations live in their own file
// under instantiate/ so that nvcc compiles them in parallel.
#pragma once

#include <cuda_runtime.h>

#include "decode_kernel.cuh"

namespace ffa {

constexpr int kHeadDims[] = {32, 64, 80, 96, 128, 256};
constexpr int kMaxHeadsPerBlock = 8;

inline int template_group(int heads_per_block) {
  return heads_per_block <= 1 ? 1 : heads_per_block <= 2 ? 2 : heads_per_block <= 4 ? 4 : 8;
}

template <typename T, int D>
cudaError_t launch_decode_d(const DecodeArgs &a, dim3 grid, int threads, cudaStream_t stream) {
  switch (template_group(a.heads_per_block)) {
    case 1: decode_kernel<T, D, 1><<<grid, threads, threads * ring_bytes_per_thread<1>(), stream>>>(a); break;
    case 2: decode_kernel<T, D, 2><<<grid, threads, threads * ring_bytes_per_thread<2>(), stream>>>(a); break;
    case 4: decode_kernel<T, D, 4><<<grid, threads, threads * ring_bytes_per_thread<4>(), stream>>>(a); break;
    default: decode_kernel<T, D, 8><<<grid, threads, threads * ring_bytes_per_thread<8>(), stream>>>(a); break;
  }
  return cudaGetLastError();
}

// Launches one decode step; `head_dim` must be one of kHeadDims (checked by the caller).
template <typename T>
cudaError_t launch_decode(const DecodeArgs &a, int head_dim, int batch, int kv_heads, int threads,
                          cudaStream_t stream) {
  const dim3 grid(a.split_len > 0 ? a.num_splits : 1, kv_heads * (a.group / a.heads_per_block),
                  batch);
  cudaError_t err;
  switch (head_dim) {
    case 32: err = launch_decode_d<T, 32>(a, grid, threads, stream); break;
    case 64: err = launch_decode_d<T, 64>(a, grid, threads, stream); break;
    case 80: err = launch_decode_d<T, 80>(a, grid, threads, stream); break;
    case 96: err = launch_decode_d<T, 96>(a, grid, threads, stream); break;
    case 128: err = launch_decode_d<T, 128>(a, grid, threads, stream); break;
    default: err = launch_decode_d<T, 256>(a, grid, threads, stream); break;
  }
  return err;
}

// Each dtype is instantiated once, in its own file under instantiate/ (compiled in parallel);
// every other file only links to those instantiations instead of compiling all kernels again.
extern template cudaError_t launch_decode<__half>(const DecodeArgs &, int, int, int, int, cudaStream_t);
extern template cudaError_t launch_decode<__nv_bfloat16>(const DecodeArgs &, int, int, int, int, cudaStream_t);
extern template cudaError_t launch_decode<float>(const DecodeArgs &, int, int, int, int, cudaStream_t);

}  // namespace ffa
