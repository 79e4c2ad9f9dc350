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
//      adds the weight of the sequence's first position to its running sum:
//      first_position_logit.)
// At the end the key groups' accumulators are summed (shuffles inside a warp, shared memory
// across warps) and divided by the sum; a split block writes its normalized partial output
// and log-sum-exp instead, and the last split block of its heads to finish combines them
// (combine.cuh), so a split launch is still one kernel.
//
// The kernel below reads in that order: load_query and first_position_logit, then per sub-chunk
// KeyRows streamed into KeyLogits (phase 1), softmax_update (phase 2), ValueRows streamed into
// ValueSums (phase 3), and at the end write_heads.
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

// A thread's registers for the block's heads: q prescaled to base-2 logits (zeros for unused heads
// and lanes) and the weighted sums of V, CPL chunks of VEC dims per head.
template <typename T, int D, int G>
using HeadRegs = float[G][RowShape<T, D>::CPL][RowShape<T, D>::VEC];

// Streams a key group's rows to its lanes (row_stream.cuh): through the shared-memory ring in the
// multi-head kernels, through registers in the one-head kernel.
template <typename T, int D, int G, typename Src, typename Use>
__device__ __forceinline__ void stream_rows(uint4 *ring, const void *valid, int rows, Src src, Use use) {
  constexpr int CPL = RowShape<T, D>::CPL;
  if constexpr (kUsesRing<G>)
    RingRows<CPL, kRingChunks / CPL>::stream(ring, valid, rows, src, use);
  else
    RegisterRows<CPL, kRowsInFlight>::stream(valid, rows, src, use);
}

// q of heads h0 .. h0+nh-1 of sequence b, this lane's chunks, times softmax_scale * log2 e.
template <typename T, int D, int G>
__device__ __forceinline__ void load_query(const DecodeArgs &a, int b, int h0, int nh, int lane_k,
                                           HeadRegs<T, D, G> &q) {
  using S = RowShape<T, D>;
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int c = 0; c < S::CPL; ++c) {
      const int ch = lane_k + c * S::TPK;
      if (g < nh && ch < S::CHUNKS) {
        const T *qrow = static_cast<const T *>(a.q) + b * a.q_sb + (h0 + g) * a.q_sh;
        to_float(load_chunk(qrow + ch * S::VEC), q[g][c], T());
#pragma unroll
        for (int e = 0; e < S::VEC; ++e) q[g][c][e] *= a.scale_log2;
      } else {
#pragma unroll
        for (int e = 0; e < S::VEC; ++e) q[g][c][e] = 0.f;
      }
    }
}

// Adds chunk c of a row (one of this lane's) times each head's q to dot.
template <typename T, int D, int G>
__device__ __forceinline__ void add_chunk_dots(const HeadRegs<T, D, G> &q, int c, uint4 chunk, float (&dot)[G]) {
  constexpr int VEC = RowShape<T, D>::VEC;
  float kf[VEC];
  to_float(chunk, kf, T());
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int e = 0; e < VEC; ++e) dot[g] = fmaf(q[g][c][e], kf[e], dot[g]);
}

// Pruning divides by a lower bound of the softmax denominator. A split block sees only its own
// positions, so it adds the sequence's first position (an attention sink in practice, often the
// largest weight): first_logit[g] holds that logit, or -inf when the block holds it or does not
// prune. Called by warp 0; read after phase 1's barrier.
template <typename T, int D, int G>
__device__ __forceinline__ void first_position_logit(const DecodeArgs &a, const DecodeBlock<T> &blk, int lane_k,
                                                     const HeadRegs<T, D, G> &q, float *first_logit) {
  using S = RowShape<T, D>;
  const bool needed = a.prune_p > 0.f && blk.r.lo > blk.r.start;
  const T *row = (blk.r.start == blk.r.pos) ? blk.knew : blk.kbase + blk.r.start * a.k_ss;
  float dot[G] = {};
#pragma unroll
  for (int c = 0; c < S::CPL; ++c) {
    const int ch = lane_k + c * S::TPK;
    add_chunk_dots<T, D, G>(q, c, needed && ch < S::CHUNKS ? load_chunk(row + ch * S::VEC) : make_uint4(0, 0, 0, 0),
                            dot);
  }
#pragma unroll
  for (int g = 0; g < G; ++g) {
    dot[g] = row_sum<S::TPK>(dot[g]);
    if (threadIdx.x == 0) first_logit[g] = needed ? cap_logit(a, dot[g]) : -INFINITY;
  }
}

