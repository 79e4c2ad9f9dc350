// Decode attention on Hopper's bulk copy engine (TMA) and tensor cores: fp16 / bf16 caches, head_dim
// 64, 128 or 256, a whole group of up to 32 query heads per block, compute capability 9.0 and newer.
// Chosen per launch (the kernel field of ffa.h, FFA_KERNEL_TMA); older GPUs run decode_kernel.cuh
// and decode_mma.cuh.
//
// Algorithm. Block (split, head group, batch) takes the positions [lo, hi) of block_range
// (decode_block.cuh) for heads h0 .. h0+nh-1 of one kv head and computes an online softmax over
// them with mma.m16n8k16 (mma.cuh, fp32 accumulation): the query heads are the tiles' rows (M), in
// m-tiles of 16 (MT = ceil(nh / 16) of them, rows past nh zero), so one block reads each K/V row
// once for the whole group. Per 32 positions (a step of one consumer warp):
//   scores    S = Q K^T: A = Q (16 heads x 16 dims, ldmatrix), B = K^T (ldmatrix of K rows);
//             D/16 k-steps, 4 n-tiles of 8 positions; base-2 logits (softmax_scale * log2 e),
//             softcapped by cap_logit, positions >= hi masked to -inf
//   softmax   running max per head over the 4 lanes of a row (2 shuffles); the output is rescaled
//             by 2^(old max - new max) when some max changed
//   values    O += P V: A = P, which is S's accumulator fragments rounded to T (no shuffles),
//             B = V (ldmatrix.trans of V rows); D/8 n-tiles of O
// Rounding P to fp16/bf16 (as FlashAttention does) is the only arithmetic difference from
// decode_kernel.cuh. No pruning: p > 0 launches another kernel (ffa.launch).
//
// Memory layout. Each cache [batch, kv_heads, max_len, D] is described to the copy engine by a 4-D
// tensor map (dims D, max_len, kv_heads, batch; any 16-byte strides; launch.cuh's cache_tensor_map). A tile is R
// consecutive positions of one kv head, K and V, copied as D / 64 boxes of 64 elements x R rows
// each: a box row is 128 bytes, and its 16-byte chunk c lands at chunk c ^ (r % 8) of row r
// (128-byte swizzling), so the 8 rows one ldmatrix reads lie in 8 different bank groups
// (tile_offset). Rows past max_len arrive as zeros. Q sits in the same layout, one 16-row tile
// per m-tile. The loader counts bytes, not elements: a 1-byte element type would be 128 elements
// per box and a conversion in scores / values.
//
// Pipeline (warp specialization). C consumer warps (threads / 32) and one producer warp. Stage s of
// a ring of S stages holds one tile; two mbarriers per stage hand it back and forth:
//   producer (lane 0):  tile i: wait empty[i % S] (from the second round on), expect the tile's
//                       bytes on full[i % S], issue its boxes (issue_tile)
//   consumer warp w:    tile i: wait full[i % S], attend to its steps (attend_tile), arrive on empty[i % S]
// After the ring the producer warp only keeps the block's barriers: the merges run on the consumer
// threads (`consumers` threads in combine.cuh's calls), and the producer reads no shared memory
// (racecheck: bench/results/kernel-tma-cluster-h200.md).
// Consumer warp w serves m-tile w % MT and steps w / MT, w / MT + C / MT, ... of every tile,
// with its own running max, sum and output. The block's last tile is patched before use
// (patch_last_tile): the row at pos gets new_k / new_v (the cache row is written in this launch),
// V rows at or past hi become zero (a zero weight times a stale row could be NaN). At the end the
// warps of each m-tile merge (combine.cuh's merge_partial) through the stages' memory, and a split
// block hands over to combine_if_last, or in a cluster launch (the cluster field: C blocks of
// consecutive splits per thread block cluster) to cluster_combine, which merges the cluster's
// partials through distributed shared memory first, so that the workspace, and the one block that
// merges it, see a C-th of the rows (bench/results/kernel-tma-cluster-h200.md).
//
// Bytes in flight (Little's law). 4.8 TB/s over 132 SMs is ~36 GB/s, i.e. ~36 KB per microsecond,
// per SM; with one to two microseconds of loaded latency an SM needs 36-72 KB in flight, more to
// absorb the hand-offs (a stage is refilled only after its slowest consumer warp is done). A stage
// is 2 R D 2 bytes and a ring of S stages keeps S - 1 in flight while one is consumed: the
// heuristic's R = 128, S = 2 at D = 128 is 64 KB per stage, 64 KB in flight per block, 64-128 KB
// per SM (one or two blocks), as the read ceiling's bulk kernel's 128 KB (csrc/read.cu). The count
// holds where it is measured: the loader alone (this kernel with its consumers only waiting and
// releasing) reads large caches at 1.01-1.05x the read ceiling's time, and attending costs a few
// percent more (bench/results/kernel-tma-loader-h200.md).
//
// Programmatic dependent launch. With FFA's pdl launch field the kernel is launched with
// programmatic stream serialization: the barriers' set-up overlaps the previous kernel's tail, and
// grid_dependency_wait comes before anything reads global memory (q, the caches and positions may
// all be written by the kernels before it).
#pragma once

