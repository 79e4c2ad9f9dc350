// The C ABI of ffa.h: argument checking that protects memory, then dispatch to launch.cuh.
#include <cuda_runtime.h>
#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>

#include <string>

#include "ffa.h"
#include "launch.cuh"

namespace ffa {
cudaError_t launch_read(const ffa_read_params *p, cudaStream_t stream);  // read.cu
cudaError_t bulk_read_supported(int device, bool &ok);
}  // namespace ffa

#ifndef FFA_VERSION
#error "build with -DFFA_VERSION=\"x.y.z\" (setup.py passes the package version)"
#endif
#define FFA_STR2(...) #__VA_ARGS__
#define FFA_STR(...) FFA_STR2(__VA_ARGS__)

namespace {

thread_local std::string g_last_error;

int fail(int status, const char *fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  g_last_error = buf;
  return status;
}

int64_t dtype_size(int64_t dtype) { return dtype == FFA_F32 ? 4 : 2; }

const char *dtype_name(int64_t dtype) {
  return dtype == FFA_F32 ? "float32" : dtype == FFA_F16 ? "float16" : "bfloat16";
}

int max_heads_per_block(int64_t kernel) { return kernel == ffa::kTma ? ffa::kTmaMaxHeads : ffa::kMaxHeadsPerBlock; }

// The ffa_build_info text, made once from the constants of launch.cuh and decode_tma.cuh.
std::string json_list(const int *xs, size_t n) {
  std::string s = "[";
  for (size_t i = 0; i < n; ++i) s += (i ? ", " : "") + std::to_string(xs[i]);
  return s + "]";
}
std::string json_list(std::initializer_list<int> xs) { return json_list(xs.begin(), xs.size()); }
template <size_t N>
std::string json_list(const int (&xs)[N]) {
  return json_list(xs, N);
}

// "64, 128 or 256": a constant list as the error messages name it.
template <size_t N>
std::string spoken_list(const int (&xs)[N]) {
  std::string s;
  for (size_t i = 0; i < N; ++i) s += (i == 0 ? "" : i + 1 == N ? " or " : ", ") + std::to_string(xs[i]);
  return s;
}

// A compute capability x 10 as JSON's number ("9.0").
std::string capability_text(int capability) {
  char cc[16];
  snprintf(cc, sizeof cc, "%d.%d", capability / 10, capability % 10);
  return cc;
}

std::string kernel_info(const char *name, int code, const char *dtypes, const std::string &head_dims, int capability,
                        int heads) {
  return std::string("\"") + name + "\": {\"code\": " + std::to_string(code) + ", \"dtypes\": " + dtypes +
         ", \"head_dims\": " + head_dims + ", \"compute_capability\": " + capability_text(capability) +
         ", \"max_heads_per_block\": " + std::to_string(heads) + "}";
}

// {"64": threads, ...}: the most consumer threads a TMA block has at each of its head dims.
std::string tma_max_threads_info() {
  std::string s = "{";
  for (int d : ffa::kTmaHeadDims)
    s += (s.size() > 1 ? ", \"" : "\"") + std::to_string(d) + "\": " + std::to_string(ffa::tma_max_threads(d));
  return s + "}";
}

std::string build_info_text() {
  const char *all = "[\"float16\", \"bfloat16\", \"float32\"]", *half = "[\"float16\", \"bfloat16\"]";
  return std::string("{\"version\": \"" FFA_VERSION "\", \"abi\": " FFA_STR(FFA_ABI_VERSION)
                     ", \"archs\": [" FFA_STR(__CUDA_ARCH_LIST__) "], \"dtypes\": ") +
         all + ", \"head_dims\": " + json_list(ffa::kHeadDims) + ", \"threads\": " + json_list(ffa::kThreadCounts) +
         ", \"kernels\": {" +
         kernel_info("cuda_cores", ffa::kCudaCores, all, json_list(ffa::kHeadDims), 0, ffa::kMaxHeadsPerBlock) + ", " +
         kernel_info("tensor_cores", ffa::kTensorCores, half, json_list(ffa::kTensorCoreHeadDims),
                     ffa::kTensorCoreCapability, ffa::kMaxHeadsPerBlock) + ", " +
         kernel_info("tma", ffa::kTma, half, json_list(ffa::kTmaHeadDims), ffa::kTmaCapability, ffa::kTmaMaxHeads) +
         "}, \"tensor_cores\": {\"rows_in_flight_per_warp\": " +
         std::to_string((ffa::kMmaStages - 1) * ffa::kTileRows) +
         "}, \"tma\": {\"stages\": " + json_list({ffa::kTmaMinStages, ffa::kTmaMaxStages}) +
         ", \"tile_rows\": " + json_list({ffa::kTmaTileRowsStep, ffa::kTmaMaxTileRows, ffa::kTmaTileRowsStep}) +
         ", \"max_threads\": " + tma_max_threads_info() + "}, \"launch_features\": {\"kernels\": " +
         json_list(ffa::kFeatureKernels) + ", \"compute_capability\": " + capability_text(ffa::kClusterCapability) +
         ", \"clusters\": " + json_list(ffa::kClusterSizes) + "}, \"cuda_runtime\": " FFA_STR(CUDART_VERSION) "}";
}

int64_t num_splits(const ffa_decode_params *p) {
  return p->split_len > 0 ? (p->max_len + p->split_len - 1) / p->split_len : 1;
}

// The split completion counters come first, one per (sequence, query head): as many as any
// heads_per_block can use, so a workspace shared by several launch configurations keeps them
// at one place, where every launch leaves them zero.
int64_t counter_bytes(const ffa_decode_params *p) { return (p->batch * p->heads * 4 + 15) / 16 * 16; }

int64_t workspace_needed(const ffa_decode_params *p) {
  if (p->split_len == 0) return 0;
  const int64_t rows = p->batch * p->heads * num_splits(p);
  return counter_bytes(p) + (rows * p->head_dim + rows) * 4;  // partial outputs, log-sum-exps
}

// Shapes, dtype and launch fields; everything ffa_workspace_bytes needs too.
int check_shapes(const ffa_decode_params *p) {
  if (!p) return fail(FFA_ERR_INVALID_ARGUMENT, "params is NULL");
  if (p->abi_version != FFA_ABI_VERSION)
    return fail(FFA_ERR_ABI_MISMATCH, "params.abi_version is %lld, this library speaks %d",
                (long long)p->abi_version, FFA_ABI_VERSION);
  if (p->dtype < FFA_F16 || p->dtype > FFA_F32)
    return fail(FFA_ERR_INVALID_ARGUMENT, "dtype code %lld is not 0 (f16), 1 (bf16) or 2 (f32)",
                (long long)p->dtype);
  if (p->batch < 0 || p->batch > 65535)
    return fail(FFA_ERR_INVALID_ARGUMENT, "batch %lld is outside [0, 65535]", (long long)p->batch);
  if (p->heads < 1 || p->kv_heads < 1 || p->heads % p->kv_heads != 0)
    return fail(FFA_ERR_INVALID_ARGUMENT, "heads (%lld) must be a positive multiple of kv_heads (%lld)",
                (long long)p->heads, (long long)p->kv_heads);
  if (!ffa::listed(ffa::kHeadDims, int(p->head_dim)))
    return fail(FFA_ERR_UNSUPPORTED, "head_dim %lld is not compiled (see ffa_build_info)", (long long)p->head_dim);
  if (p->max_len < 1 || p->max_len > (int64_t(1) << 30))
    return fail(FFA_ERR_INVALID_ARGUMENT, "max_len %lld is outside [1, 2^30]", (long long)p->max_len);
  if (!ffa::listed(ffa::kThreadCounts, int(p->threads)))
    return fail(FFA_ERR_INVALID_ARGUMENT, "threads %lld is not %s", (long long)p->threads,
                spoken_list(ffa::kThreadCounts).c_str());
  const int64_t group = p->heads / p->kv_heads;
  if (p->kernel < ffa::kCudaCores || p->kernel > ffa::kTma)
    return fail(FFA_ERR_INVALID_ARGUMENT, "kernel %lld is not 0 (CUDA cores), 1 (tensor cores) or 2 (TMA)",
                (long long)p->kernel);
  const int most = max_heads_per_block(p->kernel);
  if (p->heads_per_block < 1 || p->heads_per_block > most || group % p->heads_per_block != 0)
    return fail(FFA_ERR_INVALID_ARGUMENT,
                "heads_per_block %lld must divide the group size %lld and be at most %d for kernel %lld",
                (long long)p->heads_per_block, (long long)group, most, (long long)p->kernel);
  if (p->heads / p->heads_per_block > 65535)  // the grid's y dimension: one block per head group
    return fail(FFA_ERR_INVALID_ARGUMENT, "heads / heads_per_block = %lld is more than 65535 head groups",
                (long long)(p->heads / p->heads_per_block));
  if (p->split_len < 0 || (p->split_len > 0 && num_splits(p) > 8192))
    return fail(FFA_ERR_INVALID_ARGUMENT, "split_len %lld gives more than 8192 splits of max_len %lld",
                (long long)p->split_len, (long long)p->max_len);
  const int es = int(dtype_size(p->dtype)), hd = int(p->head_dim);
  if ((p->kernel == ffa::kTensorCores && !ffa::has_tensor_core_kernel(es, hd)) ||
      (p->kernel == ffa::kTma && !ffa::has_tma_kernel(es, hd)))
    return fail(FFA_ERR_UNSUPPORTED, "kernel %lld has no %s kernel for head_dim %lld (see ffa_build_info)",
                (long long)p->kernel, dtype_name(p->dtype), (long long)p->head_dim);
  if (p->kernel == ffa::kTma) {
    if (p->stages < ffa::kTmaMinStages || p->stages > ffa::kTmaMaxStages)
      return fail(FFA_ERR_INVALID_ARGUMENT, "stages %lld is outside [%d, %d]", (long long)p->stages,
                  ffa::kTmaMinStages, ffa::kTmaMaxStages);
    if (p->tile_rows < ffa::kTmaTileRowsStep || p->tile_rows > ffa::kTmaMaxTileRows ||
        p->tile_rows % ffa::kTmaTileRowsStep != 0)
      return fail(FFA_ERR_INVALID_ARGUMENT, "tile_rows %lld is not a multiple of %d in [%d, %d]",
                  (long long)p->tile_rows, ffa::kTmaTileRowsStep, ffa::kTmaTileRowsStep, ffa::kTmaMaxTileRows);
  }
  const bool features = ffa::listed(ffa::kFeatureKernels, int(p->kernel));
  if (features) {  // the launch features (pdl, cluster)
    if (p->pdl != 0 && p->pdl != 1) return fail(FFA_ERR_INVALID_ARGUMENT, "pdl %lld is not 0 or 1", (long long)p->pdl);
    if (!ffa::listed(ffa::kClusterSizes, int(p->cluster)))
      return fail(FFA_ERR_INVALID_ARGUMENT, "cluster %lld is not %s", (long long)p->cluster,
                  spoken_list(ffa::kClusterSizes).c_str());
    if (p->cluster != 1 && p->split_len == 0)  // a cluster is of split blocks
      return fail(FFA_ERR_INVALID_ARGUMENT,
                  "cluster %lld needs a split launch (split_len > 0); an unsplit launch has cluster 1",
                  (long long)p->cluster);
  }
  return FFA_OK;
}

int fail_no_kernel_image(int device) {
  return fail(FFA_ERR_NO_KERNEL_IMAGE, "no kernel image for device %d (compiled for " FFA_STR(__CUDA_ARCH_LIST__) ")",
              device);
}

bool aligned16(const void *ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15) == 0; }

