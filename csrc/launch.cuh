// The thin launch layer: maps a runtime (head_dim, heads-per-block) to a compiled kernel and
// launches it (one kernel per step, split launches included: see combine.cuh).
//
// Compiled shapes: head_dim in kHeadDims, heads-per-block template G in {1, 2, 4, 8} (a block
// with fewer heads uses the next G up) on CUDA cores (decode_kernel.cuh); on tensor cores
// (decode_mma.cuh, one kernel for up to 8 heads) fp16 / bf16 with head_dim 64 or 128; on the
// bulk copy engine and tensor cores (decode_tma.cuh, up to 32 heads, compute capability 9.0+)
// fp16 / bf16 with head_dim 64, 128 or 256, its caches described by tensor maps made here per
// launch. Each dtype's instantiations live in their own file under instantiate/ so that nvcc
// compiles them in parallel.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled

#include <atomic>

#include "decode_kernel.cuh"
#include "decode_mma.cuh"
#include "decode_tma.cuh"

namespace ffa {

constexpr int kHeadDims[] = {32, 64, 80, 96, 128, 256, 512};
constexpr int kThreadCounts[] = {64, 128, 256};  // threads per block (the TMA kernel: consumer threads)
constexpr int kMaxHeadsPerBlock = 8;

static_assert(kHeads >= kMaxHeadsPerBlock, "a tensor-core block holds its heads in the 8 columns of one tile");
constexpr int kMaxDevices = 64;

inline int template_group(int heads_per_block) {
  return heads_per_block <= 1 ? 1 : heads_per_block <= 2 ? 2 : heads_per_block <= 4 ? 4 : 8;
}

// The kernels of the kernel field (ffa.h's ffa_kernel) and where each one exists. These, kHeadDims
// and the limits below are what ffa_build_info reports; Python reads them from there.
enum Kernel { kCudaCores = 0, kTensorCores = 1, kTma = 2 };
constexpr int kTensorCoreHeadDims[] = {64, 128};
constexpr int kTmaHeadDims[] = {64, 128, 256};
constexpr int kTensorCoreCapability = 80, kTmaCapability = 90;  // compute capability x 10
constexpr int kTmaThreads = 32;  // the producer warp, on top of the launch's (consumer) threads
// The kernels that take the launch features (pdl, cluster) on kClusterCapability and newer.
constexpr int kFeatureKernels[] = {kTensorCores, kTma};

template <int N>
constexpr bool listed(const int (&list)[N], int x) {
  for (int v : list)
    if (v == x) return true;
  return false;
}
constexpr bool has_tensor_core_kernel(int dtype_bytes, int head_dim) {
  return dtype_bytes == 2 && listed(kTensorCoreHeadDims, head_dim);
}
constexpr bool has_tma_kernel(int dtype_bytes, int head_dim) {
  return dtype_bytes == 2 && listed(kTmaHeadDims, head_dim);
}

// The compute capability of `device` (x 10), found once per device.
inline cudaError_t device_capability(int device, int &capability) {
  static std::atomic<int> known[kMaxDevices];
  if (device < kMaxDevices && (capability = known[device].load()) != 0) return cudaSuccess;
  int major = 0, minor = 0;
  cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  capability = 10 * major + minor;
  if (err == cudaSuccess && device < kMaxDevices) known[device].store(capability);
  return err;
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
  int capability = 0, optin = 0;
  cudaError_t err = device_capability(device, capability);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  cudaFuncAttributes attr;
  const bool runs = capability >= kTensorCoreCapability;
  if (err == cudaSuccess && runs) err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return err;
  limit = runs && attr.ptxVersion >= kTensorCoreCapability ? optin - int(attr.sharedSizeBytes) : -1;
  if (limit > 0) err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit);
  if (err == cudaSuccess && device < kMaxDevices) known[device].store(limit);
  return err;
}

// Launches `kernel` (its first argument the DecodeArgs `a`) on `device`, the current one, with
// programmatic dependent launch when `pdl`, and in thread block clusters of a.cluster split blocks:
// the splits rounded up to whole clusters (the blocks past the last split have no positions and take
// part in their cluster's merge only). cudaErrorNotSupported: either is asked for on a device older
// than kClusterCapability.
template <typename... Params, typename... Args>
cudaError_t launch_with_features(void (*kernel)(Params...), int device, dim3 grid, int threads, int smem_bytes,
                                 bool pdl, cudaStream_t stream, const DecodeArgs &a, const Args &...rest) {
  if (pdl || a.cluster > 1) {
    int capability = 0;
    const cudaError_t err = device_capability(device, capability);
    if (err != cudaSuccess) return err;
    if (capability < kClusterCapability) return cudaErrorNotSupported;
  }
  cudaLaunchAttribute attr[2];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = pdl ? 1 : 0;
  attr[1].id = cudaLaunchAttributeClusterDimension;
  attr[1].val.clusterDim.x = a.cluster, attr[1].val.clusterDim.y = 1, attr[1].val.clusterDim.z = 1;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3((grid.x + a.cluster - 1) / a.cluster * a.cluster, grid.y, grid.z);
  config.blockDim = dim3(threads), config.dynamicSmemBytes = smem_bytes;
  config.stream = stream, config.attrs = attr;
  config.numAttrs = a.cluster > 1 ? 2 : pdl ? 1 : 0;
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, a, rest...);
  return err == cudaSuccess ? cudaGetLastError() : err;
}