#include <cuda.h>  // CUtensorMap (the type only: no driver call here)
#include <math.h>

#include "bulk_copy.cuh"
#include "combine.cuh"
#include "decode_args.h"
#include "decode_block.cuh"
#include "mma.cuh"

namespace ffa {

constexpr int kTmaMinStages = 2, kTmaMaxStages = 8;
constexpr int kTmaMaxTileRows = 256;  // the copy engine's largest box
constexpr int kTmaTileRowsStep = 32;  // tile_rows is a multiple of this: a consumer warp's step (kStepRows)
constexpr int kTmaMaxHeads = 32;      // two m-tiles of 16 heads
constexpr int kBoxBytes = 128;    // one box row: the 128-byte swizzle's span

// Byte offset of 16-byte chunk c of row r in a tile of `rows` rows (D * sizeof(T) / 16 chunks per row)
// laid out as the copy engine writes it: one 128-byte-swizzled box of `rows` x 128 bytes per 8 chunks.
__host__ __device__ constexpr int tile_offset(int rows, int r, int c) {
  return (c / 8) * rows * kBoxBytes + r * kBoxBytes + ((c % 8) ^ (r % 8)) * 16;
}

// The most consumer threads a block of head_dim D has: head_dim 256 keeps O in 128 registers per
// thread, which fits the register file only for blocks of up to 128 consumers.
__host__ __device__ constexpr int tma_max_threads(int head_dim) { return head_dim > 128 ? 128 : 256; }

// The dynamic shared memory of a block: the ring (reused at the end for the warps' partials and the
// block's partial) and Q, plus 1024 bytes to align the boxes.
__host__ __device__ constexpr int tma_tile_bytes(int head_dim, int elem_bytes, int rows) {
  return rows * head_dim * elem_bytes;
}
__host__ __device__ constexpr int tma_warp_partial_bytes(int head_dim, int threads) {
  return threads / 32 * 16 * (head_dim + 2) * 4;  // [warp][16 rows] of o (D floats), m, l
}
__host__ __device__ constexpr int tma_partial_bytes(int head_dim, int threads, int heads_per_block) {
  // + the block's o / l and lse per head, in whole 16-byte chunks (Q's tiles follow, stored as uint4)
  return tma_warp_partial_bytes(head_dim, threads) + (heads_per_block * (head_dim + 1) * 4 + 15) / 16 * 16;
}
__host__ __device__ constexpr int tma_smem_bytes(int head_dim, int elem_bytes, int threads, int stages, int rows,
                                                 int heads_per_block) {
  const int ring = stages * 2 * tma_tile_bytes(head_dim, elem_bytes, rows);
  const int partials = tma_partial_bytes(head_dim, threads, heads_per_block);
  const int q_tiles = (heads_per_block + 15) / 16 * tma_tile_bytes(head_dim, elem_bytes, 16);
  return 1024 + (ring > partials ? ring : partials) + q_tiles;
}

// One consumer warp's share of the softmax: rows g and g + 8 of its m-tile (g = lane / 4), as a
// running max m, this lane's part of the running sum l, and O's fragments (dims 8j + 2t, +1).
template <int D>
struct WarpState {
  float o[D / 8][4];
  float m[2], l[2];

