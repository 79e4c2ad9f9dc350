// Decode attention for groups of query heads on tensor cores (fp16 / bf16 caches, head_dim 64
// or 128, sm_80 and newer). Chosen per launch (the tensor_cores field of ffa.h): the tuner
// measures it against decode_kernel.cuh for every shape.
//
// Why. A block serving G query heads of one kv head does G multiply-adds per cache element for
// the logits and G more for the values. On CUDA cores (decode_kernel.cuh) a 4-head block runs
// out of instruction issue before it runs out of memory bandwidth, and 8-head blocks do not
// pay (bench/results/kernel-targets-h100.md). Here one mma.m16n8k16 (mma.cuh, fp32
// accumulation) does 16 positions x 8 heads x 16 dims, so one block reads each K/V row once
// for up to 8 heads: the block's heads are the 8 columns (N) of the tiles, unused ones zero.
//
// Work. Block (split, head group, batch) is laid out as in decode_kernel.cuh and takes the
// positions [lo, hi) of block_range (decode_block.cuh), cut into tiles of 16 consecutive
// positions; warp w takes tiles w, w + W, w + 2W, ... (W warps). Each warp streams its tiles'
// K and V rows with cp.async into its own ring of kMmaStages stages of shared memory, so the
// loop has no block barrier, and keeps its own online softmax (running max and sum per head)
// and output accumulator (O^T, D x 8 floats as mma fragments). Per tile, once copy_tile has
// filled its stage:
//   S^T = K Q^T        tile_scores: A = the K tile from ldmatrix, B = q (held in registers);
//                      D/16 k-steps; positions >= hi masked to -inf; base-2 logits
//                      (softmax_scale * log2 e), softcapped by cap_logit
//   softmax update     softmax_step, rescale: max per head over the 8 lanes that share it (3
//                      shuffles); the accumulator is rescaled by 2^(old max - new max)
//   O^T += V^T P^T     weights_b, accumulate: A = V^T from ldmatrix.trans, B = P^T's transpose
//                      (movmatrix) rounded to T; D/16 m-tiles
// Rounding P to fp16/bf16 (as FlashAttention does) is the only arithmetic difference from
// decode_kernel.cuh. With p > 0 (kPrune) a tile's V rows are copied only after its weights
// are known, and rows that every head weighs below the bound are not read (see the loop). At
// the end the warps' results are merged through shared memory with combine.cuh's merge_partial,
// and a split block hands over to combine_blocks: the split combine (combine_if_last), or in a
// cluster launch (compute capability 9.0+, the cluster field: blocks of consecutive splits per
// thread block cluster) cluster_combine, which merges the cluster's partials in distributed shared
// memory; where one cluster holds every split of a sequence that is the output, with no workspace
// round trip.
//
// Programmatic dependent launch (the pdl field, compute capability 9.0+): the kernel waits for the
// kernels before it (grid_dependency_wait) before it reads anything (q, the caches and positions
// may all be written by them), so only its launch and block set-up overlap their tail; it lets the
// next kernel start once its own reads are done (allow_dependents, after the loop).
//
// Shared memory. A stage holds the tile's K rows then its V rows, 16 x D elements each,
// row-major in 16-byte chunks; chunk c of row r sits at index c ^ (r % 8), so the 8 rows that
// one ldmatrix reads fall in 8 different bank groups. After the loop the stages hold the warps'
// outputs ([warp][head][D] floats) and, in a cluster launch, the block's partial after them.
#pragma once

#include <math.h>

#include "async_copy.cuh"
#include "combine.cuh"
#include "decode_args.h"
#include "decode_block.cuh"
#include "mma.cuh"
#include "reduce.cuh"