// cudaErrorNotSupported: the device cannot run this tensor-core launch (reported by ffa_api.cu
// as FFA_ERR_UNSUPPORTED).
template <typename T, int D, bool kPrune>
cudaError_t launch_decode_mma(const DecodeArgs &a, dim3 grid, int threads, bool pdl, cudaStream_t stream) {
  int device = 0, limit = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = mma_smem_limit<T, D, kPrune>(device, limit);
  if (err != cudaSuccess) return err;
  const int bytes = mma_smem_bytes(D, threads);
  if (bytes > limit) return cudaErrorNotSupported;
  return launch_with_features(decode_mma_kernel<T, D, kPrune>, device, grid, threads, bytes, pdl, stream, a);
}

// The most dynamic shared memory a TMA block may use on the current device, -1 where the device
// is older than compute capability 9.0 or the kernel was built for an older one (as mma_smem_limit).
template <typename T, int D>
cudaError_t tma_smem_limit(int device, int &limit) {
  static std::atomic<int> known[kMaxDevices];
  if (device < kMaxDevices && (limit = known[device].load()) != 0) return cudaSuccess;
  const auto kernel = decode_tma_kernel<T, D>;
  int capability = 0, optin = 0;
  cudaError_t err = device_capability(device, capability);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  cudaFuncAttributes attr;
  const bool runs = capability >= kTmaCapability;
  if (err == cudaSuccess && runs) err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return err;
  limit = runs && attr.ptxVersion >= kTmaCapability ? optin - int(attr.sharedSizeBytes) : -1;
  if (limit > 0) err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit);
  if (err == cudaSuccess && device < kMaxDevices) known[device].store(limit);
  return err;
}

// The driver's tensor-map encoder (found once through the runtime: the library links no libcuda).
inline cudaError_t tensor_map_encoder(PFN_cuTensorMapEncodeTiled_v12000 &encode) {
  static std::atomic<PFN_cuTensorMapEncodeTiled_v12000> found{nullptr};
  if ((encode = found.load())) return cudaSuccess;
  void *fn = nullptr;
  cudaDriverEntryPointQueryResult status;
  cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status);
  if (err == cudaSuccess && (status != cudaDriverEntryPointSuccess || !fn)) err = cudaErrorNotSupported;
  if (err != cudaSuccess) return err;
  encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  found.store(encode);
  return cudaSuccess;
}

