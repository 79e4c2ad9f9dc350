// The read ceiling: reading bytes once with no arithmetic on them (ffa_read in ffa.h).
//
// A decode step must read its K/V cache at least once, so the time these kernels take to read
// the same bytes, in the same protocol, is the floor of any decode kernel (bench/kernels.py's
// read columns and its floor; ffa.measure.read_bytes). Each kernel folds what it reads into
// one word per thread and writes it only in the impossible case that it equals kNever, so
// nothing is written and nothing can be optimized away.
//
// Two ways to read the ranges, taken as one sequence of bytes:
//   loads: 16-byte loads, grid-stride over 16-byte chunks, kLoadBlocksPerSm blocks of
//          kLoadThreads per multiprocessor (enough loads in flight to cover memory latency);
//   bulk:  the bulk copy engine (compute capability 9.0, bulk_copy.cuh). Each range is cut in
//          kBulkChunk-byte chunks (its last one shorter); block i takes chunks i, i + grid, ... of
//          all ranges through a ring of
//          kBulkStages shared-memory stages: thread 0 keeps every stage's copy in flight, all
//          threads fold a landed stage, and a block barrier frees it for its next copy.
//          kBulkBlocksPerSm blocks per multiprocessor keep kBulkBlocksPerSm x kBulkStages x
//          kBulkChunk bytes in flight per SM (128 KB: at ~35 GB/s per SM and ~1 us of latency
//          about 35 KB are needed; the rest absorbs the ring's barrier stalls).
#include <cuda_runtime.h>
#include <stdint.h>

#include <atomic>

#include "bulk_copy.cuh"
#include "ffa.h"

