// Decode attention: one query row per head against a KV cache, with the new K/V row
// appended in the same launch.
//
// Memory layout. The cache is [batch, kv_heads, max_len, head_dim] with head_dim contiguous;
// a row (one position of one kv head) is D elements, read as 16-byte chunks.
//
// What one thread block does. Block (split, head group, batch) takes `heads_per_block`
// (<= G) query heads that share one kv head, and the positions of its split that lie in the
// sequence's range [start, pos]. Reading each K/V row once for all heads of the group is
// what makes grouped-query attention cost no more memory traffic than one head.
//
// Threads. TPK consecutive lanes hold one key row (each lane one or two 16-byte chunks);
// the block's threads / TPK "key groups" take interleaved positions. Positions are
// processed in sub-chunks of SUB, each in three phases separated by barriers:
//   1. logits: each key group streams its rows to its lanes with many loads in flight
//      (row_stream.cuh), dots them with q held in registers, reduces over its TPK lanes with
//      shuffles (all G heads at once, RowSums in reduce.cuh) and writes the logits to shared
//      memory (base-2 units: q is prescaled by softmax_scale * log2 e; softcapped by cap_logit);
//   2. softmax: block-wide max and sum of the sub-chunk update the running max/sum (online
//      softmax), logits become unnormalized weights, the accumulators are rescaled;
//   3. values: each key group streams the V rows of its positions and accumulates weight * v.
//      With pruning (p > 0) a row is not read when, for every head, weight / running sum < p:
//      the running sum only grows, so the exact weight is then below p too. (A split block
//      adds the weight of the sequence's first position to its running sum, see first_logit.)
// At the end the key groups' accumulators are summed (shuffles inside a warp, shared memory
// across warps) and divided by the sum; a split block writes its normalized partial output
// and log-sum-exp instead, and the last split block of its heads to finish combines them
// (combine.cuh), so a split launch is still one kernel.
#pragma once

#include <float.h>
#include <math.h>

#include "combine.cuh"
#include "decode_args.h"
#include "decode_block.cuh"
#include "reduce.cuh"
#include "row_stream.cuh"
#include "vec.cuh"

namespace ffa {

// How rows reach the lanes (row_stream.cuh): the one-head kernel loads kRowsInFlight rows into
// registers at a time; the multi-head kernels stream them through a ring of kRingChunks
// 16-byte slots per thread in dynamic shared memory.
constexpr int kRowsInFlight = 4;
constexpr int kRingChunks = 8;
template <int G>
constexpr bool kUsesRing = G >= 2;
template <int G>
constexpr int ring_bytes_per_thread() { return kUsesRing<G> ? kRingChunks * 16 : 0; }

constexpr int pow2_at_least(int n) { return n <= 1 ? 1 : 2 * pow2_at_least((n + 1) / 2); }
constexpr int cmin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ int warp_of(int tid) { return tid / 32; }

template <typename T, int D>
struct RowShape {
  static constexpr int VEC = Chunk<T>::kElems;            // elements per chunk
  static constexpr int CHUNKS = D / VEC;                   // chunks per row
  static constexpr int TPK = cmin(32, pow2_at_least(CHUNKS));  // lanes per row
  static constexpr int CPL = (CHUNKS + TPK - 1) / TPK;    // chunks per lane
};

// The final reduction across warps goes through the logits buffer, kReduceDims<D> dims of a head at a
// time: one pass up to head_dim 256, two at 512.
template <int D>
constexpr int kReduceDims = cmin(D, kLogitFloats / kMaxWarps);

// Registers bound occupancy, and occupancy bounds the loads in flight: at 256 threads a block
// of the one-head kernel must fit three times on a multiprocessor (<= 85 registers), the
// 2- and 4-head kernels twice (<= 128); the 8-head kernel's q and accumulators alone need 128.
// At head_dim 512 a thread holds twice the q and accumulators: the 1- and 2-head kernels fit
// twice, the others once (the 8-head kernel's 256 floats spill, whatever the bound).
template <int G, int D>
constexpr int min_blocks() { return D > 256 ? (G <= 2 ? 2 : 1) : G == 1 ? 3 : G >= 8 ? 1 : 2; }

template <typename T, int D, int G>
__global__ void __launch_bounds__(kMaxThreads, min_blocks<G, D>()) decode_kernel(const DecodeArgs a) {
  using S = RowShape<T, D>;
  constexpr int VEC = S::VEC, CHUNKS = S::CHUNKS, TPK = S::TPK, CPL = S::CPL;
  constexpr int SUB = kLogitFloats / G;
  using Sums = RowSums<G, TPK>;
  static_assert(kRingChunks % CPL == 0, "a lane's chunks fill the ring's slots exactly");

  extern __shared__ uint4 ring[];  // RingRows' slots (multi-head kernels only)
  auto stream_rows = [&](const void *valid, int rows, auto src, auto use) {
    if constexpr (kUsesRing<G>)
      RingRows<CPL, kRingChunks / CPL>::stream(ring, valid, rows, src, use);
    else
      RegisterRows<CPL, kRowsInFlight>::stream(valid, rows, src, use);
  };

  __shared__ float logits[kLogitFloats];  // [G][SUB]; reused for the final reduction
  __shared__ float red_max[kMaxWarps * G], red_sum[kMaxWarps * G];

  const int tid = threadIdx.x, nt = blockDim.x;
  const int lane_k = tid % TPK, key = tid / TPK, kpp = nt / TPK;
  DecodeBlock<T> blk;
  if (!begin_block<T, D>(a, blk)) return;
  const int b = blk.b, split = blk.split, h0 = blk.h0, nh = blk.nh;
  const int64_t start = blk.r.start, pos = blk.r.pos, lo = blk.r.lo, hi = blk.r.hi;
  const T *kbase = blk.kbase, *vbase = blk.vbase, *knew = blk.knew, *vnew = blk.vnew;

  // q of this block's heads, prescaled to base-2 logits; unused heads and lanes hold zeros.
  float q[G][CPL][VEC];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
      const int ch = lane_k + c * TPK;
      if (g < nh && ch < CHUNKS) {
        const T *qrow = static_cast<const T *>(a.q) + b * a.q_sb + (h0 + g) * a.q_sh;
        to_float(load_chunk(qrow + ch * VEC), q[g][c], T());
#pragma unroll
        for (int e = 0; e < VEC; ++e) q[g][c][e] *= a.scale_log2;
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) q[g][c][e] = 0.f;
      }
    }

  const bool prune = a.prune_p > 0.f;
  float acc[G][CPL][VEC] = {};
  float m_run[G], l_run[G];
