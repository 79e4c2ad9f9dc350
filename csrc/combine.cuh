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
// splits past the current length cost nothing. In a cluster launch of the TMA kernel the blocks
// of a cluster merge first, through distributed shared memory, and only the clusters' partials
// go through the workspace (cluster_combine).
#pragma once

#include <math.h>

#include "cluster.cuh"
#include "decode_args.h"

namespace ffa {

// The weights that bring two partials to their common max: the partial (m, l, o) becomes
// (M, x l + y l_i, x o + y o_i) with M = max(m, m_i), x = 2^(m - M), y = 2^(m_i - M); m becomes M.
// A partial without positions has m = -inf, l = o = 0 and gets weight 0; two such give one.
__device__ __forceinline__ void merge_weights(float &m, float m_i, float &x, float &y) {
  const float m_new = fmaxf(m, m_i);
  const float ref = m_new == -INFINITY ? 0.f : m_new;
  x = exp2f(m - ref), y = exp2f(m_i - ref);
  m = m_new;
}

// Folds the partial (m_i, l_i, o_i) of one output element into (m, l, o).
__device__ __forceinline__ void merge_partial(float &m, float &l, float &o, float m_i, float l_i, float o_i) {
  float x, y;
  merge_weights(m, m_i, x, y);
  l = l * x + l_i * y;
  o = o * x + o_i * y;
}

// Element d of head h of sequence b of the output.
template <typename T>
__device__ __forceinline__ void write_output(const DecodeArgs &a, int b, int h, int d, float value) {
  static_cast<T *>(a.out)[b * a.o_sb + h * a.o_sh + d] = T(value);
}

// The softmax denominator of head h from the partial (m, l, o) over all of a sequence's positions:
// l, or with attention sinks l + 2^(sink log2 e - m), head h's sink logit joining it; the output is
// o / denominator. Every output write of a merged result divides by it, so each kernel and each
// combine applies the sink once.
template <typename T>
__device__ __forceinline__ float denominator(const DecodeArgs &a, int h, float m, float l) {
  return a.sinks == nullptr ? l : l + exp2f(float(static_cast<const T *>(a.sinks)[h]) * float(kLog2e) - m);
}

// The stored form of the partial (m, l, o): its output o / l and its log2-sum-exp m + log2 l; a
// partial without positions (l = 0) stores 0 and -inf, which merge_partial skips.
__device__ __forceinline__ float stored_output(float l, float o) { return l > 0.f ? o / l : 0.f; }
__device__ __forceinline__ float stored_lse(float m, float l) { return l > 0.f ? m + log2f(l) : -INFINITY; }

// Element d of head h of sequence b as the partial (m, l, o) in workspace row `row` of that head
// (a split, or a cluster in a cluster launch).
template <int D>
__device__ __forceinline__ void write_partial(const DecodeArgs &a, int b, int h, int row, int d, float m, float l,
                                              float o) {
  const int64_t r = (int64_t(b) * a.heads + h) * a.num_splits + row;
  a.part_out[r * D + d] = stored_output(l, o);
  if (d == 0) a.part_lse[r] = stored_lse(m, l);
}

// Element d of head h of sequence b, as the output (no split) or as split `split`'s partial.
template <typename T, int D>
__device__ __forceinline__ void write_result(const DecodeArgs &a, int b, int h, int split, int d, float m, float l,
                                             float o) {
  if (a.split_len == 0) {
    write_output<T>(a, b, h, d, o / denominator<T>(a, h, m, l));
  } else {
    write_partial<D>(a, b, h, split, d, m, l, o);
  }
}

// Element i (head h0 + i / D, dim i % D) of a block's merged result (m, l, o): in a cluster launch kept
// in the block's shared memory at `mine` (o / l of its nh x D elements, then its nh log2-sum-exps)
// for cluster_combine, else written as the output or as the split's partial (write_result).
template <typename T, int D>
__device__ __forceinline__ void block_result(const DecodeArgs &a, int b, int h0, int nh, int split, int i, float m,
                                             float l, float o, float *mine) {
  const int h = i / D, d = i % D;
  if (a.cluster > 1) {
    mine[i] = stored_output(l, o);
    if (d == 0) mine[nh * D + h] = stored_lse(m, l);
  } else {
    write_result<T, D>(a, b, h0 + h, split, d, m, l, o);
  }
}

// The output elements [begin, end) of heads h0 .. (element i: head h0 + i / D, dim i % D; begin
// and end multiples of 4) of sequence b, merged from workspace rows [first, first + n) by the
// block's threads 0 .. threads-1 (no barrier: the other threads may leave). The rows come from
// L2 (other blocks wrote them), so the merge is bound by L2 latency, not by arithmetic: a thread
// takes 4 consecutive dims of a head (one 16-byte load per row, one pair of weights for the 4)
// and has kMergeRowsInFlight rows' loads issued before it merges them (4: more raised the
// registers of the kernels that inline this; bench/results/compare-merge-rows-h200.md).
constexpr int kMergeRowsInFlight = 4;

template <typename T, int D>
__device__ __forceinline__ void merge_rows(const DecodeArgs &a, int b, int h0, int begin, int end, int first, int n,
                                           int threads) {
  static_assert(D % 4 == 0, "a head's elements in whole float4s");
  if (threadIdx.x >= threads) return;
  for (int i = begin + 4 * threadIdx.x; i < end; i += 4 * threads) {
    const int h = h0 + i / D, d = i % D;
    const int64_t row0 = (int64_t(b) * a.heads + h) * a.num_splits + first;
    float m = -INFINITY, l = 0.f, o[4] = {0.f, 0.f, 0.f, 0.f};
    for (int s0 = 0; s0 < n; s0 += kMergeRowsInFlight) {
      float lse[kMergeRowsInFlight];
      float4 out[kMergeRowsInFlight];
#pragma unroll
      for (int k = 0; k < kMergeRowsInFlight; ++k) {  // a row past n: a partial without positions
        const bool row = s0 + k < n;
        lse[k] = row ? __ldcg(a.part_lse + row0 + s0 + k) : -INFINITY;
        out[k] = row ? __ldcg(reinterpret_cast<const float4 *>(a.part_out + (row0 + s0 + k) * D + d))
                     : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int k = 0; k < kMergeRowsInFlight; ++k) {
        float x, y;
        merge_weights(m, lse[k], x, y);  // each stored partial has l = 1
        l = l * x + y;
        o[0] = o[0] * x + out[k].x * y, o[1] = o[1] * x + out[k].y * y;
        o[2] = o[2] * x + out[k].z * y, o[3] = o[3] * x + out[k].w * y;
      }
    }
    l = denominator<T>(a, h, m, l);
#pragma unroll
    for (int e = 0; e < 4; ++e) write_output<T>(a, b, h, d + e, o[e] / l);
  }
}

// One thread's count of its block (or cluster) on the counter of (sequence b, this head group):
// whether it is the last of `count`; the last one resets the counter for the next launch.
__device__ __forceinline__ bool count_done(const DecodeArgs &a, int b, int count) {
  int *counter = a.counters + int64_t(b) * gridDim.y + blockIdx.y;
  const bool last = atomicAdd(counter, 1) == count - 1;
  if (last) *counter = 0;
  return last;
}

// After every thread of the block wrote its partials: whether this block is the last of the
// `blocks` that count on the counter of (sequence b, this head group).
__device__ __forceinline__ bool last_to_finish(const DecodeArgs &a, int b, int blocks) {
  __threadfence();  // this block's partials are visible device-wide before it counts itself
  __syncthreads();
  const bool last = __syncthreads_or(threadIdx.x == 0 && count_done(a, b, blocks));  // thread 0 counts
  if (last) __threadfence();
  return last;
}

// Called by every thread of every split block after it wrote its partials: the last block of
// heads h0 .. h0+nh-1 of sequence b merges them into the output on its threads 0 .. threads-1.
template <typename T, int D>
__device__ __forceinline__ void combine_if_last(const DecodeArgs &a, int b, int h0, int nh, int64_t start,
                                                int64_t pos, int threads) {
  const int first = int(start / a.split_len), n = int(pos / a.split_len) - first + 1;
  if (last_to_finish(a, b, n)) merge_rows<T, D>(a, b, h0, 0, nh * D, first, n, threads);
}

// In a cluster launch, whether block `split`'s cluster overlaps the positions [start, pos] of a valid
// sequence b: then each of its blocks takes part in cluster_combine, one without positions of its own too.
__device__ __forceinline__ bool cluster_has_work(const DecodeArgs &a, int b, int split) {
  int64_t start, pos;
  if (!sequence_range(a, b, start, pos)) return false;
  const int64_t lo = int64_t(split / a.cluster) * a.cluster * a.split_len;
  return lo <= pos && lo + int64_t(a.cluster) * a.split_len > start;
}

// The cluster combine (cluster launches of the tensor-core and TMA kernels, cluster.cuh). The C blocks of a cluster
// hold C consecutive splits of one sequence b and head group h0 .. h0+nh-1; each left its block's
// partial in shared memory at `mine`: o / l of its nh x D elements, then its nh log2-sum-exps (a
// block without positions: 0 and -inf). Called by every thread of every such block; the merges run
// on threads 0 .. threads-1, the others only keep the barriers:
//   1. block `rank` of the cluster merges element share `rank` of the C partials (E = nh D
//      elements in C shares of whole float4s) from the blocks' shared memory; where the cluster
//      covers all of [start, pos] this is the output, and the step is done;
//   2. else it is the cluster's partial, workspace row `cluster index`; rank 0 counts the cluster
//      done, and every block of the last cluster to finish merges its share of the rows of the
//      clusters that overlap [start, pos] into the output.
// Each element thus goes through C + n_clusters merges in one block, not n_splits (combine_if_last).
template <typename T, int D>
__device__ __forceinline__ void cluster_combine(const DecodeArgs &a, int b, int h0, int nh, int split,
                                                const float *mine, int64_t start, int64_t pos, int threads) {
  __shared__ int last;
  const int size = a.cluster, rank = split % size, cluster = split / size, elems = nh * D;
  const int64_t unit = int64_t(a.split_len) * size;  // positions per cluster
  const int first = int(start / unit), n = int(pos / unit) - first + 1;
  const int share = (elems + 4 * size - 1) / (4 * size) * 4;  // whole float4s, for merge_rows
  const int begin = min(elems, rank * share), end = min(elems, begin + share);
  cluster_sync();  // every block's partial is in its shared memory
  for (int i = begin + threadIdx.x; i < end && threadIdx.x < threads; i += threads) {
    const int h = i / D, d = i % D;
    float m = -INFINITY, l = 0.f, o = 0.f;
    for (int q = 0; q < size; ++q) merge_partial(m, l, o, cluster_load(mine + elems + h, q), 1.f, cluster_load(mine + i, q));
    if (n == 1) {
      write_output<T>(a, b, h0 + h, d, o / denominator<T>(a, h0 + h, m, l));
    } else {
      write_partial<D>(a, b, h0 + h, cluster, d, m, l, o);
    }
  }
  if (n > 1) __threadfence();  // this block's share is visible device-wide before rank 0 counts the cluster
  cluster_sync();              // every share is merged: no block reads another's shared memory after this
  if (n == 1) return;
  if (rank == 0 && threadIdx.x == 0) {
    const int is_last = count_done(a, b, n);
    for (int q = 0; q < size; ++q) cluster_store(&last, q, is_last);
  }
  cluster_sync();  // every block of the cluster knows whether it is the last
  if (threadIdx.x >= threads || !last) return;
  __threadfence();
  merge_rows<T, D>(a, b, h0, begin, end, first, n, threads);
}

// Called by every thread of every block after the block's results are in (block_result): the
// cluster combine in a cluster launch, else the split combine in a split launch; the merges run on
// threads 0 .. threads-1.
template <typename T, int D>
__device__ __forceinline__ void combine_blocks(const DecodeArgs &a, int b, int h0, int nh, int split, const float *mine,
                                               int64_t start, int64_t pos, int threads) {
  if (a.cluster > 1) {
    cluster_combine<T, D>(a, b, h0, nh, split, mine, start, pos, threads);
  } else if (a.split_len > 0) {
    combine_if_last<T, D>(a, b, h0, nh, start, pos, threads);
  }
}

}  // namespace ffa
