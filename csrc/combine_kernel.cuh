// Combine the partial results of a split-KV launch into the final output.
//
// Each split s of a sequence wrote o_s (its softmax-normalized output over its positions)
// and lse_s = log2 of its sum of exponentials. The exact result is
//     out = sum_s 2^(lse_s - M) * o_s / sum_s 2^(lse_s - M),   M = max_s lse_s.
// One block per (head, batch): the split weights go to shared memory, then each thread
// produces elements of the head_dim row. Only splits that overlap [start, pos] are read, so
// splits past the current length (which wrote nothing) cost nothing.
#pragma once

#include <math.h>

#include "decode_args.h"

namespace ffa {

template <typename T>
__global__ void combine_kernel(const DecodeArgs a, int head_dim) {
  extern __shared__ float weight[];  // [splits of this sequence]
  __shared__ float red[32];
  __shared__ float total;
  const int h = blockIdx.x, b = blockIdx.y, tid = threadIdx.x, nt = blockDim.x;
  T *out = static_cast<T *>(a.out) + b * a.o_sb + h * a.o_sh;

  int64_t start, pos;
  if (!sequence_range(a, b, start, pos)) {
    for (int d = tid; d < head_dim; d += nt) out[d] = T(NAN);
    return;
  }
  const int first = int(start / a.split_len), n = int(pos / a.split_len) - first + 1;
  const int64_t row0 = (int64_t(b) * a.heads + h) * a.num_splits + first;

  float m = -INFINITY;
  for (int s = tid; s < n; s += nt) m = fmaxf(m, a.part_lse[row0 + s]);
  for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  if (tid % 32 == 0) red[tid / 32] = m;
  __syncthreads();
  m = red[0];
  for (int w = 1; w < nt / 32; ++w) m = fmaxf(m, red[w]);

  for (int s = tid; s < n; s += nt) weight[s] = exp2f(a.part_lse[row0 + s] - m);
  __syncthreads();
  if (tid == 0) {
    float sum = 0.f;
    for (int s = 0; s < n; ++s) sum += weight[s];
    total = sum;
  }
  __syncthreads();
  const float inv = 1.f / total;
  for (int d = tid; d < head_dim; d += nt) {
    float acc = 0.f;
    for (int s = 0; s < n; ++s) acc = fmaf(weight[s], a.part_out[(row0 + s) * head_dim + d], acc);
    out[d] = T(acc * inv);
  }
}

}  // namespace ffa