#pragma unroll
  for (int g = 0; g < G; ++g) m_run[g] = -INFINITY, l_run[g] = 0.f;

  // Pruning divides by a lower bound of the softmax denominator. A split block sees only its
  // own positions, so it adds the sequence's first position (an attention sink in practice,
  // often the largest weight): first_logit holds that logit, or -inf when the block holds it.
  // Warp 0 computes it; it is read after phase 1's barrier.
  __shared__ float first_logit[G];
  if (warp_of(tid) == 0) {
    const bool needed = a.prune_p > 0.f && lo > start;
    const T *row = (start == pos) ? knew : kbase + start * a.k_ss;
    float dot[G] = {};
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
      const int ch = lane_k + c * TPK;
      float kf[VEC];
      to_float(needed && ch < CHUNKS ? load_chunk(row + ch * VEC) : make_uint4(0, 0, 0, 0), kf, T());
#pragma unroll
      for (int g = 0; g < G; ++g)
#pragma unroll
        for (int e = 0; e < VEC; ++e) dot[g] = fmaf(q[g][c][e], kf[e], dot[g]);
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      dot[g] = row_sum<TPK>(dot[g]);
      if (tid == 0) first_logit[g] = needed ? cap_logit(a, dot[g]) : -INFINITY;
    }
  }

  for (int64_t s0 = lo; s0 < hi; s0 += SUB) {
    const int n = hi - s0 < SUB ? int(hi - s0) : SUB;

    // Phase 1: logits of positions s0 .. s0+n-1; key group `key` takes positions key + j * kpp.
    const int rows = (n + kpp - 1) / kpp;
    auto k_src = [&](int j, int c) {
      const int i = key + j * kpp, ch = lane_k + c * TPK;
      const T *row = (s0 + i == pos) ? knew : kbase + (s0 + i) * a.k_ss;
      return ChunkSrc{row + ch * VEC, i < n && ch < CHUNKS};
    };
    auto k_use = [&](int j, const uint4 (&chunk)[CPL]) {
      float dot[G] = {};
#pragma unroll
      for (int c = 0; c < CPL; ++c) {
        float kf[VEC];
        to_float(chunk[c], kf, T());
#pragma unroll
        for (int g = 0; g < G; ++g)
#pragma unroll
          for (int e = 0; e < VEC; ++e) dot[g] = fmaf(q[g][c][e], kf[e], dot[g]);
      }
      const int i = key + j * kpp;
      Sums::reduce(dot, lane_k);
      if (i < n && Sums::stores(lane_k))
#pragma unroll
        for (int k = 0; k < Sums::kKept; ++k) logits[(Sums::first_head(lane_k) + k) * SUB + i] = cap_logit(a, dot[k]);
    };
    stream_rows(kbase, rows, k_src, k_use);
    __syncthreads();

    // Phase 2: online softmax update with this sub-chunk's max and sum.
    float mx[G], sm[G], alpha[G];
#pragma unroll
    for (int g = 0; g < G; ++g) mx[g] = -INFINITY;
    for (int i = tid; i < n; i += nt)
#pragma unroll
      for (int g = 0; g < G; ++g) mx[g] = fmaxf(mx[g], logits[g * SUB + i]);
    block_reduce<G, true>(mx, red_max);
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float m_new = fmaxf(m_run[g], mx[g]);
      alpha[g] = exp2f(m_run[g] - m_new);
      m_run[g] = m_new;
      sm[g] = 0.f;
    }
    for (int i = tid; i < n; i += nt)
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float w = exp2f(logits[g * SUB + i] - m_run[g]);
        logits[g * SUB + i] = w;
        sm[g] += w;
      }
    block_reduce<G, false>(sm, red_sum);  // its barrier also publishes the weights
    float threshold[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      l_run[g] = l_run[g] * alpha[g] + sm[g];
      threshold[g] = a.prune_p * (l_run[g] + exp2f(first_logit[g] - m_run[g]));
#pragma unroll
      for (int c = 0; c < CPL; ++c)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[g][c][e] *= alpha[g];
    }

    // Phase 3: accumulate weight * v. Rows every head weighs below the threshold are not
    // read (their chunks are zeros and add nothing).
    auto v_src = [&](int j, int c) {
      const int i = key + j * kpp, ch = lane_k + c * TPK;
      bool read = i < n && ch < CHUNKS;
      if (prune && read) {
        read = false;
#pragma unroll
        for (int g = 0; g < G; ++g) read |= g < nh && logits[g * SUB + i] >= threshold[g];
      }
      const T *row = (s0 + i == pos) ? vnew : vbase + (s0 + i) * a.v_ss;
      return ChunkSrc{row + ch * VEC, read};
    };
    auto v_use = [&](int j, const uint4 (&chunk)[CPL]) {
      const int i = key + j * kpp;
      if (i >= n) return;
#pragma unroll
      for (int c = 0; c < CPL; ++c) {
        float vf[VEC];
        to_float(chunk[c], vf, T());
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float w = logits[g * SUB + i];
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[g][c][e] = fmaf(w, vf[e], acc[g][c][e]);
        }
      }
    };
    stream_rows(vbase, rows, v_src, v_use);
    __syncthreads();  // the next sub-chunk overwrites the weights
  }

  // Sum the key groups' accumulators: inside the warp by shuffles, then across warps.
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int c = 0; c < CPL; ++c)
#pragma unroll
      for (int e = 0; e < VEC; ++e)