  __device__ __forceinline__ void clear() {  // no positions yet
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[j][e] = 0.f;
    m[0] = m[1] = -INFINITY, l[0] = l[1] = 0.f;
  }
};

// The producer's part of tile i: K and V boxes of rows [row0, row0 + rows) into stage `stage`.
template <typename T, int D>
__device__ __forceinline__ void issue_tile(const void *kmap, const void *vmap, uint8_t *stage, uint64_t *full,
                                           int rows, int64_t row0, int kvh, int b) {
  constexpr int kBoxElems = kBoxBytes / sizeof(T), kBoxes = D / kBoxElems;
  const int tile = tma_tile_bytes(D, sizeof(T), rows);
  bulk_arrive_expect(full, 2 * tile);
#pragma unroll
  for (int x = 0; x < kBoxes; ++x) {
    tma_load_4d(stage + x * rows * kBoxBytes, kmap, x * kBoxElems, int(row0), kvh, b, full);
    tma_load_4d(stage + tile + x * rows * kBoxBytes, vmap, x * kBoxElems, int(row0), kvh, b, full);
  }
}

// A barrier among the consumer warps only (barrier 1; __syncthreads is barrier 0).
__device__ __forceinline__ void consumer_barrier(int consumers) {
  asm volatile("bar.sync 1, %0;" ::"r"(consumers) : "memory");
}

// Q of heads h0 .. h0+nh-1 into MT 16-row tiles (rows past nh zero), by the consumer threads.
template <typename T, int D>
__device__ __forceinline__ void load_q(const DecodeArgs &a, int b, int h0, int nh, uint8_t *q_tiles, int consumers) {
  constexpr int CPR = D * int(sizeof(T)) / 16;
  const int mt = (nh + 15) / 16;
  for (int i = threadIdx.x; i < mt * 16 * CPR; i += consumers) {
    const int row = i / CPR, c = i % CPR;
    const uint4 v = row < nh ? *reinterpret_cast<const uint4 *>(static_cast<const T *>(a.q) + b * a.q_sb +
                                                               (h0 + row) * a.q_sh + c * (16 / sizeof(T)))
                             : make_uint4(0, 0, 0, 0);
    uint8_t *tile = q_tiles + (row / 16) * tma_tile_bytes(D, sizeof(T), 16);
    *reinterpret_cast<uint4 *>(tile + tile_offset(16, row % 16, c)) = v;
  }
}

// The new k/v row, when this block's range holds pos: consumer thread c < 2 D sizeof(T) / 16 holds
// chunk c of new_k then new_v, loaded at the start (its latency hidden behind the first copies),
// patched into the last tile and appended to the cache at the end.
template <typename T, int D>
struct NewRow {
  static constexpr int kChunks = 2 * D * int(sizeof(T)) / 16;
  bool held;
  uint4 chunk;