int check_tensor(const char *name, const void *ptr, std::initializer_list<int64_t> strides, int64_t vec) {
  if (!ptr) return fail(FFA_ERR_INVALID_ARGUMENT, "%s is NULL", name);
  if (!aligned16(ptr)) return fail(FFA_ERR_INVALID_ARGUMENT, "%s is not 16-byte aligned", name);
  for (int64_t s : strides)
    if (s < 0 || s % vec != 0)
      return fail(FFA_ERR_INVALID_ARGUMENT,
                  "%s has stride %lld; strides must be non-negative multiples of %lld elements",
                  name, (long long)s, (long long)vec);
  return FFA_OK;
}

int check_index(const char *name, const void *ptr, int64_t bits) {
  if (ptr && bits != 32 && bits != 64)
    return fail(FFA_ERR_INVALID_ARGUMENT, "%s_bits is %lld, not 32 or 64", name, (long long)bits);
  if (ptr && !aligned16(ptr) && (reinterpret_cast<uintptr_t>(ptr) % (bits / 8)) != 0)
    return fail(FFA_ERR_INVALID_ARGUMENT, "%s array is misaligned", name);
  return FFA_OK;
}

}  // namespace

__global__ void ffa_probe_kernel() {}

extern "C" {

int64_t ffa_abi_version(void) { return FFA_ABI_VERSION; }

const char *ffa_version(void) { return FFA_VERSION; }

const char *ffa_build_info(void) {
  static const std::string text = build_info_text();
  return text.c_str();
}

const char *ffa_status_string(int status) {
  switch (status) {
    case FFA_OK: return "ok";
    case FFA_ERR_INVALID_ARGUMENT: return "invalid argument";
    case FFA_ERR_UNSUPPORTED: return "unsupported";
    case FFA_ERR_NO_KERNEL_IMAGE: return "no kernel image for this GPU";
    case FFA_ERR_CUDA: return "CUDA error";
    case FFA_ERR_ABI_MISMATCH: return "ABI version mismatch";
    default: return "unknown status";
  }
}

const char *ffa_last_error(void) { return g_last_error.c_str(); }

int ffa_workspace_bytes(const ffa_decode_params *p, int64_t *bytes) {
  if (int st = check_shapes(p)) return st;
  if (!bytes) return fail(FFA_ERR_INVALID_ARGUMENT, "bytes is NULL");
  *bytes = workspace_needed(p);
  return FFA_OK;
}

int ffa_check_device(int device) {
  int previous = 0;
  cudaError_t err = cudaGetDevice(&previous);
  if (err == cudaSuccess) err = cudaSetDevice(device);
  if (err != cudaSuccess) return fail(FFA_ERR_CUDA, "device %d: %s", device, cudaGetErrorString(err));
  cudaFuncAttributes attr;
  err = cudaFuncGetAttributes(&attr, ffa_probe_kernel);
  cudaSetDevice(previous);
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) {
    cudaGetLastError();
    cudaDeviceProp prop;
    int major = 0, minor = 0;
    if (cudaGetDeviceProperties(&prop, device) == cudaSuccess) major = prop.major, minor = prop.minor;
    return fail(FFA_ERR_NO_KERNEL_IMAGE,
                "this FFA build has no code for device %d (sm_%d%d); it was compiled for "
                "compute capabilities " FFA_STR(__CUDA_ARCH_LIST__),
                device, major, minor);
  }
  if (err != cudaSuccess) return fail(FFA_ERR_CUDA, "device %d: %s", device, cudaGetErrorString(err));
  return FFA_OK;
}