#pragma unroll
        for (int off = TPK; off < 32; off *= 2)
          acc[g][c][e] += __shfl_xor_sync(0xffffffffu, acc[g][c][e], off);

  // Across warps through `red` [nwarps][DR], DR dims of a head at a time (all of them up to head_dim 256).
  constexpr int DR = kReduceDims<D>;
  static_assert(D % DR == 0 && DR % VEC == 0, "a chunk lies in one pass of the reduction");
  const int lane = tid % 32, warp = tid / 32, nwarps = nt / 32;
  float *red = logits;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (g >= nh) break;
#pragma unroll
    for (int d0 = 0; d0 < D; d0 += DR) {
      if (lane < TPK)
#pragma unroll
        for (int c = 0; c < CPL; ++c) {
          const int ch = lane_k + c * TPK, col = ch * VEC - d0;
          if (ch < CHUNKS && (D == DR || (col >= 0 && col < DR)))
#pragma unroll
            for (int e = 0; e < VEC; ++e) red[warp * DR + col + e] = acc[g][c][e];
        }
      __syncthreads();
      for (int d = tid; d < DR; d += nt) {
        float s = 0.f;
        for (int w = 0; w < nwarps; ++w) s += red[w * DR + d];
        write_result<T, D>(a, b, h0 + g, split, d0 + d, m_run[g], l_run[g], s);
      }
      __syncthreads();  // before the next pass or head reuses `red`
    }
  }
  if (a.split_len > 0) combine_if_last<T, D>(a, b, h0, nh, start, pos, blockDim.x);
}

}  // namespace ffa
