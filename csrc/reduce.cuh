// Block shape limits and the reductions the decode kernel and its combine step share.
#pragma once

namespace ffa {

constexpr int kMaxThreads = 256;
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kLogitFloats = 2048;  // the decode block's shared float buffer

// Sum (or max) over the TPK lanes that share a row; every lane gets the result.
template <int TPK>
__device__ __forceinline__ float row_sum(float x) {
#pragma unroll
  for (int off = TPK / 2; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Block-wide reduction of G values; `buf` holds kMaxWarps x G floats. Every thread gets the
// result. Contains one barrier; callers alternate buffers between consecutive reductions.
template <int G, bool kMax>
__device__ __forceinline__ void block_reduce(float (&v)[G], float *buf) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
#pragma unroll
  for (int g = 0; g < G; ++g) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      float o = __shfl_xor_sync(0xffffffffu, v[g], off);
      v[g] = kMax ? fmaxf(v[g], o) : v[g] + o;
    }
    if (lane == 0) buf[warp * G + g] = v[g];
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float r = buf[g];
    for (int w = 1; w < nwarps; ++w) r = kMax ? fmaxf(r, buf[w * G + g]) : r + buf[w * G + g];
    v[g] = r;
  }
}

}  // namespace ffa
