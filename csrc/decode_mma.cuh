// Decode attention for groups of query heads on tensor cores (fp16 / bf16 caches, head_dim 64
// or 128, sm_80 and newer; exact: prune_p is not used). Chosen per launch (the tensor_cores
// field of ffa.h): the tuner measures it against decode_kernel.cuh for every shape.
//
// Why. A block serving G query heads of one kv head does G multiply-adds per cache element for
// the logits and G more for the values. On CUDA cores (decode_kernel.cuh) a 4-head block runs
// out of instruction issue before it runs out of memory bandwidth: on an H100 skipping half
// the bytes (pruning) did not make it faster (bench/results/kernel-targets-h100.md). Here the
// block's heads are the rows of a 16-row tile (rows >= heads_per_block are zeros) and warps
// multiply it with 16-position tiles of K and V by mma.m16n8k16 (mma.cuh), fp32 accumulation.
//
// Work. Block (split, head group, batch) is laid out as in decode_kernel.cuh and takes the
// positions [lo, hi) of block_range (decode_block.cuh), cut into tiles of 16 consecutive
// positions; warp w takes tiles w, w + W, w + 2W, ... (W warps). Each warp streams its tiles'
// K and V rows with cp.async into its own ring of kMmaStages stages of shared memory, so the
// loop has no block barrier, and keeps its own online softmax (running max and sum per head)
// and output accumulator (16 x D floats as mma fragments). Per tile:
//   S = Q K^T          D/16 k-steps x 2 n-tiles of 8 positions; positions >= hi masked to -inf;
//                      scaled to base-2 logits (softmax_scale * log2 e) in fp32
//   softmax update     max and sum per head row over the 4 lanes that share it (2 shuffles);
//                      the accumulator rows are rescaled by 2^(old max - new max)
//   O += P V           P = 2^(S - max) rounded to T is already the A operand (mma.cuh), V^T's
//                      fragments come from ldmatrix.trans; D/8 n-tiles
// Rounding P to fp16/bf16 (as FlashAttention does) is the only arithmetic difference from
// decode_kernel.cuh. At the end the warps' results are merged through shared memory the same
// way combine.cuh merges split blocks, and a split block hands over to combine_if_last.
//
// Shared memory. A stage holds the tile's K rows then its V rows, 16 x D elements each,
// row-major in 16-byte chunks; chunk c of row r sits at index c ^ (r % 8), so the 8 rows that
// one ldmatrix reads fall in 8 different bank groups.
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