int ffa_read(const ffa_read_params *p) {
  if (!p) return fail(FFA_ERR_INVALID_ARGUMENT, "params is NULL");
  if (p->abi_version != FFA_ABI_VERSION)
    return fail(FFA_ERR_ABI_MISMATCH, "params.abi_version is %lld, this library speaks %d",
                (long long)p->abi_version, FFA_ABI_VERSION);
  for (int i = 0; i < FFA_READ_RANGES; ++i) {
    if (!p->ptr[i]) continue;
    if (!aligned16(p->ptr[i]) || p->bytes[i] < 0 || p->bytes[i] % 16 != 0)
      return fail(FFA_ERR_INVALID_ARGUMENT, "range %d must be 16-byte aligned and a multiple of 16 bytes long "
                  "(got %lld bytes)", i, (long long)p->bytes[i]);
  }
  if (p->bulk != 0 && p->bulk != 1)
    return fail(FFA_ERR_INVALID_ARGUMENT, "bulk %lld is not 0 or 1", (long long)p->bulk);
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return fail(FFA_ERR_CUDA, "cudaGetDevice: %s", cudaGetErrorString(err));
  if (p->bulk) {
    bool ok = false;
    err = ffa::bulk_read_supported(device, ok);
    if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction)
      return fail_no_kernel_image(device);
    if (err != cudaSuccess) return fail(FFA_ERR_CUDA, "device %d: %s", device, cudaGetErrorString(err));
    if (!ok) return fail(FFA_ERR_UNSUPPORTED, "bulk copies need compute capability 9.0+ (device %d)", device);
  }
  err = ffa::launch_read(p, static_cast<cudaStream_t>(p->stream));
  if (err != cudaSuccess) return fail(FFA_ERR_CUDA, "read launch on device %d: %s", device, cudaGetErrorString(err));
  return FFA_OK;
}