  __device__ __forceinline__ void load(const DecodeBlock<T> &blk) {
    const int c = threadIdx.x, half = kChunks / 2;
    held = blk.r.pos < blk.r.hi && c < kChunks;
    if (held)
      chunk = *reinterpret_cast<const uint4 *>((c < half ? blk.knew : blk.vnew) + (c % half) * (16 / sizeof(T)));
  }
  // The fused append (as append_new_row): the writer block stores the row at pos.
  __device__ __forceinline__ void append(const DecodeArgs &a, const DecodeBlock<T> &blk) const {
    const int c = threadIdx.x, half = kChunks / 2;
    if (!held || !blk.writer) return;
    T *row = const_cast<T *>(c < half ? blk.kbase + blk.r.pos * a.k_ss : blk.vbase + blk.r.pos * a.v_ss);
    *reinterpret_cast<uint4 *>(row + (c % half) * (16 / sizeof(T))) = chunk;
  }
};

// The block's last tile before use: row pos - row0 (if the tile holds pos) gets the new row, V rows
// from hi - row0 on become zero. By the consumer threads, then a barrier among them.
template <typename T, int D>
__device__ __forceinline__ void patch_last_tile(uint8_t *k_tile, uint8_t *v_tile, int rows, int64_t row0,
                                                const BlockRange &r, const NewRow<T, D> &row, int consumers) {
  constexpr int CPR = D * int(sizeof(T)) / 16;
  const int valid = int(r.hi - row0), at = int(r.pos - row0), c = threadIdx.x;
  // Every consumer warp is done with the stage's earlier tiles. The ring's barriers already order
  // those reads before these stores (through the producer's refill); this barrier states it
  // among the threads themselves, as compute-sanitizer's racecheck sees it.
  consumer_barrier(consumers);
  if (row.held && at >= 0 && at < valid)
    *reinterpret_cast<uint4 *>((c < CPR ? k_tile : v_tile) + tile_offset(rows, at, c % CPR)) = row.chunk;
  for (int i = valid * CPR + threadIdx.x; i < rows * CPR; i += consumers)
    *reinterpret_cast<uint4 *>(v_tile + tile_offset(rows, i / CPR, i % CPR)) = make_uint4(0, 0, 0, 0);
  proxy_fence_async();  // (rule of bulk_copy.cuh: ordinary stores before any later copy into the stage)
  consumer_barrier(consumers);
}

// Where this lane's ldmatrix rows lie in Q's tile and in a K or V tile of `rows` rows, for a
// step at tile row 0 (a step at row r0, a multiple of 8, lies r0 * kBoxBytes further: the swizzle
// depends on r % 8 only; its second 16 positions another 16 * kBoxBytes).
template <int D>
struct LaneOffsets {
  int q[D / 16], k[D / 16], v[D / 16];
  __device__ __forceinline__ explicit LaneOffsets(int rows) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      // A = Q: heads 0-7 / dims 16ks+0..7, 8-15 / +0..7, 0-7 / +8..15, 8-15 / +8..15
      q[ks] = tile_offset(16, lane % 8 + 8 * ((lane / 8) % 2), 2 * ks + lane / 16);
      // B = K^T: positions 0-7 / dims 16ks+0..7, 0-7 / +8..15, 8-15 / +0..7, 8-15 / +8..15
      k[ks] = tile_offset(rows, lane % 8 + 8 * (lane / 16), 2 * ks + (lane / 8) % 2);
      // B = V (transposed): positions 0-7 / dims 16ks+0..7, 8-15 / +0..7, 0-7 / +8..15, 8-15 / +8..15
      v[ks] = tile_offset(rows, lane % 8 + 8 * ((lane / 8) % 2), 2 * ks + lane / 16);
    }
  }
};

constexpr int kStepRows = 32;  // positions a consumer warp takes at a time: 4 n-tiles of 8
constexpr int kHalf = 16 * kBoxBytes;  // from a step's first 16 positions to its second