template <typename T, int D>
__global__ void __launch_bounds__(kMaxThreads) decode_mma_kernel(const DecodeArgs a) {
  static_assert(sizeof(T) == 2 && (D == 64 || D == 128), "fp16/bf16 rows of 8 or 16 chunks");
  constexpr int VEC = 8, CPR = D / VEC;  // elements per chunk, chunks per row
  constexpr int KSTEPS = D / 16, MTILES = D / 16, STAGE = 2 * kTileRows * CPR;  // STAGE in chunks
  static_assert(mma_smem_bytes(D, 32) >= kHeads * D * 4 && mma_smem_bytes(D, 64) >= kLogitFloats * 4,
                "the stages are reused for the warps' outputs and combine_if_last's weights");
  extern __shared__ uint4 smem[];
  __shared__ float warp_max[kMaxWarps][kHeads], warp_sum[kMaxWarps][kHeads];
  __shared__ float red_max[kMaxWarps], red_sum[kMaxWarps];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, nwarps = blockDim.x / 32;
  const int g = lane / 4, t4 = lane % 4;  // fragment row and column pair (mma.cuh)
  const int b = blockIdx.z, split = blockIdx.x;
  const int subgroups = a.group / a.heads_per_block;
  const int kvh = blockIdx.y / subgroups;
  const int h0 = kvh * a.group + (blockIdx.y % subgroups) * a.heads_per_block;
  const int nh = a.heads_per_block;

  BlockRange r;
  if (!block_range<T, D>(a, b, split, h0, nh, r)) return;
  const T *kbase = static_cast<const T *>(a.k_cache) + b * a.k_sb + kvh * a.k_sh;
  const T *vbase = static_cast<const T *>(a.v_cache) + b * a.v_sb + kvh * a.v_sh;
  const T *knew = static_cast<const T *>(a.new_k) + b * a.nk_sb + kvh * a.nk_sh;
  const T *vnew = static_cast<const T *>(a.new_v) + b * a.nv_sb + kvh * a.nv_sh;
  append_new_row<T, D>(r, blockIdx.y % subgroups == 0, const_cast<T *>(kbase + r.pos * a.k_ss),
                       const_cast<T *>(vbase + r.pos * a.v_ss), knew, vnew);

  // Q^T as B fragments, one per k-step: column n = head h0 + n (zeros from nh on).
  uint32_t qb[KSTEPS][2];
  const T *qrow = static_cast<const T *>(a.q) + b * a.q_sb + (h0 + g) * a.q_sh;
#pragma unroll
  for (int s = 0; s < KSTEPS; ++s)
#pragma unroll
    for (int i = 0; i < 2; ++i)
      qb[s][i] = g < nh ? *reinterpret_cast<const uint32_t *>(qrow + 16 * s + 8 * i + 2 * t4) : 0u;

  const int tiles = int((r.hi - r.lo + kTileRows - 1) / kTileRows);
  const int mine = warp < tiles ? (tiles - warp + nwarps - 1) / nwarps : 0;  // this warp's tiles
  uint4 *ring = smem + warp * kMmaStages * STAGE;
  auto tile_start = [&](int i) { return r.lo + int64_t(warp + i * nwarps) * kTileRows; };

  // Copy this warp's i-th tile into stage i % kMmaStages; positions >= hi become zero rows
  // (their logits are masked, and a zero V row keeps 0 * garbage out of the sum).
  auto issue = [&](int i) {
    if (i < mine) {
      uint4 *kt = ring + (i % kMmaStages) * STAGE, *vt = kt + kTileRows * CPR;
      const int64_t p0 = tile_start(i);
#pragma unroll
      for (int c = lane; c < kTileRows * CPR; c += 32) {
        const int row = c / CPR, ch = c % CPR, slot = row * CPR + (ch ^ (row % 8));
        const int64_t p = p0 + row;
        const bool read = p < r.hi;
        const T *ks = p == r.pos ? knew : kbase + p * a.k_ss;
        const T *vs = p == r.pos ? vnew : vbase + p * a.v_ss;
        copy_chunk_async(kt + slot, read ? ks + ch * VEC : kbase, read);
        copy_chunk_async(vt + slot, read ? vs + ch * VEC : vbase, read);
      }
    }
    async_commit();  // an empty group past the end keeps the wait count uniform
  };

  // Per lane: heads 2t and 2t+1 (t = lane % 4) of the running max and sum (the sum over this
  // lane's positions only until the end), and O^T for dims 16j + g and 16j + g + 8.
  float o[MTILES][4] = {};
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {};
#pragma unroll
  for (int i = 0; i < kMmaStages - 1; ++i) issue(i);
  for (int i = 0; i < mine; ++i) {
    issue(i + kMmaStages - 1);
    async_wait<kMmaStages - 1>();  // tile i has landed (this lane's copies) ...
    __syncwarp();                  // ... and every lane's
    const uint4 *kt = ring + (i % kMmaStages) * STAGE, *vt = kt + kTileRows * CPR;

    // S^T = K Q^T: st[0..1] = position g, heads 2t, 2t+1; st[2..3] = position g + 8.
    float st[4] = {};
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      // matrices: positions 0-7 / dims 16ks+0..7, 8-15 / +0..7, 0-7 / +8..15, 8-15 / +8..15
      const int row = lane % 8 + 8 * ((lane / 8) % 2), ch = 2 * ks + lane / 16;
      uint32_t ka[4];
      ldmatrix_x4<false>(ka, kt + row * CPR + (ch ^ (row % 8)));
      mma_16816(st, ka, qb[ks][0], qb[ks][1], T());
    }

    const int64_t p0 = tile_start(i);
    float mx[2] = {-INFINITY, -INFINITY}, ref[2], sum[2] = {};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      st[e] = p0 + g + 8 * (e / 2) < r.hi ? st[e] * a.scale_log2 : -INFINITY;
      mx[e % 2] = fmaxf(mx[e % 2], st[e]);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
      for (int off = 4; off < 32; off *= 2) mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], off));
      const float m_new = fmaxf(m_run[h], mx[h]);
      ref[h] = m_new == -INFINITY ? 0.f : m_new;  // a head with no position yet: 2^(-inf) = 0
      const float alpha = exp2f(m_run[h] - ref[h]);
      m_run[h] = m_new;
      l_run[h] *= alpha;