namespace ffa {

constexpr int kMmaStages = 3;  // per warp: kMmaStages - 1 tiles in flight while one is used
constexpr int kTileRows = 16;  // positions per tile
constexpr int kHeads = 8;      // query heads per block at most: the mma's n = 8 columns (>= kMaxHeadsPerBlock)

// Dynamic shared memory of a block: every warp's ring of 16-bit K and V tiles.
__host__ __device__ constexpr int mma_smem_bytes(int head_dim, int threads) {
  return threads / 32 * kMmaStages * 2 * kTileRows * head_dim * 2;
}

// One warp's tiles: its i-th tile is tile warp + i * nwarps of the block's positions [lo, hi), in
// stage i % kMmaStages of its ring (K rows, then V rows; 16 x D elements each, chunk c of row r at
// c ^ (r % 8)). `mine`: how many tiles the warp has.
template <typename T, int D>
struct WarpTiles {
  static constexpr int VEC = 8, CPR = D / VEC, STAGE = 2 * kTileRows * CPR;  // STAGE in chunks
  uint4 *ring;
  int64_t lo, hi, pos;
  int warp, nwarps, lane, mine;
  __device__ __forceinline__ int64_t start(int i) const { return lo + int64_t(warp + i * nwarps) * kTileRows; }
  __device__ __forceinline__ uint4 *k_tile(int i) const { return ring + (i % kMmaStages) * STAGE; }
  __device__ __forceinline__ uint4 *v_tile(int i) const { return ring + (i % kMmaStages) * STAGE + kTileRows * CPR; }
};

// Copies rows of the warp's i-th tile into its stage: the K rows if `k`, the V rows where keep(row) if
// `v`. Positions >= hi and V rows not kept become zero rows without a read (their logits are masked
// or their weights below p, and a zero V row adds nothing).
template <typename T, int D, typename Keep>
__device__ __forceinline__ void copy_tile(const DecodeArgs &a, const DecodeBlock<T> &blk, const WarpTiles<T, D> &w,
                                          int i, bool k, bool v, Keep keep) {
  constexpr int VEC = WarpTiles<T, D>::VEC, CPR = WarpTiles<T, D>::CPR;
  if (i >= w.mine) return;
  uint4 *kt = w.k_tile(i), *vt = w.v_tile(i);
  const int64_t p0 = w.start(i);
#pragma unroll
  for (int c = w.lane; c < kTileRows * CPR; c += 32) {
    const int row = c / CPR, ch = c % CPR, slot = row * CPR + (ch ^ (row % 8));
    const int64_t p = p0 + row;
    const bool in = p < w.hi;
    if (k) {
      const T *ks = p == w.pos ? blk.knew : blk.kbase + p * a.k_ss;
      copy_chunk_async(kt + slot, in ? ks + ch * VEC : blk.kbase, in);
    }
    if (v) {
      const bool read = in && keep(row);
      const T *vs = p == w.pos ? blk.vnew : blk.vbase + p * a.v_ss;
      copy_chunk_async(vt + slot, read ? vs + ch * VEC : blk.vbase, read);
    }
  }
}

// Every V row of a tile is kept (no pruning).
struct EveryRow {
  __device__ __forceinline__ bool operator()(int) const { return true; }
};

// A tile's V rows kept by pruning: row r (< 16) where a head of one of the 4 lanes of its fragment row
// keeps it, from the ballots of rows 0-7 (`lo`) and 8-15 (`hi`), 4 bits per row.
struct KeptRows {
  unsigned lo, hi;
  __device__ __forceinline__ bool operator()(int row) const { return ((row < 8 ? lo : hi) >> (4 * (row % 8)) & 15u) != 0; }
};

// S^T = K Q^T of the warp's tile i in base-2 units (softcapped), positions >= hi masked to -inf:
// st[0..1] = position g, heads 2t, 2t+1; st[2..3] = position g + 8. qb: Q^T's B fragments.
template <typename T, int D>
__device__ __forceinline__ void tile_scores(const DecodeArgs &a, const WarpTiles<T, D> &w, int i,
                                            const uint32_t (&qb)[D / 16][2], float (&st)[4]) {
  constexpr int CPR = WarpTiles<T, D>::CPR;
  const int lane = w.lane, g = lane / 4;
  const uint4 *kt = w.k_tile(i);
#pragma unroll
  for (int e = 0; e < 4; ++e) st[e] = 0.f;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    // matrices: positions 0-7 / dims 16ks+0..7, 8-15 / +0..7, 0-7 / +8..15, 8-15 / +8..15
    const int row = lane % 8 + 8 * ((lane / 8) % 2), ch = 2 * ks + lane / 16;
    uint32_t ka[4];
    ldmatrix_x4<false>(ka, kt + row * CPR + (ch ^ (row % 8)));
    mma_16816(st, ka, qb[ks][0], qb[ks][1], T());
  }
  const int64_t p0 = w.start(i);
#pragma unroll
  for (int e = 0; e < 4; ++e) st[e] = p0 + g + 8 * (e / 2) < w.hi ? cap_logit(a, st[e] * a.scale_log2) : -INFINITY;
}

