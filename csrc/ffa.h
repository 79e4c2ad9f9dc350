/* FastForwardAttention: the plain C ABI of the native library.
 *
 * One call, ffa_decode, appends one new key/value row per sequence into a preallocated
 * cache and computes decode attention for every query head. Everything is passed as raw
 * device pointers, element strides and small integers, so the library links no libtorch
 * and one build serves every Python and PyTorch version.
 *
 * Every function returns an ffa_status; ffa_last_error() gives a sentence about the most
 * recent failure on the calling thread. FFA_ABI_VERSION changes whenever this struct or
 * the meaning of a field changes: callers check ffa_abi_version() before the first call.
 */
#ifndef FFA_H_
#define FFA_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FFA_ABI_VERSION 9

#if defined(__GNUC__)
#define FFA_API __attribute__((visibility("default")))
#else
#define FFA_API
#endif

typedef enum {
  FFA_OK = 0,
  FFA_ERR_INVALID_ARGUMENT = 1, /* a shape, stride, dtype or launch field is out of range */
  FFA_ERR_UNSUPPORTED = 2,      /* valid request that this build has no kernel for */
  FFA_ERR_NO_KERNEL_IMAGE = 3,  /* the GPU's architecture is not compiled into the library */
  FFA_ERR_CUDA = 4,             /* the CUDA runtime reported an error */
  FFA_ERR_ABI_MISMATCH = 5      /* params.abi_version differs from FFA_ABI_VERSION */
} ffa_status;

typedef enum { FFA_F16 = 0, FFA_BF16 = 1, FFA_F32 = 2 } ffa_dtype;

/* Which decode kernel a launch runs; ffa_build_info says where each exists. */
typedef enum {
  FFA_KERNEL_CUDA_CORES = 0,   /* every dtype and head_dim, any GPU */
  FFA_KERNEL_TENSOR_CORES = 1, /* mma on compute capability 8.0+, fp16/bf16 */
  FFA_KERNEL_TMA = 2           /* bulk copy engine + mma on compute capability 9.0+, fp16/bf16 */
} ffa_kernel;

/* One decode step. Strides are in elements; the last dimension (head_dim) is contiguous.
 *   q:        [batch, heads, head_dim]
 *   new_k/v:  [batch, kv_heads, head_dim]
 *   k/v_cache:[batch, kv_heads, max_len, head_dim]
 *   out:      [batch, heads, head_dim]
 * Sequence b attends over cache positions start[b] .. pos[b] inclusive, after new_k/v[b]
 * have been written at pos[b]. pos and start come from device arrays of int32 or int64
 * (pos_ptr/start_ptr, read by the kernel, so a captured CUDA graph sees new values on
 * replay) or, when the pointer is NULL, from the scalar fields. */