// The positions s0 .. s0+n-1 of a sub-chunk: key group `key` takes positions key + j * kpp (its
// row j), lane lane_k of the group chunks lane_k + c * TPK of each row. The row at `pos` comes
// from the new k/v, not the cache.
struct SubChunk {
  int64_t s0, pos;
  int n, key, kpp, lane_k;
  __device__ __forceinline__ int index(int j) const { return key + j * kpp; }
};

// Where chunk c of row j of a sub-chunk lies (`cache` rows `stride` apart, `fresh` the new row), and
// whether that row and chunk exist.
template <typename T, int D>
__device__ __forceinline__ const T *row_chunk(const SubChunk &sc, int j, int c, const T *cache, int64_t stride,
                                              const T *fresh) {
  using S = RowShape<T, D>;
  const int i = sc.index(j);
  const T *row = (sc.s0 + i == sc.pos) ? fresh : cache + (sc.s0 + i) * stride;
  return row + (sc.lane_k + c * S::TPK) * S::VEC;
}
template <typename T, int D>
__device__ __forceinline__ bool chunk_exists(const SubChunk &sc, int j, int c) {
  using S = RowShape<T, D>;
  return sc.index(j) < sc.n && sc.lane_k + c * S::TPK < S::CHUNKS;
}

// Phase 1's rows: the K rows of the sub-chunk.
template <typename T, int D>
struct KeyRows {
  const SubChunk &sc;
  const DecodeArgs &a;
  const T *kbase, *knew;
  __device__ __forceinline__ ChunkSrc operator()(int j, int c) const {
    return ChunkSrc{row_chunk<T, D>(sc, j, c, kbase, a.k_ss, knew), chunk_exists<T, D>(sc, j, c)};
  }
};

// Phase 1's use of a K row: its logits for all G heads (dots reduced over the row's TPK lanes, all
// heads at once: RowSums), softcapped, into logits[g * SUB + i].
template <typename T, int D, int G>
struct KeyLogits {
  const SubChunk &sc;
  const DecodeArgs &a;
  const HeadRegs<T, D, G> &q;
  float *logits;
  __device__ __forceinline__ void operator()(int j, const uint4 (&chunk)[RowShape<T, D>::CPL]) const {
    using Sums = RowSums<G, RowShape<T, D>::TPK>;
    constexpr int SUB = kLogitFloats / G;
    float dot[G] = {};
#pragma unroll
    for (int c = 0; c < RowShape<T, D>::CPL; ++c) add_chunk_dots<T, D, G>(q, c, chunk[c], dot);
    const int i = sc.index(j);
    Sums::reduce(dot, sc.lane_k);
    if (i < sc.n && Sums::stores(sc.lane_k))
#pragma unroll
      for (int k = 0; k < Sums::kKept; ++k)
        logits[(Sums::first_head(sc.lane_k) + k) * SUB + i] = cap_logit(a, dot[k]);
  }
};