#pragma unroll
      for (int j = 0; j < MTILES; ++j) o[j][h] *= alpha, o[j][h + 2] *= alpha;
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      st[e] = exp2f(st[e] - ref[e % 2]);
      sum[e % 2] += st[e];
    }
    l_run[0] += sum[0], l_run[1] += sum[1];

    // P as B fragments: the transposes of P^T's two 8 x 8 halves (positions 0-7, 8-15).
    const uint32_t pb0 = transpose8x8(pack2(st[0], st[1], T())), pb1 = transpose8x8(pack2(st[2], st[3], T()));
#pragma unroll
    for (int j = 0; j < MTILES; ++j) {
      // O^T += V^T P^T; matrices (transposed): positions 0-7 / dims 16j+0..7, 0-7 / +8..15,
      // 8-15 / +0..7, 8-15 / +8..15
      const int row = lane % 8 + 8 * (lane / 16), ch = 2 * j + (lane / 8) % 2;
      uint32_t va[4];
      ldmatrix_x4<true>(va, vt + row * CPR + (ch ^ (row % 8)));
      mma_16816(o[j], va, pb0, pb1, T());
    }
    __syncwarp();  // every lane is done with this stage before it is refilled
  }
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int off = 4; off < 32; off *= 2) l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], off);

  // Merge the warps: out = sum_w 2^(m_w - M) O_w / sum_w 2^(m_w - M) l_w, M = max_w m_w
  // (a warp without tiles has m = -inf and adds nothing).
  __syncthreads();  // every warp is done with its stages: they now hold the warps' outputs
  float *wo = reinterpret_cast<float *>(smem);  // [warp][head][D]
  if (g == 0)
#pragma unroll
    for (int h = 0; h < 2; ++h) warp_max[warp][2 * t4 + h] = m_run[h], warp_sum[warp][2 * t4 + h] = l_run[h];
#pragma unroll
  for (int j = 0; j < MTILES; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) wo[(warp * kHeads + 2 * t4 + e % 2) * D + 16 * j + g + 8 * (e / 2)] = o[j][e];
  __syncthreads();
  for (int i = tid; i < nh * D; i += blockDim.x) {
    const int row = i / D, d = i % D, h = h0 + row;
    float m = -INFINITY, l = 0.f, acc = 0.f;
    for (int w = 0; w < nwarps; ++w) m = fmaxf(m, warp_max[w][row]);
    for (int w = 0; w < nwarps; ++w) {
      const float f = exp2f(warp_max[w][row] - m);
      l += f * warp_sum[w][row];
      acc += f * wo[(w * kHeads + row) * D + d];
    }
    if (a.split_len == 0) {
      static_cast<T *>(a.out)[b * a.o_sb + h * a.o_sh + d] = T(acc / l);
    } else {
      const int64_t prow = (int64_t(b) * a.heads + h) * a.num_splits + split;
      a.part_out[prow * D + d] = acc / l;
      if (d == 0) a.part_lse[prow] = m + log2f(l);
    }
  }
  if (a.split_len > 0)
    combine_if_last<T, D>(a, b, h0, nh, r.start, r.pos, reinterpret_cast<float *>(smem), red_max, red_sum);
}

}  // namespace ffa