// S = Q K^T of the step at tile row r0: s[n] holds positions r0 + 8n + 2t, +1 (c0, c1: row g;
// c2, c3: row g + 8).
template <typename T, int D>
__device__ __forceinline__ void scores(const LaneOffsets<D> &at, const uint8_t *q_tile, const uint8_t *k_step,
                                       float (&s)[4][4]) {
#pragma unroll
  for (int n = 0; n < 4; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[n][e] = 0.f;
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t qa[4], kb[4], kc[4];
    ldmatrix_x4<false>(qa, q_tile + at.q[ks]);
    ldmatrix_x4<false>(kb, k_step + at.k[ks]);
    ldmatrix_x4<false>(kc, k_step + kHalf + at.k[ks]);
    mma_16816(s[0], qa, kb[0], kb[1], T());
    mma_16816(s[1], qa, kb[2], kb[3], T());
    mma_16816(s[2], qa, kc[0], kc[1], T());
    mma_16816(s[3], qa, kc[2], kc[3], T());
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Logits in base-2 units, softcapped, positions from `valid` on (a step past hi) masked; then the
// online softmax step: s becomes the weights 2^(s - new max), and what came before is rescaled
// (skipped when no row's max changed: alpha = 1).
template <int D>
__device__ __forceinline__ void softmax_update(const DecodeArgs &a, WarpState<D> &w, float (&s)[4][4], int valid) {
  const int t4 = threadIdx.x % 4;
#pragma unroll
  for (int n = 0; n < 4; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[n][e] = cap_logit(a, s[n][e] * a.scale_log2);
  if (valid < kStepRows)
#pragma unroll
    for (int n = 0; n < 4; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        if (8 * n + 2 * t4 + e % 2 >= valid) s[n][e] = -INFINITY;
  float alpha[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = s[0][2 * r];
#pragma unroll
    for (int n = 0; n < 4; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
    const float m_new = fmaxf(w.m[r], quad_max(mx));
    const float ref = m_new == -INFINITY ? 0.f : m_new;  // a row with no position yet: 2^(-inf) = 0
    alpha[r] = exp2f(w.m[r] - ref);
    w.m[r] = m_new;
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < 4; ++n)
#pragma unroll
      for (int e = 2 * r; e < 2 * r + 2; ++e) sum += s[n][e] = exp2f(s[n][e] - ref);
    w.l[r] = w.l[r] * alpha[r] + sum;
  }
  if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f))
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) w.o[j][e] *= alpha[e / 2];
}

// O += P V for the step at v_step (P: the weights from softmax_update).
template <typename T, int D>
__device__ __forceinline__ void values(const LaneOffsets<D> &at, const uint8_t *v_step, const float (&p)[4][4],
                                       WarpState<D> &w) {
  uint32_t pa[2][4];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    pa[h][0] = pack2(p[2 * h][0], p[2 * h][1], T()), pa[h][1] = pack2(p[2 * h][2], p[2 * h][3], T());
    pa[h][2] = pack2(p[2 * h + 1][0], p[2 * h + 1][1], T()), pa[h][3] = pack2(p[2 * h + 1][2], p[2 * h + 1][3], T());
  }
#pragma unroll
  for (int jj = 0; jj < D / 16; ++jj)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t vb[4];
      ldmatrix_x4<true>(vb, v_step + h * kHalf + at.v[jj]);
      mma_16816(w.o[2 * jj], pa[h], vb[0], vb[1], T());
      mma_16816(w.o[2 * jj + 1], pa[h], vb[2], vb[3], T());
    }
}

// A consumer warp's part of a tile: its steps of the rows [row0, row0 + rows) that lie below hi.
template <typename T, int D>
__device__ __forceinline__ void attend_tile(const DecodeArgs &a, WarpState<D> &w, const LaneOffsets<D> &at,
                                            const uint8_t *q_tile, const uint8_t *k_tile, const uint8_t *v_tile,
                                            int rows, int64_t row0, int64_t hi, int first_step, int step_stride) {
  const int64_t left = hi - row0;
  const int valid_rows = left < rows ? int(left) : rows;
  for (int st = first_step; st * kStepRows < valid_rows; st += step_stride) {
    float s[4][4];
    const int offset = st * kStepRows * kBoxBytes;
    scores<T, D>(at, q_tile, k_tile + offset, s);
    softmax_update<D>(a, w, s, valid_rows - st * kStepRows);
    values<T, D>(at, v_tile + offset, s, w);
  }
}