// Online softmax step of a lane's heads 2t and 2t+1: the tile's logits st become weights 2^(s - ref)
// (ref: the new running max, 0 while a head has no position yet, as 2^(-inf) = 0); alpha (per head)
// rescales what came before; sum: this lane's weights of the tile, added to its running sum.
__device__ __forceinline__ void softmax_step(float (&st)[4], float (&m_run)[2], float (&l_run)[2], float (&ref)[2],
                                             float (&alpha)[2], float (&sum)[2]) {
  const float mx[2] = {fmaxf(st[0], st[2]), fmaxf(st[1], st[3])};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const float m_new = fmaxf(m_run[h], column_max(mx[h]));
    ref[h] = m_new == -INFINITY ? 0.f : m_new;
    alpha[h] = exp2f(m_run[h] - ref[h]);
    m_run[h] = m_new;
    sum[h] = 0.f;
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    st[e] = exp2f(st[e] - ref[e % 2]);
    sum[e % 2] += st[e];
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) l_run[h] = l_run[h] * alpha[h] + sum[h];
}

// O^T (this lane's fragments of D / 16 m-tiles) rescaled per head.
template <int MTILES>
__device__ __forceinline__ void rescale(float (&o)[MTILES][4], const float (&alpha)[2]) {
#pragma unroll
  for (int j = 0; j < MTILES; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[j][e] *= alpha[e % 2];
}

// P as B fragments: the transposes of P^T's two 8 x 8 halves (positions 0-7, 8-15), rounded to T.
template <typename T>
__device__ __forceinline__ void weights_b(const float (&w)[4], uint32_t (&pb)[2]) {
  pb[0] = transpose8x8(pack2(w[0], w[1], T()));
  pb[1] = transpose8x8(pack2(w[2], w[3], T()));
}

// O^T += V^T P^T for the V rows of the warp's tile i.
template <typename T, int D>
__device__ __forceinline__ void accumulate(const WarpTiles<T, D> &w, int i, const uint32_t (&pb)[2],
                                           float (&o)[D / 16][4]) {
  constexpr int CPR = WarpTiles<T, D>::CPR;
  const int lane = w.lane;
  const uint4 *vt = w.v_tile(i);
#pragma unroll
  for (int j = 0; j < D / 16; ++j) {
    // matrices (transposed): positions 0-7 / dims 16j+0..7, 0-7 / +8..15, 8-15 / +0..7, 8-15 / +8..15
    const int row = lane % 8 + 8 * (lane / 16), ch = 2 * j + (lane / 8) % 2;
    uint32_t va[4];
    ldmatrix_x4<true>(va, vt + row * CPR + (ch ^ (row % 8)));
    mma_16816(o[j], va, pb[0], pb[1], T());
  }
}

// Pruning's lower bound of the softmax denominator adds the weight of the sequence's first position
// when another warp or block holds it: first[h] is that logit of the lane's head 2t + h (-inf where
// not needed), from each head's q (its B fragments, head g in lane group g) dotted with the row.
template <typename T, int D>
__device__ __forceinline__ void first_position_logits(const DecodeArgs &a, const DecodeBlock<T> &blk, bool attends,
                                                      int warp, int lane, const uint32_t (&qb)[D / 16][2],
                                                      float (&first)[2]) {
  const int t4 = lane % 4;
  const BlockRange &r = blk.r;
  const bool needed = attends && !(warp == 0 && r.lo == r.start);  // tile 0 of warp 0 holds position start
  const T *krow = r.start == r.pos ? blk.knew : blk.kbase + r.start * a.k_ss;
  float dot = 0.f;  // head g's logit, over this lane's dims of q (those of its B fragments)
  if (needed)
#pragma unroll
    for (int s = 0; s < D / 16; ++s)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const float2 kf = unpack2(*reinterpret_cast<const uint32_t *>(krow + 16 * s + 8 * i + 2 * t4), T());
        const float2 qf = unpack2(qb[s][i], T());
        dot = fmaf(qf.x, kf.x, fmaf(qf.y, kf.y, dot));
      }
  dot += __shfl_xor_sync(0xffffffffu, dot, 1);
  dot += __shfl_xor_sync(0xffffffffu, dot, 2);
  const float f = needed ? cap_logit(a, dot * a.scale_log2) : -INFINITY;
  first[0] = __shfl_sync(0xffffffffu, f, 8 * t4);  // heads 2t and 2t+1 live in lanes 8t, 8t+4
  first[1] = __shfl_sync(0xffffffffu, f, 8 * t4 + 4);
}