// Phase 2: the online softmax update with the sub-chunk's logits. The block-wide max and sum of
// its n logits per head update the running max m_run and sum l_run, the logits become unnormalized
// weights 2^(s - m_run) in place, the accumulators are rescaled, and threshold[g] becomes the
// weight below which a V row is not read (p times a lower bound of the denominator: the running
// sum and the first position's weight). Ends with the weights visible to the block.
template <typename T, int D, int G>
__device__ __forceinline__ void softmax_update(const DecodeArgs &a, int n, float *logits, float *red_max,
                                               float *red_sum, const float *first_logit, float (&m_run)[G],
                                               float (&l_run)[G], HeadRegs<T, D, G> &acc, float (&threshold)[G]) {
  using S = RowShape<T, D>;
  constexpr int SUB = kLogitFloats / G;
  const int tid = threadIdx.x, nt = blockDim.x;
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
#pragma unroll
  for (int g = 0; g < G; ++g) {
    l_run[g] = l_run[g] * alpha[g] + sm[g];
    threshold[g] = a.prune_p * (l_run[g] + exp2f(first_logit[g] - m_run[g]));
#pragma unroll
    for (int c = 0; c < S::CPL; ++c)
#pragma unroll
      for (int e = 0; e < S::VEC; ++e) acc[g][c][e] *= alpha[g];
  }
}

// Phase 3's rows: the V rows of the sub-chunk, but with pruning (`prune`: p > 0) not those that every
// head weighs below its threshold (their chunks are zeros and add nothing).
template <typename T, int D, int G>
struct ValueRows {
  const SubChunk &sc;
  const DecodeArgs &a;
  const T *vbase, *vnew;
  const float *logits;
  const float (&threshold)[G];
  int nh;
  bool prune;
  __device__ __forceinline__ ChunkSrc operator()(int j, int c) const {
    constexpr int SUB = kLogitFloats / G;
    bool read = chunk_exists<T, D>(sc, j, c);
    if (prune && read) {
      read = false;
#pragma unroll
      for (int g = 0; g < G; ++g) read |= g < nh && logits[g * SUB + sc.index(j)] >= threshold[g];
    }
    return ChunkSrc{row_chunk<T, D>(sc, j, c, vbase, a.v_ss, vnew), read};
  }
};

// Phase 3's use of a V row: acc[g] += weight[g] * v for every head.
template <typename T, int D, int G>
struct ValueSums {
  const SubChunk &sc;
  const float *logits;
  HeadRegs<T, D, G> &acc;
  __device__ __forceinline__ void operator()(int j, const uint4 (&chunk)[RowShape<T, D>::CPL]) const {
    using S = RowShape<T, D>;
    constexpr int SUB = kLogitFloats / G;
    const int i = sc.index(j);
    if (i >= sc.n) return;
#pragma unroll
    for (int c = 0; c < S::CPL; ++c) {
      float vf[S::VEC];
      to_float(chunk[c], vf, T());
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float w = logits[g * SUB + i];
#pragma unroll
        for (int e = 0; e < S::VEC; ++e) acc[g][c][e] = fmaf(w, vf[e], acc[g][c][e]);
      }
    }
  }
};

// The block's result: the key groups' accumulators summed inside each warp by shuffles, then across
// warps through `red` ([nwarps][DR], DR = kReduceDims<D> dims of a head at a time), written as the
// output or as the split's partial (write_result).
template <typename T, int D, int G>
__device__ __forceinline__ void write_heads(const DecodeArgs &a, const DecodeBlock<T> &blk, int lane_k,
                                            HeadRegs<T, D, G> &acc, const float (&m_run)[G],
                                            const float (&l_run)[G], float *red) {
  using S = RowShape<T, D>;
  constexpr int DR = kReduceDims<D>;
  static_assert(D % DR == 0 && DR % S::VEC == 0, "a chunk lies in one pass of the reduction");
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int c = 0; c < S::CPL; ++c)
#pragma unroll
      for (int e = 0; e < S::VEC; ++e)
