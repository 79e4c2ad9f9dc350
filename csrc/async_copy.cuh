// Asynchronous 16-byte copies from global to shared memory (cp.async, sm_80 and newer).
//
// A thread issues copies of the rows it will use next and keeps computing while they are in
// flight: the data waits in shared memory, not in registers, so many rows can be in flight
// per thread without costing occupancy. Copies are committed in groups; `async_wait<N>()`
// returns once at most the N most recent groups of this thread are still pending. A thread
// reads only slots it filled itself, so no barrier is needed between the copy and the use.
// GPUs older than sm_80 copy synchronously (same results, no overlap).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

namespace ffa {

// Copy 16 bytes from `src` to `dst`, or write 16 zero bytes when `valid` is false (then
// `src` is not read, but must still be a valid address).
__device__ __forceinline__ void copy_chunk_async(uint4 *dst, const void *src, bool valid) {
#if __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(valid ? 16 : 0)
               : "memory");
#else
  *dst = valid ? *static_cast<const uint4 *>(src) : make_uint4(0, 0, 0, 0);
#endif
}

__device__ __forceinline__ void async_commit() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void async_wait() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

}  // namespace ffa
