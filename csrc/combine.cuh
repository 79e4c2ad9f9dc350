// Combining the partial results of a split-KV launch, inside the decode kernel.
//
// Each split block of a sequence writes o_s (its softmax-normalized output over its
// positions) and lse_s = log2 of its sum of exponentials. The exact result is
//     out = sum_s 2^(lse_s - M) * o_s / sum_s 2^(lse_s - M),   M = max_s lse_s.
// Every split block counts itself done on a per-(sequence, head group) counter; the block that
// brings the count to the number of splits overlapping [start, pos] is the last, so all the
// partials are written, and it combines them and resets the counter to zero for the next
// launch (the counters start zeroed: the caller zeroes the workspace once). Only splits that
// overlap [start, pos] are read, so splits past the current length cost nothing.
#pragma once

#include <math.h>

#include "decode_args.h"
#include "reduce.cuh"

namespace ffa {

template <typename T, int D>
__device__ __forceinline__ void combine_if_last(const DecodeArgs &a, int b, int h0, int nh, int64_t start,
                                int64_t pos, float *weights /* kLogitFloats */,
                                float *red_max, float *red_sum) {
  __shared__ bool last;
  const int tid = threadIdx.x, nt = blockDim.x;
  const int first = int(start / a.split_len), n = int(pos / a.split_len) - first + 1;
  __threadfence();  // this block's partials are visible device-wide before it counts itself
  __syncthreads();
  if (tid == 0) {
    int *counter = a.counters + int64_t(b) * gridDim.y + blockIdx.y;
    last = atomicAdd(counter, 1) == n - 1;
    if (last) *counter = 0;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();

  constexpr int kPerThread = (D + 63) / 64;  // output elements per thread (>= 64 threads)
  for (int g = 0; g < nh; ++g) {
    const int h = h0 + g;
    const int64_t row0 = (int64_t(b) * a.heads + h) * a.num_splits + first;
    float m[1] = {-INFINITY};
    for (int s = tid; s < n; s += nt) m[0] = fmaxf(m[0], __ldcg(a.part_lse + row0 + s));
    block_reduce<1, true>(m, red_max);
    float acc[kPerThread] = {}, total[1] = {0.f};
    for (int s0 = 0; s0 < n; s0 += kLogitFloats) {  // split weights, a buffer-full at a time
      const int chunk = n - s0 < kLogitFloats ? n - s0 : kLogitFloats;
      for (int s = tid; s < chunk; s += nt) {
        weights[s] = exp2f(__ldcg(a.part_lse + row0 + s0 + s) - m[0]);
        total[0] += weights[s];
      }
      __syncthreads();
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) {
        const int d = tid + j * nt;
        if (d < D)
          for (int s = 0; s < chunk; ++s)
            acc[j] = fmaf(weights[s], __ldcg(a.part_out + (row0 + s0 + s) * D + d), acc[j]);
      }
      __syncthreads();
    }
    block_reduce<1, false>(total, red_sum);
    T *out = static_cast<T *>(a.out) + b * a.o_sb + h * a.o_sh;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j)
      if (tid + j * nt < D) out[tid + j * nt] = T(acc[j] / total[0]);
    __syncthreads();  // red_max / red_sum are reused by the next head
  }
}

}  // namespace ffa