#pragma unroll
        for (int off = S::TPK; off < 32; off *= 2)
          acc[g][c][e] += __shfl_xor_sync(0xffffffffu, acc[g][c][e], off);

  const int tid = threadIdx.x, nt = blockDim.x, lane = tid % 32, warp = tid / 32, nwarps = nt / 32;
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (g >= blk.nh) break;
#pragma unroll
    for (int d0 = 0; d0 < D; d0 += DR) {
      if (lane < S::TPK)
#pragma unroll
        for (int c = 0; c < S::CPL; ++c) {
          const int ch = lane_k + c * S::TPK, col = ch * S::VEC - d0;
          if (ch < S::CHUNKS && (D == DR || (col >= 0 && col < DR)))
#pragma unroll
            for (int e = 0; e < S::VEC; ++e) red[warp * DR + col + e] = acc[g][c][e];
        }
      __syncthreads();
      for (int d = tid; d < DR; d += nt) {
        float s = 0.f;
        for (int w = 0; w < nwarps; ++w) s += red[w * DR + d];
        write_result<T, D>(a, blk.b, blk.h0 + g, blk.split, d0 + d, m_run[g], l_run[g], s);
      }
      __syncthreads();  // before the next pass or head reuses `red`
    }
  }
}

template <typename T, int D, int G>
__global__ void __launch_bounds__(kMaxThreads, min_blocks<G, D>()) decode_kernel(const DecodeArgs a) {
  using S = RowShape<T, D>;
  constexpr int SUB = kLogitFloats / G;
  static_assert(kRingChunks % S::CPL == 0, "a lane's chunks fill the ring's slots exactly");

  extern __shared__ uint4 ring[];  // RingRows' slots (multi-head kernels only)
  __shared__ float logits[kLogitFloats];  // [G][SUB]; reused for the final reduction
  __shared__ float red_max[kMaxWarps * G], red_sum[kMaxWarps * G];
  __shared__ float first_logit[G];

  const int tid = threadIdx.x, nt = blockDim.x;
  const int lane_k = tid % S::TPK, key = tid / S::TPK, kpp = nt / S::TPK;
  DecodeBlock<T> blk;
  if (!begin_block<T, D>(a, blk)) return;
  const int64_t lo = blk.r.lo, hi = blk.r.hi;

  HeadRegs<T, D, G> q;
  load_query<T, D, G>(a, blk.b, blk.h0, blk.nh, lane_k, q);
  const bool prune = a.prune_p > 0.f;
  HeadRegs<T, D, G> acc = {};
  float m_run[G], l_run[G];
#pragma unroll
  for (int g = 0; g < G; ++g) m_run[g] = -INFINITY, l_run[g] = 0.f;
  if (warp_of(tid) == 0) first_position_logit<T, D, G>(a, blk, lane_k, q, first_logit);

  for (int64_t s0 = lo; s0 < hi; s0 += SUB) {
    const SubChunk sc{s0, blk.r.pos, hi - s0 < SUB ? int(hi - s0) : SUB, key, kpp, lane_k};
    const int rows = (sc.n + kpp - 1) / kpp;  // per key group
    stream_rows<T, D, G>(ring, blk.kbase, rows, KeyRows<T, D>{sc, a, blk.kbase, blk.knew},
                         KeyLogits<T, D, G>{sc, a, q, logits});
    __syncthreads();
    float threshold[G];
    softmax_update<T, D, G>(a, sc.n, logits, red_max, red_sum, first_logit, m_run, l_run, acc, threshold);
    stream_rows<T, D, G>(ring, blk.vbase, rows,
                         ValueRows<T, D, G>{sc, a, blk.vbase, blk.vnew, logits, threshold, blk.nh, prune},
                         ValueSums<T, D, G>{sc, logits, acc});
    __syncthreads();  // the next sub-chunk overwrites the weights
  }

  write_heads<T, D, G>(a, blk, lane_k, acc, m_run, l_run, logits);
  if (a.split_len > 0) combine_if_last<T, D>(a, blk.b, blk.h0, blk.nh, blk.r.start, blk.r.pos, blockDim.x);
}

}  // namespace ffa
