// Thread block clusters (compute capability 9.0): the blocks of a cluster run at the same time on
// one GPU processing cluster, can wait for each other (cluster_sync) and read and write each
// other's shared memory ("distributed shared memory"): a block's shared-memory variable has the
// same offset in every block of the cluster, and cluster_load / cluster_store reach block `rank`'s.
// A block must not exit while another block may still access its shared memory: the last access
// is followed by a cluster_sync of every block. In a launch without clusters every block is a
// cluster of one. On older architectures these compile to nothing; callers check the device first.
#pragma once

#include <stdint.h>

#include "bulk_copy.cuh"  // shared_address

namespace ffa {

// Split blocks per cluster that a cluster launch may have (the tensor-core and TMA kernels on
// compute capability 9.0+; 8 is the portable cluster size), and that capability.
constexpr int kClusterSizes[] = {1, 2, 4, 8};
constexpr int kClusterCapability = 90;  // compute capability x 10

// Every thread of every block of the cluster arrives; memory operations before it are visible to
// every thread of the cluster after it (release / acquire at cluster scope).
__device__ __forceinline__ void cluster_sync() {
#if __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}

// The address of the shared-memory variable at `p` (this block's) in block `rank` of the cluster.
__device__ __forceinline__ uint32_t cluster_address(const void *p, int rank) {
  uint32_t remote = 0;
#if __CUDA_ARCH__ >= 900
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(shared_address(p)), "r"(rank));
#endif
  return remote;
}

__device__ __forceinline__ float cluster_load(const float *p, int rank) {
  float v = 0.f;
#if __CUDA_ARCH__ >= 900
  asm volatile("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(cluster_address(p, rank)) : "memory");
#endif
  return v;
}

__device__ __forceinline__ void cluster_store(int *p, int rank, int v) {
#if __CUDA_ARCH__ >= 900
  asm volatile("st.shared::cluster.s32 [%0], %1;" ::"r"(cluster_address(p, rank)), "r"(v) : "memory");
#endif
}

}  // namespace ffa
