// The bulk copy engine (compute capability 9.0, "TMA"): one thread asks for a contiguous run of
// bytes (bulk_copy), or a box of a tensor described by a tensor map (tma_load_4d), to be copied
// from global to shared memory, and the copy completes on an mbarrier, which counts the bytes
// that arrived. Threads that need the data wait on the barrier's phase.
//
// A stage of a ring is one shared-memory buffer and a "full" barrier (initialized with count 1):
//   issuer:    bulk_arrive_expect(full, bytes); bulk_copy(dst, src, bytes, full);
//   consumers: bulk_wait(full, phase)   (phase: 0, 1, 0, ... on successive uses of the stage)
// The issuer may reuse a stage only after every consumer is done with it: a block barrier, or an
// "empty" barrier per stage initialized with the number of consumers, each of which calls
// barrier_arrive(empty) when done and which the issuer waits on with bulk_wait. A consumer that
// wrote the stage with ordinary stores calls proxy_fence_async() before it releases the stage.
// Sizes and addresses are multiples of 16 bytes. On older architectures these compile to
// nothing; callers check the device first.
#pragma once

#include <stdint.h>

namespace ffa {

__device__ __forceinline__ uint32_t shared_address(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// A barrier that completes a phase when `count` threads have arrived and the expected bytes
// (if any) landed.
__device__ __forceinline__ void bulk_barrier_init(uint64_t *bar, uint32_t count = 1) {
#if __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(shared_address(bar)), "r"(count));
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#endif
}

// The issuing thread's arrival, announcing how many bytes this phase waits for.
__device__ __forceinline__ void bulk_arrive_expect(uint64_t *bar, uint32_t bytes) {
#if __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(bar)), "r"(bytes)
               : "memory");
#endif
}

__device__ __forceinline__ void bulk_copy(void *dst, const void *src, uint32_t bytes, uint64_t *bar) {
#if __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               ::"r"(shared_address(dst)), "l"(src), "r"(bytes), "r"(shared_address(bar))
               : "memory");
#endif
}

// A plain arrival (an "empty" barrier's consumer).
__device__ __forceinline__ void barrier_arrive(uint64_t *bar) {
#if __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(shared_address(bar)) : "memory");
#endif
}

// Box (c0, c1, c2, c3) of the 4-D tensor that `map` describes (a CUtensorMap kernel parameter,
// __grid_constant__) into `dst`, in the map's shared-memory layout (its swizzle); coordinates
// past the tensor's end arrive as zeros. dst is aligned as the swizzle needs (1024 bytes for
// 128-byte swizzling).
__device__ __forceinline__ void tma_load_4d(void *dst, const void *map, int c0, int c1, int c2, int c3,
                                            uint64_t *bar) {
#if __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];"
      ::"r"(shared_address(dst)), "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(shared_address(bar))
      : "memory");
#endif
}

// Fetches a tensor map (a kernel parameter) into the copy engine's cache ahead of its first use.
__device__ __forceinline__ void tensor_map_prefetch(const void *map) {
#if __CUDA_ARCH__ >= 900
  asm volatile("prefetch.tensormap [%0];" ::"l"(map) : "memory");
#endif
}

// Orders this thread's ordinary shared-memory stores before later bulk copies into the same memory.
__device__ __forceinline__ void proxy_fence_async() {
#if __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
#endif
}

// Programmatic dependent launch (a launch with cudaLaunchAttributeProgrammaticStreamSerialization):
// grid_dependency_wait returns once the grids this one depends on have finished and their memory
// is visible (at once when launched without the attribute); nothing before it may read what they
// write. allow_dependents lets the next such grid start its own prologue.
__device__ __forceinline__ void grid_dependency_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependents() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Returns once the barrier's phase `phase` (0 or 1) has completed.
__device__ __forceinline__ void bulk_wait(uint64_t *bar, uint32_t phase) {
#if __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n"
      "}" ::"r"(shared_address(bar)),
      "r"(phase)
      : "memory");
#endif
}

}  // namespace ffa
