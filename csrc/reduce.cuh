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

// Sums of G values (one per head) over the TPK lanes that share a row, with G - 1 + log2(TPK/G)
// shuffles instead of G log2(TPK): at each of the first log2(G) levels a lane keeps half of its
// values, sends the other half to its partner and adds the partner's half of the ones it kept
// (a transpose-and-add). Afterwards v[0 .. kept-1] hold the full sums of heads
// first .. first+kept-1 (see first_head); lanes that differ only in their low bits
// hold the same sums.
template <int G, int TPK>
struct RowSums {
  static constexpr int kKept = G > TPK ? G / TPK : 1;  // sums each lane ends with
  static constexpr int kLanesPerHead = TPK > G ? TPK / G : 1;

  __device__ __forceinline__ static void reduce(float (&v)[G], int lane_k) {
    int n = G;
#pragma unroll
    for (int off = TPK / 2; off > 0; off /= 2) {
      if (n > 1) {
        const bool upper = lane_k & off;
#pragma unroll
        for (int k = 0; k < G / 2; ++k)
          if (k < n / 2) {
            const float send = upper ? v[k] : v[k + n / 2];
            const float keep = upper ? v[k + n / 2] : v[k];
            v[k] = keep + __shfl_xor_sync(0xffffffffu, send, off);
          }
        n /= 2;
      } else {
        v[0] += __shfl_xor_sync(0xffffffffu, v[0], off);
      }
    }
  }
  // The head of v[0] on lane lane_k after reduce().
  __device__ __forceinline__ static int first_head(int lane_k) { return lane_k / kLanesPerHead * kKept; }
  // Whether this lane is the one that stores its sums (one lane per head).
  __device__ __forceinline__ static bool stores(int lane_k) { return lane_k % kLanesPerHead == 0; }
};

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