typedef struct {
  int64_t abi_version;
  int64_t dtype; /* ffa_dtype of q, new_k, new_v, caches and out */
  int64_t batch, heads, kv_heads, head_dim, max_len;

  const void *q;
  int64_t q_stride_b, q_stride_h;
  const void *new_k;
  int64_t new_k_stride_b, new_k_stride_h;
  const void *new_v;
  int64_t new_v_stride_b, new_v_stride_h;
  void *k_cache;
  int64_t k_stride_b, k_stride_h, k_stride_s;
  void *v_cache;
  int64_t v_stride_b, v_stride_h, v_stride_s;
  void *out;
  int64_t out_stride_b, out_stride_h;

  const void *pos_ptr;   /* [batch] int32/int64 on the device, or NULL */
  int64_t pos_bits;      /* 32 or 64 when pos_ptr is set */
  int64_t pos_scalar;    /* used when pos_ptr is NULL */
  const void *start_ptr; /* [batch] int32/int64 on the device, or NULL */
  int64_t start_bits;
  int64_t start_scalar;

  double softmax_scale;
  double prune_p; /* 0 <= p < 1; positions whose softmax weight is proven below p skip V */
  double softcap; /* 0: none. > 0: every logit s = softmax_scale * q.k becomes softcap * tanh(s / softcap)
                     before the softmax (attention-logit softcapping); softcap * log2(e) must be a
                     normal float32 */
  const void *sinks; /* NULL: none. Else [heads] attention sinks of dtype `dtype`, contiguous: head h's logit sinks[h]
                        (natural units, taken as is: neither scaled nor capped) joins the softmax's denominator
                        without a value row, out = sum_i e^(s_i) v_i / (sum_i e^(s_i) + e^(sinks[h])) (gpt-oss) */

  /* Launch configuration. split_len == 0: one block covers all positions of a sequence.
   * split_len > 0: blocks of split_len positions, combined exactly by the last block of each
   * head group to finish; the grid has ceil(max_len / split_len) splits, fixed by static
   * sizes only. */
  int64_t threads;         /* 64, 128 or 256 (FFA_KERNEL_TMA: the consumer threads; one producer warp is added) */
  int64_t heads_per_block; /* query heads sharing one K/V read; divides heads/kv_heads; at most
                              max_heads_per_block of ffa_build_info for the kernel */
  int64_t split_len;       /* 0, or positions per split (any; the tuner and heuristic use multiples of 16) */
  int64_t kernel;          /* ffa_kernel. A kernel that lacks this dtype or head_dim is FFA_ERR_UNSUPPORTED, as is
                              a device that cannot run it (its compute capability, its shared memory) */
  int64_t stages;          /* FFA_KERNEL_TMA: shared-memory ring stages, 2..8 (ignored by the others) */
  int64_t tile_rows;       /* FFA_KERNEL_TMA: positions per stage, a multiple of 32 in 32..256 (ignored by the
                              others) */
  int64_t pdl;             /* the kernels of ffa_build_info's "launch_features" (tensor cores, TMA), on compute
                              capability 9.0+: 1 launches with programmatic dependent launch (its start overlaps
                              the previous kernel's end on the stream), 0 not (ignored by the CUDA-core kernel) */
  int64_t cluster;         /* those kernels with split_len > 0, on compute capability 9.0+: blocks of this many
                              consecutive splits (one of "launch_features" "clusters") form a thread block cluster
                              that merges its partials in distributed shared memory before the split combine; 1:
                              no cluster, the only size of an unsplit launch (ignored by the CUDA-core kernel) */

  void *workspace; /* ffa_workspace_bytes() bytes of device memory when split_len > 0, zeroed
                      before its first use; every launch leaves its counters zero again. One
                      workspace serves one stream at a time and one (batch, heads): its layout
                      (batch x heads counters, then partial outputs) depends on them, and a
                      launch with fewer heads writes partials over another's counters. */
  int64_t workspace_bytes;
  void *stream; /* cudaStream_t */
} ffa_decode_params;

FFA_API int64_t ffa_abi_version(void);
FFA_API const char *ffa_version(void);
/* JSON text: {"version":..., "abi":..., "archs":[...], "dtypes":[...], "head_dims":[...], "threads": [...],
 * "kernels": {name: {"code": ffa_kernel, "dtypes": [...], "head_dims": [...], "compute_capability": x.y,
 * "max_heads_per_block": n}, ...}, "tensor_cores": {"rows_in_flight_per_warp": n}, "tma": {"stages": [lo, hi],
 * "tile_rows": [lo, hi, step], "max_threads": {"head_dim": threads, ...}}, "launch_features": {"kernels": [codes
 * that take pdl and clusters], "compute_capability": x.y, "clusters": [...]}, ...} */
FFA_API const char *ffa_build_info(void);
FFA_API const char *ffa_status_string(int status);
FFA_API const char *ffa_last_error(void);

/* Bytes of workspace a split launch with these sizes needs (0 when split_len == 0). */
FFA_API int ffa_workspace_bytes(const ffa_decode_params *p, int64_t *bytes);
/* FFA_OK when the library holds machine code or PTX that runs on CUDA device `device`. */
FFA_API int ffa_check_device(int device);
FFA_API int ffa_decode(const ffa_decode_params *p);
/* The read ceiling: reads each byte of up to FFA_READ_RANGES ranges of device memory once and
 * writes nothing (what any kernel that must read those bytes costs at least; csrc/read.cu).
 * Ranges are 16-byte aligned and a multiple of 16 bytes long; an unused range has ptr NULL. */
#define FFA_READ_RANGES 2
typedef struct {
  int64_t abi_version;
  const void *ptr[FFA_READ_RANGES];
  int64_t bytes[FFA_READ_RANGES];
  int64_t bulk; /* 0: 16-byte loads. 1: the bulk copy engine (compute capability 9.0+; FFA_ERR_UNSUPPORTED elsewhere) */
  void *stream; /* cudaStream_t */
} ffa_read_params;
FFA_API int ffa_read(const ffa_read_params *p);
/* Waits for `stream` (a cudaStream_t) and reports whether work on it failed on the GPU. A
 * kernel fault is asynchronous: FFA_DEBUG_SYNC=1 makes the Python side call this before and
 * after each decode, so that a fault is reported as FFA's, or as earlier work's. */
FFA_API int ffa_stream_check(void *stream);

#ifdef __cplusplus
}
#endif
#endif /* FFA_H_ */