namespace ffa {
namespace {

constexpr int kLoadThreads = 256, kLoadBlocksPerSm = 16;
constexpr int kBulkThreads = 128, kBulkBlocksPerSm = 2, kBulkStages = 4, kBulkChunk = 16384;
constexpr uint32_t kNever = 0x9e3779b9u;

__device__ uint32_t g_read_sink;

struct Ranges {
  const char *ptr[FFA_READ_RANGES];
  int64_t bytes[FFA_READ_RANGES];
};

// Byte `offset` of the ranges taken in sequence. (Selects without leaving the unrolled loop, so
// that the ranges stay in the kernel's parameters instead of a local copy.)
__device__ __forceinline__ const char *byte_at(const Ranges &r, int64_t offset) {
  const char *at = nullptr;
#pragma unroll
  for (int i = 0; i < FFA_READ_RANGES; ++i) {
    if (!at && (offset < r.bytes[i] || i == FFA_READ_RANGES - 1)) at = r.ptr[i] + offset;
    offset -= r.bytes[i];
  }
  return at;
}

// Chunk `c` of the bulk read and its length: each range is cut in chunks of kBulkChunk bytes,
// its last one shorter.
__device__ __forceinline__ const char *bulk_chunk(const Ranges &r, int64_t c, uint32_t &bytes) {
  const char *at = nullptr;
#pragma unroll
  for (int i = 0; i < FFA_READ_RANGES; ++i) {
    const int64_t n = (r.bytes[i] + kBulkChunk - 1) / kBulkChunk;
    if (!at && (c < n || i == FFA_READ_RANGES - 1)) {
      const int64_t left = r.bytes[i] - c * kBulkChunk;
      bytes = uint32_t(left < kBulkChunk ? left : kBulkChunk);
      at = r.ptr[i] + c * kBulkChunk;
    }
    c -= n;
  }
  return at;
}

__device__ __forceinline__ uint32_t fold(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

__global__ void __launch_bounds__(kLoadThreads) read_loads(const Ranges r, int64_t chunks) {
  uint32_t acc = 0;
  const int64_t first = blockIdx.x * int64_t(kLoadThreads) + threadIdx.x, stride = int64_t(gridDim.x) * kLoadThreads;
  for (int64_t c = first; c < chunks; c += stride) {
    acc ^= fold(__ldg(reinterpret_cast<const uint4 *>(byte_at(r, c * 16))));
  }
  if (acc == kNever) g_read_sink = acc;
}

// Thread 0 of a bulk-read block: chunk `c` into one stage of the ring.
__device__ __forceinline__ void issue_chunk(const Ranges &r, int64_t c, uint4 *stage, uint64_t *full) {
  uint32_t bytes;
  const char *src = bulk_chunk(r, c, bytes);
  bulk_arrive_expect(full, bytes);
  bulk_copy(stage, src, bytes, full);
}

__global__ void __launch_bounds__(kBulkThreads) read_bulk(const Ranges r, int64_t chunks) {
  extern __shared__ __align__(128) uint4 stage_data[];  // kBulkStages x kBulkChunk bytes
  __shared__ __align__(8) uint64_t full[kBulkStages];
  const int64_t first = blockIdx.x, stride = gridDim.x;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kBulkStages; ++s) bulk_barrier_init(&full[s]);
    for (int s = 0; s < kBulkStages && first + s * stride < chunks; ++s)
      issue_chunk(r, first + s * stride, stage_data + s * (kBulkChunk / 16), &full[s]);
  }
  __syncthreads();
  uint32_t acc = 0;
  int k = 0;
  for (int64_t c = first; c < chunks; c += stride, ++k) {
    const int s = k % kBulkStages;
    bulk_wait(&full[s], (k / kBulkStages) & 1);
    uint32_t bytes;
    bulk_chunk(r, c, bytes);
    const int n16 = int(bytes / 16);
    for (int i = threadIdx.x; i < n16; i += kBulkThreads) acc ^= fold(stage_data[s * (kBulkChunk / 16) + i]);
    __syncthreads();  // every thread is done with stage s
    const int64_t next = c + kBulkStages * stride;
    if (threadIdx.x == 0 && next < chunks) issue_chunk(r, next, stage_data + s * (kBulkChunk / 16), &full[s]);
  }
  if (acc == kNever) g_read_sink = acc;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

// Whether `device` runs read_bulk's bulk copies: compute capability 9.0+ and the kernel's machine
// code built for it (PTX of an older architecture has them compiled out).
cudaError_t bulk_read_supported(int device, bool &ok) {
  int major = 0;
  cudaFuncAttributes attr;
  cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, read_bulk);
  ok = err == cudaSuccess && major >= 9 && attr.ptxVersion >= 90;
  return err;
}

// Launches one read of the ranges; `bulk` must only be set on a device of compute capability 9.0+.
cudaError_t launch_read(const ffa_read_params *p, cudaStream_t stream) {
  Ranges r = {};
  int64_t total = 0, bulk_chunks = 0;
  for (int i = 0; i < FFA_READ_RANGES; ++i) {
    r.ptr[i] = static_cast<const char *>(p->ptr[i]);
    r.bytes[i] = p->ptr[i] ? p->bytes[i] : 0;
    total += r.bytes[i];
    bulk_chunks += ceil_div(r.bytes[i], kBulkChunk);
  }
  if (total == 0) return cudaSuccess;
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  if (!p->bulk) {
    const int64_t chunks = total / 16;
    const int64_t blocks = ceil_div(chunks, kLoadThreads);
    read_loads<<<unsigned(blocks < sms * kLoadBlocksPerSm ? blocks : sms * kLoadBlocksPerSm), kLoadThreads, 0,
                 stream>>>(r, chunks);
    return cudaGetLastError();
  }
  constexpr int smem = kBulkStages * kBulkChunk;
  static std::atomic<bool> allowed[64];  // the dynamic shared memory limit raised, per device
  if (device >= 64 || !allowed[device].load()) {
    err = cudaFuncSetAttribute(read_bulk, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
    if (device < 64) allowed[device].store(true);
  }
  read_bulk<<<unsigned(bulk_chunks < sms * kBulkBlocksPerSm ? bulk_chunks : sms * kBulkBlocksPerSm),
              kBulkThreads, smem, stream>>>(r, bulk_chunks);
  return cudaGetLastError();
}

}  // namespace ffa
