// Merging partial softmax results (the in-block merge of warps and the split combine) and writing
// a block's result.
//
// A partial result over a set of positions is (m, l, o): its logits' max m (base 2), its sum of
// weights l = sum 2^(s - m) and its weighted sum of values o = sum 2^(s - m) v (o / l is its
// output). Partials of disjoint sets merge exactly, in any order (merge_partial):
//     M = max(m1, m2),  l = 2^(m1 - M) l1 + 2^(m2 - M) l2,  o = 2^(m1 - M) o1 + 2^(m2 - M) o2.
// A split block stores its normalized output o / l and its log2-sum-exp m + log2 l, which is the
// partial (m + log2 l, 1, o / l) of the same weights.
//
// The split combine, inside the decode kernel. Every split block of a sequence counts itself
// done on a per-(sequence, head group) counter; the block that brings the count to the number
// of splits overlapping [start, pos] is the last, so all the partials are written, and it
// merges them and resets the counter to zero for the next launch (the counters start zeroed:
// the caller zeroes the workspace once). Only splits that overlap [start, pos] are read, so
// splits past the current length cost nothing.
#pragma once

#include <math.h>

#include "decode_args.h"

namespace ffa {

// Folds the partial (m_i, l_i, o_i) of one output element into (m, l, o). A partial without
// positions has m = -inf, l = o = 0 and changes nothing; merging two such gives one.
__device__ __forceinline__ void merge_partial(float &m, float &l, float &o, float m_i, float l_i, float o_i) {
  const float m_new = fmaxf(m, m_i);
  const float ref = m_new == -INFINITY ? 0.f : m_new;
  const float a = exp2f(m - ref), b = exp2f(m_i - ref);
  l = l * a + l_i * b;
  o = o * a + o_i * b;
  m = m_new;
}

// Element d of head h of sequence b, as the output (no split) or as split `split`'s partial.
template <typename T, int D>
__device__ __forceinline__ void write_result(const DecodeArgs &a, int b, int h, int split, int d, float m, float l,
                                             float o) {
  if (a.split_len == 0) {
    static_cast<T *>(a.out)[b * a.o_sb + h * a.o_sh + d] = T(o / l);
  } else {
    const int64_t row = (int64_t(b) * a.heads + h) * a.num_splits + split;
    a.part_out[row * D + d] = o / l;
    if (d == 0) a.part_lse[row] = m + log2f(l);
  }
}

// Called by every thread of every split block after it wrote its partials: the last block of
// heads h0 .. h0+nh-1 of sequence b merges them into the output.
template <typename T, int D>
__device__ __forceinline__ void combine_if_last(const DecodeArgs &a, int b, int h0, int nh, int64_t start,
                                                int64_t pos) {
  __shared__ bool last;
  const int first = int(start / a.split_len), n = int(pos / a.split_len) - first + 1;
  __threadfence();  // this block's partials are visible device-wide before it counts itself
  __syncthreads();
  if (threadIdx.x == 0) {
    int *counter = a.counters + int64_t(b) * gridDim.y + blockIdx.y;
    last = atomicAdd(counter, 1) == n - 1;
    if (last) *counter = 0;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int i = threadIdx.x; i < nh * D; i += blockDim.x) {
    const int h = h0 + i / D, d = i % D;
    const int64_t row0 = (int64_t(b) * a.heads + h) * a.num_splits + first;
    float m = -INFINITY, l = 0.f, o = 0.f;
#pragma unroll 8  // several splits' loads in flight at once
    for (int s = 0; s < n; ++s)  // L2 reads: the partials were written by other blocks
      merge_partial(m, l, o, __ldcg(a.part_lse + row0 + s), 1.f, __ldcg(a.part_out + (row0 + s) * D + d));
    static_cast<T *>(a.out)[b * a.o_sb + h * a.o_sh + d] = T(o / l);
  }
}

}  // namespace ffa