template <typename T, int D, bool kPrune>
__global__ void __launch_bounds__(kMaxThreads) decode_mma_kernel(const DecodeArgs a) {
  static_assert(sizeof(T) == 2 && (D == 64 || D == 128), "fp16/bf16 rows of 8 or 16 chunks");
  constexpr int KSTEPS = D / 16, MTILES = D / 16, STAGE = WarpTiles<T, D>::STAGE;  // STAGE in chunks
  static_assert(mma_smem_bytes(D, 64) >= (3 * kHeads * D + kHeads) * 4,
                "the stages are reused for the warps' outputs and the block's partial");
  // The rings start on a 128-byte boundary whatever the static arrays before them (a 16-byte offset
  // made this kernel 6-17% slower: bench/results/kernel-tma-cluster-h200.md). The extern __shared__
  // arrays of one translation unit share this alignment: decode_kernel.cuh's ring in the fp16 / bf16
  // units too.
  extern __shared__ __align__(128) uint4 smem[];
  __shared__ float warp_max[kMaxWarps][kHeads], warp_sum[kMaxWarps][kHeads];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, nwarps = blockDim.x / 32;
  const int g = lane / 4, t4 = lane % 4;  // fragment row and column pair (mma.cuh)
  grid_dependency_wait();
  DecodeBlock<T> blk;
  const bool attends = begin_block<T, D>(a, blk);
  if (!attends && !(a.cluster > 1 && cluster_has_work(a, blk.b, blk.split))) return;
  const int b = blk.b, split = blk.split, h0 = blk.h0, nh = blk.nh;
  const BlockRange &r = blk.r;

  // Q^T as B fragments, one per k-step: column n = head h0 + n (zeros from nh on).
  uint32_t qb[KSTEPS][2];
  const T *qrow = static_cast<const T *>(a.q) + b * a.q_sb + (h0 + g) * a.q_sh;
#pragma unroll
  for (int s = 0; s < KSTEPS; ++s)
#pragma unroll
    for (int i = 0; i < 2; ++i)
      qb[s][i] = g < nh ? *reinterpret_cast<const uint32_t *>(qrow + 16 * s + 8 * i + 2 * t4) : 0u;

  const int tiles = attends ? int((r.hi - r.lo + kTileRows - 1) / kTileRows) : 0;  // 0: a cluster's block without positions
  const int mine = warp < tiles ? (tiles - warp + nwarps - 1) / nwarps : 0;  // this warp's tiles
  const WarpTiles<T, D> w{smem + warp * kMmaStages * STAGE, r.lo, r.hi, r.pos, warp, nwarps, lane, mine};

  // Per lane: heads 2t and 2t+1 (t = lane % 4) of the running max and sum (the sum over this
  // lane's positions only until the end), and O^T for dims 16j + g and 16j + g + 8.
  float o[MTILES][4] = {};
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {};

  if constexpr (!kPrune) {
    // K and V of a tile travel together, kMmaStages - 1 tiles ahead of their use.
#pragma unroll
    for (int i = 0; i < kMmaStages - 1; ++i) copy_tile(a, blk, w, i, true, true, EveryRow{}), async_commit();
    for (int i = 0; i < mine; ++i) {
      copy_tile(a, blk, w, i + kMmaStages - 1, true, true, EveryRow{});
      async_commit();                // an empty group past the end keeps the wait count uniform
      async_wait<kMmaStages - 1>();  // tile i has landed (this lane's copies) ...
      __syncwarp();                  // ... and every lane's
      float st[4], ref[2], alpha[2], sum[2];
      uint32_t pb[2];
      tile_scores(a, w, i, qb, st);
      softmax_step(st, m_run, l_run, ref, alpha, sum);
      rescale(o, alpha);
      weights_b<T>(st, pb);
      accumulate(w, i, pb, o);
      __syncwarp();  // every lane is done with this stage before it is refilled
    }
  } else {
    // Pruning. A V row is read only when some head weighs it >= p * (this warp's running sum,
    // plus the weight of the sequence's first position when another warp or block holds it):
    // that is a lower bound of the softmax denominator, so a skipped row's exact weight is below
    // p too. The weights of a tile are known only after its K, so V trails K by one tile:
    // iteration i computes tile i's weights, issues its kept V rows (with K of tile
    // i + kMmaStages - 1), then adds tile i-1's P V (P in `pending`, relative to the max before
    // tile i: O is rescaled after it).
    float first[2];
    first_position_logits<T, D>(a, blk, attends, warp, lane, qb, first);
    float l_warp[2] = {};  // the warp's running sum per head (l_run summed over its 8 lanes)
    uint32_t pending[2] = {};
#pragma unroll
    for (int i = 0; i < kMmaStages - 1; ++i) copy_tile(a, blk, w, i, true, false, EveryRow{}), async_commit();
    for (int i = 0; i < mine; ++i) {
      async_wait<kMmaStages - 2>();  // K of tile i has landed
      __syncwarp();
      float st[4], ref[2], alpha[2], sum[2], threshold[2];
      tile_scores(a, w, i, qb, st);
      softmax_step(st, m_run, l_run, ref, alpha, sum);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        l_warp[h] = l_warp[h] * alpha[h] + column_sum(sum[h]);
        threshold[h] = 2 * t4 + h < nh ? a.prune_p * (l_warp[h] + exp2f(first[h] - ref[h])) : INFINITY;
      }
      // rows g and g + 8 of the tile, kept if any head of any of the 4 lanes of the row keeps them
      const KeptRows kept{__ballot_sync(0xffffffffu, st[0] >= threshold[0] || st[1] >= threshold[1]),
                          __ballot_sync(0xffffffffu, st[2] >= threshold[0] || st[3] >= threshold[1])};
      copy_tile(a, blk, w, i + kMmaStages - 1, true, false, EveryRow{});
      copy_tile(a, blk, w, i, false, true, kept);
      async_commit();
      if (i > 0) {
        async_wait<1>();  // V of tile i-1 has landed
        __syncwarp();
        accumulate(w, i - 1, pending, o);
      }
      rescale(o, alpha);
      weights_b<T>(st, pending);
    }
    if (mine > 0) {
      async_wait<0>();
      __syncwarp();
      accumulate(w, mine - 1, pending, o);
    }
  }
  allow_dependents();
  l_run[0] = column_sum(l_run[0]), l_run[1] = column_sum(l_run[1]);

  // Merge the warps (merge_partial; a warp without tiles has m = -inf and adds nothing) into the
  // block's result (block_result; in a cluster launch kept after the warps' outputs).
  __syncthreads();  // every warp is done with its stages: they now hold the warps' outputs
  float *wo = reinterpret_cast<float *>(smem), *partial = wo + nwarps * kHeads * D;  // [warp][head][D], then the block's partial
  if (g == 0)
#pragma unroll
    for (int h = 0; h < 2; ++h) warp_max[warp][2 * t4 + h] = m_run[h], warp_sum[warp][2 * t4 + h] = l_run[h];
#pragma unroll
  for (int j = 0; j < MTILES; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) wo[(warp * kHeads + 2 * t4 + e % 2) * D + 16 * j + g + 8 * (e / 2)] = o[j][e];
  __syncthreads();
  for (int i = tid; i < nh * D; i += blockDim.x) {
    const int row = i / D, d = i % D;
    float m = -INFINITY, l = 0.f, acc = 0.f;
    for (int w = 0; w < nwarps; ++w)
      merge_partial(m, l, acc, warp_max[w][row], warp_sum[w][row], wo[(w * kHeads + row) * D + d]);
    block_result<T, D>(a, b, h0, nh, split, i, m, l, acc, partial);
  }
  combine_blocks<T, D>(a, b, h0, nh, split, partial, r.start, r.pos, blockDim.x);
}

}  // namespace ffa