// The tensor map of one cache [batch, kv_heads, max_len, D] (strides in elements) whose boxes are
// decode_tma.cuh's: kBoxBytes of a row x `rows` rows, 128-byte swizzled, zeros past max_len. L2
// promotion is 128 bytes, one box row: 256-byte promotion makes the first of two boxes that share a
// 256-byte span (the two halves of a row at head_dim 128, two rows at 64) fetch both, and the
// second come through L2 again (bench/results/kernel-tma-loader-h200.md). A dimension of size 1
// gets a contiguous stride (its stride is never used). cudaErrorNotSupported: the driver refused
// the strides.
template <typename T, int D>
cudaError_t cache_tensor_map(CUtensorMap &map, const void *cache, int64_t max_len, int kv_heads, int batch,
                             int64_t ss, int64_t sh, int64_t sb, int rows) {
  PFN_cuTensorMapEncodeTiled_v12000 encode;
  if (cudaError_t err = tensor_map_encoder(encode)) return err;
  const cuuint64_t es = sizeof(T);
  const cuuint64_t dims[4] = {cuuint64_t(D), cuuint64_t(max_len), cuuint64_t(kv_heads), cuuint64_t(batch)};
  cuuint64_t strides[3] = {cuuint64_t(ss) * es, cuuint64_t(sh) * es, cuuint64_t(sb) * es};
  if (kv_heads == 1) strides[1] = strides[0] * dims[1];
  if (batch == 1) strides[2] = strides[1] * dims[2];
  const cuuint32_t box[4] = {cuuint32_t(kBoxBytes / es), cuuint32_t(rows), 1, 1}, unit[4] = {1, 1, 1, 1};
  const auto type = std::is_same<T, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const CUresult res = encode(&map, type,
                              4, const_cast<void *>(cache), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                              CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                              CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return res == CUDA_SUCCESS ? cudaSuccess : cudaErrorNotSupported;
}

// cudaErrorNotSupported: the device or the caches' strides do not allow this TMA launch (reported
// by ffa_api.cu as FFA_ERR_UNSUPPORTED).
template <typename T, int D>
cudaError_t launch_decode_tma(const DecodeArgs &a, dim3 grid, int batch, int kv_heads, int threads, bool pdl,
                              cudaStream_t stream) {
  int device = 0, limit = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = tma_smem_limit<T, D>(device, limit);
  if (err != cudaSuccess) return err;
  const int bytes = tma_smem_bytes(D, sizeof(T), threads, a.stages, a.tile_rows, a.heads_per_block);
  if (bytes > limit || threads > tma_max_threads(D)) return cudaErrorNotSupported;
  CUtensorMap kmap, vmap;
  err = cache_tensor_map<T, D>(kmap, a.k_cache, a.max_len, kv_heads, batch, a.k_ss, a.k_sh, a.k_sb, a.tile_rows);
  if (err == cudaSuccess)
    err = cache_tensor_map<T, D>(vmap, a.v_cache, a.max_len, kv_heads, batch, a.v_ss, a.v_sh, a.v_sb, a.tile_rows);
  if (err != cudaSuccess) return err;
  return launch_with_features(decode_tma_kernel<T, D>, device, grid, threads + kTmaThreads, bytes, pdl, stream, a, kmap,
                              vmap);
}

template <typename T, int D>
cudaError_t launch_decode_d(const DecodeArgs &a, dim3 grid, int batch, int kv_heads, int threads, int kernel,
                            bool pdl, cudaStream_t stream) {
  if constexpr (has_tma_kernel(sizeof(T), D))
    if (kernel == kTma) return launch_decode_tma<T, D>(a, grid, batch, kv_heads, threads, pdl, stream);
  if constexpr (has_tensor_core_kernel(sizeof(T), D))
    if (kernel == kTensorCores)
      return a.prune_p > 0.f ? launch_decode_mma<T, D, true>(a, grid, threads, pdl, stream)
                             : launch_decode_mma<T, D, false>(a, grid, threads, pdl, stream);
  switch (template_group(a.heads_per_block)) {
    case 1: decode_kernel<T, D, 1><<<grid, threads, threads * ring_bytes_per_thread<1>(), stream>>>(a); break;
    case 2: decode_kernel<T, D, 2><<<grid, threads, threads * ring_bytes_per_thread<2>(), stream>>>(a); break;
    case 4: decode_kernel<T, D, 4><<<grid, threads, threads * ring_bytes_per_thread<4>(), stream>>>(a); break;
    default: decode_kernel<T, D, 8><<<grid, threads, threads * ring_bytes_per_thread<8>(), stream>>>(a); break;
  }
  return cudaGetLastError();
}

// Launches one decode step; `head_dim` must be one of kHeadDims, and `kernel` one that exists for
// this dtype and head_dim (checked by the caller; the device is checked here).
template <typename T>
cudaError_t launch_decode(const DecodeArgs &a, int head_dim, int batch, int kv_heads, int threads, int kernel,
                          bool pdl, cudaStream_t stream) {
  const dim3 grid(a.split_len > 0 ? a.num_splits : 1, kv_heads * (a.group / a.heads_per_block), batch);
  switch (head_dim) {
    case 32: return launch_decode_d<T, 32>(a, grid, batch, kv_heads, threads, kernel, pdl, stream);
    case 64: return launch_decode_d<T, 64>(a, grid, batch, kv_heads, threads, kernel, pdl, stream);
    case 80: return launch_decode_d<T, 80>(a, grid, batch, kv_heads, threads, kernel, pdl, stream);
    case 96: return launch_decode_d<T, 96>(a, grid, batch, kv_heads, threads, kernel, pdl, stream);
    case 128: return launch_decode_d<T, 128>(a, grid, batch, kv_heads, threads, kernel, pdl, stream);
    case 256: return launch_decode_d<T, 256>(a, grid, batch, kv_heads, threads, kernel, pdl, stream);
    default: return launch_decode_d<T, 512>(a, grid, batch, kv_heads, threads, kernel, pdl, stream);
  }
}

// Each dtype is instantiated once, in its own file under instantiate/ (compiled in parallel);
// every other file only links to those instantiations instead of compiling all kernels again.
#define FFA_LAUNCH_DECODE(T) \
  cudaError_t launch_decode<T>(const DecodeArgs &, int, int, int, int, int, bool, cudaStream_t)
extern template FFA_LAUNCH_DECODE(__half);
extern template FFA_LAUNCH_DECODE(__nv_bfloat16);
extern template FFA_LAUNCH_DECODE(float);

}  // namespace ffa