// The warp's partial for rows g and g + 8 of its m-tile into its slot of the partials buffer
// ([warp][16 rows][D + 2]: o, then m, l).
template <int D>
__device__ __forceinline__ void store_partial(const WarpState<D> &w, float *slot) {
  const int lane = threadIdx.x % 32, g = lane / 4, t4 = lane % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float *row = slot + (g + 8 * r) * (D + 2);
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
      *reinterpret_cast<float2 *>(row + 8 * j + 2 * t4) = make_float2(w.o[j][2 * r], w.o[j][2 * r + 1]);
    const float l = quad_sum(w.l[r]);
    if (t4 == 0) row[D] = w.m[r], row[D + 1] = l;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(tma_max_threads(D) + 32, 1) decode_tma_kernel(const DecodeArgs a,
                                                                       const __grid_constant__ CUtensorMap kmap,
                                                                       const __grid_constant__ CUtensorMap vmap) {
  static_assert(sizeof(T) == 2 && D % 64 == 0 && D <= 256, "16-bit rows of whole 128-byte boxes");
  extern __shared__ uint8_t smem_raw[];
  __shared__ __align__(8) uint64_t full[kTmaMaxStages], empty[kTmaMaxStages];
  const int consumers = blockDim.x - 32, warps = consumers / 32, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int stages = a.stages, rows = a.tile_rows, tile = tma_tile_bytes(D, sizeof(T), rows);
  uint8_t *ring = smem_raw + ((1024 - shared_address(smem_raw) % 1024) % 1024);
  const int ring_bytes = max(stages * 2 * tile, tma_partial_bytes(D, consumers, a.heads_per_block));
  uint8_t *q_tiles = ring + ring_bytes;
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) bulk_barrier_init(&full[s]), bulk_barrier_init(&empty[s], warps);
  }
  if (warp == warps && lane == 0) tensor_map_prefetch(&kmap), tensor_map_prefetch(&vmap);
  __syncthreads();  // barriers initialized
  grid_dependency_wait();

  DecodeBlock<T> blk;
  const bool attends = locate_block<T, D>(a, blk);
  if (!attends && !(a.cluster > 1 && cluster_has_work(a, blk.b, blk.split))) return;
  const int b = blk.b, nh = blk.nh, mtiles = (nh + 15) / 16;
  const BlockRange &r = blk.r;
  const int tiles = attends ? int((r.hi - r.lo + rows - 1) / rows) : 0;  // 0: a cluster's block without positions
  WarpState<D> w;  // the consumer warps'
  w.clear();
  NewRow<T, D> new_row;
  if (warp == warps) {
    if (lane == 0)
      for (int i = 0; i < tiles; ++i) {
        const int s = i % stages;
        if (i >= stages) bulk_wait(&empty[s], (i / stages - 1) & 1);
        issue_tile<T, D>(&kmap, &vmap, ring + s * 2 * tile, &full[s], rows, r.lo + int64_t(i) * rows, blk.kvh, b);
      }
  } else if (tiles > 0) {
    new_row.load(blk);
    load_q<T, D>(a, b, blk.h0, nh, q_tiles, consumers);
    consumer_barrier(consumers);  // Q in place
    const uint8_t *q_tile = q_tiles + (warp % mtiles) * tma_tile_bytes(D, sizeof(T), 16);
    const LaneOffsets<D> at(rows);
    for (int i = 0; i < tiles; ++i) {
      const int s = i % stages;
      uint8_t *k_tile = ring + s * 2 * tile, *v_tile = k_tile + tile;
      const int64_t row0 = r.lo + int64_t(i) * rows;
      bulk_wait(&full[s], (i / stages) & 1);
      if (i == tiles - 1) patch_last_tile<T, D>(k_tile, v_tile, rows, row0, r, new_row, consumers);
      attend_tile<T, D>(a, w, at, q_tile, k_tile, v_tile, rows, row0, r.hi, warp / mtiles, warps / mtiles);
      __syncwarp();
      if (lane == 0) barrier_arrive(&empty[s]);
    }
    new_row.append(a, blk);
  }
  allow_dependents();
  __syncthreads();  // every stage is consumed: the ring now holds the warps' partials
  if (warp < warps) store_partial<D>(w, reinterpret_cast<float *>(ring) + warp * 16 * (D + 2));
  __syncthreads();

  // Merge the warps of each m-tile (warps mt, mt + MT, ...), then write the result or the split's
  // partial, or in a cluster launch keep the block's partial (o / l, then the lse of each head) in
  // shared memory after the warps' for cluster_combine.
  const float *partials = reinterpret_cast<const float *>(ring);
  float *mine = reinterpret_cast<float *>(ring + tma_warp_partial_bytes(D, consumers));
  for (int i = threadIdx.x; i < nh * D && warp < warps; i += consumers) {
    const int h = i / D, d = i % D;
    float m = -INFINITY, l = 0.f, o = 0.f;
    for (int wi = h / 16; wi < warps; wi += mtiles) {
      const float *row = partials + (wi * 16 + h % 16) * (D + 2);
      merge_partial(m, l, o, row[D], row[D + 1], row[d]);
    }
    block_result<T, D>(a, b, blk.h0, nh, blk.split, i, m, l, o, mine);
  }
  combine_blocks<T, D>(a, b, blk.h0, nh, blk.split, mine, r.start, r.pos, consumers);
}

}  // namespace ffa
