// The bulk copy engine (compute capability 9.0): one thread asks for a contiguous run of bytes
// to be copied from global to shared memory, and the copy completes on an mbarrier, which
// counts the bytes that arrived. Threads that need the data wait on the barrier's phase.
//
// A stage of a ring is one shared-memory buffer and one barrier:
//   issuer:    bulk_arrive_expect(bar, bytes); bulk_copy(dst, src, bytes, bar);
//   consumers: bulk_wait(bar, phase)   (phase: 0, 1, 0, ... on successive uses of the stage)
// The issuer may reuse a stage only after every consumer is done with it (a block barrier, or
// an "empty" barrier per stage). Sizes and addresses are multiples of 16 bytes.
// On older architectures these compile to nothing; callers check the device first.
#pragma once

#include <stdint.h>

namespace ffa {

__device__ __forceinline__ uint32_t shared_address(const void *p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// A barrier that completes a phase when one thread has arrived and the expected bytes landed.
__device__ __forceinline__ void bulk_barrier_init(uint64_t *bar) {
#if __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(shared_address(bar)));
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
