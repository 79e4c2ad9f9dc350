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

// How many threads of the last block merge (the rest wait): the partial sums of its thread groups
// meet in kCombineThreads float4 of shared memory.
constexpr int kCombineThreads = 256;
constexpr int kCombineMaxHeads = 32;  // heads of one block at most (launch.cuh checks every kernel's)

// Step 1 of the merge: per head, the splits' log2-sum-exps folded into (max, sum of 2^(lse - max)),
// one warp per head, its lanes over the splits.
__device__ __forceinline__ void merge_lse(const float *lse_rows, int nh, int n, int64_t head_stride, float *head_m,
                                          float *head_l) {
  const int lane = threadIdx.x % 32, warps = min(int(blockDim.x), kCombineThreads) / 32;
  for (int h = threadIdx.x / 32; h < nh && threadIdx.x < kCombineThreads; h += warps) {
    float m = -INFINITY, l = 0.f, unused = 0.f;
    for (int s = lane; s < n; s += 32) merge_partial(m, l, unused, __ldcg(lse_rows + h * head_stride + s), 1.f, 0.f);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      const float m_i = __shfl_xor_sync(0xffffffffu, m, off), l_i = __shfl_xor_sync(0xffffffffu, l, off);
      merge_partial(m, l, unused, m_i, l_i, 0.f);
    }
    if (lane == 0) head_m[h] = m, head_l[h] = l;
  }
}

// Dims 4 col .. 4 col + 3 of head h's output: the merged weighted sum over the weights' sum l.
template <typename T>
__device__ __forceinline__ void write_merged(const DecodeArgs &a, int b, int h, int col, float4 acc, float l) {
  T *out = static_cast<T *>(a.out) + b * a.o_sb + h * a.o_sh + 4 * col;
  const float inv = 1.f / l;
  out[0] = T(acc.x * inv), out[1] = T(acc.y * inv), out[2] = T(acc.z * inv), out[3] = T(acc.w * inv);
}

// Called by every thread of every split block after it wrote its partials: the last block of
// heads h0 .. h0+nh-1 of sequence b merges them into the output. Step 1 (merge_lse) gives each
// head's weights 2^(lse - max) / sum; step 2 sums the weighted partial outputs, 4 dims (a float4)
// per thread and head, the splits dealt out to G thread groups whose sums meet in shared memory:
// every load is independent of the others, so a thread keeps several in flight.
template <typename T, int D>
__device__ __forceinline__ void combine_if_last(const DecodeArgs &a, int b, int h0, int nh, int64_t start,
                                                int64_t pos) {
  __shared__ bool last;
  __shared__ float head_m[kCombineMaxHeads], head_l[kCombineMaxHeads];
  __shared__ float4 sums[kCombineThreads];
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
  const int64_t row0 = (int64_t(b) * a.heads + h0) * a.num_splits + first;  // head h0's first split
  merge_lse(a.part_lse + row0, nh, n, a.num_splits, head_m, head_l);
  __syncthreads();
  constexpr int kCols = D / 4;
  const int pairs = nh * kCols, threads = min(int(blockDim.x), kCombineThreads);
  const int groups = pairs < threads ? threads / pairs : 1, t = threadIdx.x;
  const bool merging = t < threads && t / pairs < groups;  // thread t: split group t / pairs, pair t % pairs
  for (int pair = t % pairs; merging && pair < pairs; pair += threads) {
    const int h = pair / kCols, col = pair % kCols, g = t / pairs;
    const int64_t row = row0 + int64_t(h) * a.num_splits;
    const float m = head_m[h] == -INFINITY ? 0.f : head_m[h];
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
    for (int s = g; s < n; s += groups) {  // L2 reads: the partials were written by other blocks
      const float w = exp2f(__ldcg(a.part_lse + row + s) - m);
      const float4 x = __ldcg(reinterpret_cast<const float4 *>(a.part_out + (row + s) * D) + col);
      acc.x += w * x.x, acc.y += w * x.y, acc.z += w * x.z, acc.w += w * x.w;
    }
    if (groups > 1) {
      sums[t] = acc;
    } else {
      write_merged<T>(a, b, h0 + h, col, acc, head_l[h]);
    }
  }
  if (groups == 1) return;
  __syncthreads();
  for (int pair = t; pair < pairs; pair += blockDim.x) {
    float4 acc = sums[pair];
    for (int g = 1; g < groups; ++g) {
      const float4 x = sums[pair + g * pairs];
      acc.x += x.x, acc.y += x.y, acc.z += x.z, acc.w += x.w;
    }
    const int h = pair / kCols;
    write_merged<T>(a, b, h0 + h, pair % kCols, acc, head_l[h]);
  }
}

}  // namespace ffa
