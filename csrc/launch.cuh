// The thin launch layer: maps a runtime (head_dim, heads-per-block) to a compiled kernel and
// launches it (one kernel per step, split launches included: see combine.cuh).
//
// Compiled shapes: head_dim in kHeadDims, heads-per-block template G in {1, 2, 4, 8} (a block
// with fewer heads uses the next G up) on CUDA cores (decode_kernel.cuh); on tensor cores
// (decode_mma.cuh, one kernel for up to 8 heads) fp16 / bf16 with head_dim 64 or 128. Each
// dtype's instantiations live in their own file under instantiate/ so that nvcc compiles them
// in parallel.
#pragma once

#include <cuda_runtime.h>

#include <atomic>

#include "decode_kernel.cuh"
#include "decode_mma.cuh"

namespace ffa {

constexpr int kHeadDims[] = {32, 64, 80, 96, 128, 256};
constexpr int kMaxHeadsPerBlock = 8;

static_assert(kHeads >= kMaxHeadsPerBlock, "a tensor-core block holds its heads in the 8 columns of one tile");
constexpr int kMaxDevices = 64;

inline int template_group(int heads_per_block) {
  return heads_per_block <= 1 ? 1 : heads_per_block <= 2 ? 2 : heads_per_block <= 4 ? 4 : 8;
}

constexpr bool has_tensor_core_kernel(int dtype_bytes, int head_dim) {
  return dtype_bytes == 2 && (head_dim == 64 || head_dim == 128);
}

// The most dynamic shared memory a tensor-core block may use on the current device, -1 where
// the device has no mma.m16n8k16 (compute capability below 8.0) or the kernel's code was built
// for an older architecture (PTX of sm_75 JIT-compiled for a newer GPU: the mma instructions
// are compiled out). Found once per device and kernel, when the kernel is also allowed that
// much (past the default 48 KB).
template <typename T, int D, bool kPrune>
cudaError_t mma_smem_limit(int device, int &limit) {
  static std::atomic<int> known[kMaxDevices];  // 0: not yet asked; every thread finds the same value
  if (device < kMaxDevices && (limit = known[device].load()) != 0) return cudaSuccess;
  const auto kernel = decode_mma_kernel<T, D, kPrune>;
  int major = 0, optin = 0;
  cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  cudaFuncAttributes attr;
  if (err == cudaSuccess && major >= 8) err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return err;
  limit = major >= 8 && attr.ptxVersion >= 80 ? optin - int(attr.sharedSizeBytes) : -1;
  if (limit > 0) err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit);
  if (err == cudaSuccess && device < kMaxDevices) known[device].store(limit);
  return err;
}

// cudaErrorNotSupported: the device cannot run this tensor-core launch (reported by ffa_api.cu
// as FFA_ERR_UNSUPPORTED).
template <typename T, int D, bool kPrune>
cudaError_t launch_decode_mma(const DecodeArgs &a, dim3 grid, int threads, cudaStream_t stream) {
  int device = 0, limit = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = mma_smem_limit<T, D, kPrune>(device, limit);
  if (err != cudaSuccess) return err;
  const int bytes = mma_smem_bytes(D, threads);
  if (bytes > limit) return cudaErrorNotSupported;
  decode_mma_kernel<T, D, kPrune><<<grid, threads, bytes, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_decode_d(const DecodeArgs &a, dim3 grid, int threads, bool tensor_cores, cudaStream_t stream) {
  if constexpr (has_tensor_core_kernel(sizeof(T), D))
    if (tensor_cores)
      return a.prune_p > 0.f ? launch_decode_mma<T, D, true>(a, grid, threads, stream)
                             : launch_decode_mma<T, D, false>(a, grid, threads, stream);
  switch (template_group(a.heads_per_block)) {
    case 1: decode_kernel<T, D, 1><<<grid, threads, threads * ring_bytes_per_thread<1>(), stream>>>(a); break;
    case 2: decode_kernel<T, D, 2><<<grid, threads, threads * ring_bytes_per_thread<2>(), stream>>>(a); break;
    case 4: decode_kernel<T, D, 4><<<grid, threads, threads * ring_bytes_per_thread<4>(), stream>>>(a); break;
    default: decode_kernel<T, D, 8><<<grid, threads, threads * ring_bytes_per_thread<8>(), stream>>>(a); break;
  }
  return cudaGetLastError();
}

// Launches one decode step; `head_dim` must be one of kHeadDims, and `tensor_cores` only set
// where has_tensor_core_kernel and the device allow it (checked by the caller).
template <typename T>
cudaError_t launch_decode(const DecodeArgs &a, int head_dim, int batch, int kv_heads, int threads,
                          bool tensor_cores, cudaStream_t stream) {
  const dim3 grid(a.split_len > 0 ? a.num_splits : 1, kv_heads * (a.group / a.heads_per_block),
                  batch);
  cudaError_t err;
  switch (head_dim) {
    case 32: err = launch_decode_d<T, 32>(a, grid, threads, tensor_cores, stream); break;
    case 64: err = launch_decode_d<T, 64>(a, grid, threads, tensor_cores, stream); break;
    case 80: err = launch_decode_d<T, 80>(a, grid, threads, tensor_cores, stream); break;
    case 96: err = launch_decode_d<T, 96>(a, grid, threads, tensor_cores, stream); break;
    case 128: err = launch_decode_d<T, 128>(a, grid, threads, tensor_cores, stream); break;
    default: err = launch_decode_d<T, 256>(a, grid, threads, tensor_cores, stream); break;
  }
  return err;
}

// Each dtype is instantiated once, in its own file under instantiate/ (compiled in parallel);
// every other file only links to those instantiations instead of compiling all kernels again.
extern template cudaError_t launch_decode<__half>(const DecodeArgs &, int, int, int, int, bool, cudaStream_t);
extern template cudaError_t launch_decode<__nv_bfloat16>(const DecodeArgs &, int, int, int, int, bool, cudaStream_t);
extern template cudaError_t launch_decode<float>(const DecodeArgs &, int, int, int, int, bool, cudaStream_t);

}  // namespace ffa