int ffa_stream_check(void *stream) {
  cudaError_t err = cudaStreamSynchronize(static_cast<cudaStream_t>(stream));
  if (err != cudaSuccess) return fail(FFA_ERR_CUDA, "%s", cudaGetErrorString(err));
  return FFA_OK;
}

int ffa_decode(const ffa_decode_params *p) {
  if (int st = check_shapes(p)) return st;
  if (p->batch == 0) return FFA_OK;
  const int64_t vec = 16 / dtype_size(p->dtype);
  int st;
  if ((st = check_tensor("q", p->q, {p->q_stride_b, p->q_stride_h}, vec)) ||
      (st = check_tensor("new_k", p->new_k, {p->new_k_stride_b, p->new_k_stride_h}, vec)) ||
      (st = check_tensor("new_v", p->new_v, {p->new_v_stride_b, p->new_v_stride_h}, vec)) ||
      (st = check_tensor("k_cache", p->k_cache, {p->k_stride_b, p->k_stride_h, p->k_stride_s}, vec)) ||
      (st = check_tensor("v_cache", p->v_cache, {p->v_stride_b, p->v_stride_h, p->v_stride_s}, vec)) ||
      (st = check_tensor("out", p->out, {p->out_stride_b, p->out_stride_h}, 1)) ||
      (st = check_index("pos", p->pos_ptr, p->pos_bits)) ||
      (st = check_index("start", p->start_ptr, p->start_bits)))
    return st;
  if (!p->pos_ptr && (p->pos_scalar < 0 || p->pos_scalar >= p->max_len))
    return fail(FFA_ERR_INVALID_ARGUMENT, "position %lld is outside the cache [0, %lld)",
                (long long)p->pos_scalar, (long long)p->max_len);
  if (!p->start_ptr && (p->start_scalar < 0 || (!p->pos_ptr && p->start_scalar > p->pos_scalar)))
    return fail(FFA_ERR_INVALID_ARGUMENT, "start %lld is outside [0, position]",
                (long long)p->start_scalar);
  if (!isfinite(p->softmax_scale))
    return fail(FFA_ERR_INVALID_ARGUMENT, "softmax_scale is not finite");
  if (!(p->prune_p >= 0.0 && p->prune_p < 1.0))
    return fail(FFA_ERR_INVALID_ARGUMENT, "prune_p %g is outside [0, 1)", p->prune_p);
  const double cap_log2 = p->softcap * ffa::kLog2e;
  if (p->softcap != 0.0 && !(cap_log2 >= FLT_MIN && cap_log2 <= FLT_MAX))
    return fail(FFA_ERR_INVALID_ARGUMENT, "softcap %g is neither 0 (none) nor a positive number of float32 range",
                p->softcap);
  if (p->sinks && reinterpret_cast<uintptr_t>(p->sinks) % dtype_size(p->dtype))
    return fail(FFA_ERR_INVALID_ARGUMENT, "sinks is not aligned to its %lld-byte elements",
                (long long)dtype_size(p->dtype));
  const int64_t need = workspace_needed(p);
  if (need > 0 && (!p->workspace || p->workspace_bytes < need || !aligned16(p->workspace)))
    return fail(FFA_ERR_INVALID_ARGUMENT,
                "a split launch needs a 16-byte aligned, once-zeroed workspace of %lld bytes (got %lld)",
                (long long)need, (long long)p->workspace_bytes);

  ffa::DecodeArgs a = {};
  a.q = p->q, a.new_k = p->new_k, a.new_v = p->new_v;
  a.k_cache = p->k_cache, a.v_cache = p->v_cache, a.out = p->out;
  a.q_sb = p->q_stride_b, a.q_sh = p->q_stride_h;
  a.nk_sb = p->new_k_stride_b, a.nk_sh = p->new_k_stride_h;
  a.nv_sb = p->new_v_stride_b, a.nv_sh = p->new_v_stride_h;
  a.k_sb = p->k_stride_b, a.k_sh = p->k_stride_h, a.k_ss = p->k_stride_s;
  a.v_sb = p->v_stride_b, a.v_sh = p->v_stride_h, a.v_ss = p->v_stride_s;
  a.o_sb = p->out_stride_b, a.o_sh = p->out_stride_h;
  a.pos_ptr = p->pos_ptr, a.pos_is64 = p->pos_bits == 64, a.pos_scalar = p->pos_scalar;
  a.start_ptr = p->start_ptr, a.start_is64 = p->start_bits == 64, a.start_scalar = p->start_scalar;
  a.scale_log2 = float(p->softmax_scale * ffa::kLog2e);
  a.cap_log2 = float(cap_log2);
  a.inv_cap_log2 = p->softcap != 0.0 ? float(1.0 / cap_log2) : 0.f;
  a.prune_p = float(p->prune_p);
  a.sinks = p->sinks;
  a.heads = int(p->heads), a.group = int(p->heads / p->kv_heads);
  a.heads_per_block = int(p->heads_per_block), a.max_len = int(p->max_len);
  a.split_len = int(p->split_len), a.num_splits = int(num_splits(p));
  a.stages = int(p->stages), a.tile_rows = int(p->tile_rows);
  a.cluster = ffa::listed(ffa::kFeatureKernels, int(p->kernel)) ? int(p->cluster) : 1;  // the others take none
  if (need > 0) {
    a.counters = static_cast<int *>(p->workspace);
    a.part_out = reinterpret_cast<float *>(static_cast<char *>(p->workspace) + counter_bytes(p));
    a.part_lse = a.part_out + p->batch * p->heads * a.num_splits * p->head_dim;
  }

  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return fail(FFA_ERR_CUDA, "cudaGetDevice: %s", cudaGetErrorString(err));
  cudaStream_t stream = static_cast<cudaStream_t>(p->stream);
  const int hd = int(p->head_dim), batch = int(p->batch), kvh = int(p->kv_heads), threads = int(p->threads);
  const int kernel = int(p->kernel);
  const bool pdl = p->pdl != 0;
  err = [&] {
    switch (p->dtype) {
      case FFA_F16: return ffa::launch_decode<__half>(a, hd, batch, kvh, threads, kernel, pdl, stream);
      case FFA_BF16: return ffa::launch_decode<__nv_bfloat16>(a, hd, batch, kvh, threads, kernel, pdl, stream);
      default: return ffa::launch_decode<float>(a, hd, batch, kvh, threads, kernel, pdl, stream);
    }
  }();
  if (err == cudaErrorNotSupported && kernel == ffa::kTensorCores)  // launch_decode_mma's answer
    return fail(FFA_ERR_UNSUPPORTED,
                "tensor_cores: device %d cannot run this launch (it needs compute capability 8.0+, 9.0+ for "
                "pdl or a cluster, and %d bytes of shared memory per block for %d threads of head_dim %d)",
                device, ffa::mma_smem_bytes(hd, threads), threads, hd);
  if (err == cudaErrorNotSupported && kernel == ffa::kTma)  // launch_decode_tma's answer
    return fail(FFA_ERR_UNSUPPORTED,
                "tma: device %d cannot run this launch (it needs compute capability 9.0+, at most %d threads at "
                "head_dim %d, %d bytes of shared memory per block for %d threads, %lld stages of %lld rows, and "
                "cache strides the bulk copy engine accepts)",
                device, ffa::tma_max_threads(hd), hd,
                ffa::tma_smem_bytes(hd, int(dtype_size(p->dtype)), threads, int(p->stages), int(p->tile_rows),
                                    int(p->heads_per_block)),
                threads, (long long)p->stages, (long long)p->tile_rows);
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction)
    return fail_no_kernel_image(device);
  if (err != cudaSuccess) return fail(FFA_ERR_CUDA, "kernel launch on device %d: %s", device, cudaGetErrorString(err));
  return FFA_OK;
}

}  // extern "C"
