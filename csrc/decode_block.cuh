// What every decode block does before it attends (decode_kernel.cuh, decode_mma.cuh): find
// which heads of which sequence it serves, its sequence's positions and its own share of
// them, mark an invalid sequence, and append the new k/v row to the cache (begin_block).
#pragma once

#include <math.h>

#include "decode_args.h"
#include "vec.cuh"

namespace ffa {

// Sequence b attends to [start, pos]; this block takes [lo, hi), its split's part of it.
struct BlockRange {
  int64_t start, pos, lo, hi;
};

// Fills `r` for block (split, ., b) serving heads h0 .. h0+nh-1. Returns false when the block
// has nothing to attend to. A sequence with a position outside the cache gets NaN output
// (written once, by split 0) and no cache write.
template <typename T, int D>
__device__ __forceinline__ bool block_range(const DecodeArgs &a, int b, int split, int h0, int nh,
                                            BlockRange &r) {
  if (!sequence_range(a, b, r.start, r.pos)) {
    if (split == 0)
      for (int i = threadIdx.x; i < nh * D; i += blockDim.x)
        static_cast<T *>(a.out)[b * a.o_sb + (h0 + i / D) * a.o_sh + i % D] = T(NAN);
    return false;
  }
  r.lo = 0, r.hi = a.max_len;
  if (a.split_len > 0) {
    r.lo = int64_t(split) * a.split_len;
    r.hi = r.lo + a.split_len < r.hi ? r.lo + a.split_len : r.hi;
  }
  r.lo = r.lo > r.start ? r.lo : r.start;
  r.hi = r.hi < r.pos + 1 ? r.hi : r.pos + 1;
  return r.lo < r.hi;
}

// Fused cache append: the block whose range holds `pos` writes new_k/new_v there (`writer`:
// only the first head group of a kv head). No block reads the cache at `pos` in this launch:
// they take that row from new_k/new_v.
template <typename T, int D>
__device__ __forceinline__ void append_new_row(const BlockRange &r, bool writer, T *krow, T *vrow,
                                               const T *knew, const T *vnew) {
  constexpr int VEC = Chunk<T>::kElems, CHUNKS = D / VEC;
  if (!writer || r.pos < r.lo || r.pos >= r.hi) return;
  for (int c = threadIdx.x; c < 2 * CHUNKS; c += blockDim.x) {
    const bool is_k = c < CHUNKS;
    const int ch = is_k ? c : c - CHUNKS;
    *reinterpret_cast<uint4 *>((is_k ? krow : vrow) + ch * VEC) = load_chunk((is_k ? knew : vnew) + ch * VEC);
  }
}

// Block (split, head group, batch) of a launch: query heads h0 .. h0+nh-1, which share kv head
// kvh of sequence b, and the rows of that kv head (cache and new row).
template <typename T>
struct DecodeBlock {
  int b, split, h0, nh, kvh;
  bool writer;  // the first head group of its kv head: it appends the new row
  const T *kbase, *vbase, *knew, *vnew;
  BlockRange r;
};

// Fills `blk` from the block's index (block_range included). Returns false when the block has
// nothing to attend to.
template <typename T, int D>
__device__ __forceinline__ bool locate_block(const DecodeArgs &a, DecodeBlock<T> &blk) {
  const int subgroups = a.group / a.heads_per_block;
  const int kvh = blockIdx.y / subgroups, b = blockIdx.z;
  blk.b = b, blk.split = blockIdx.x, blk.nh = a.heads_per_block, blk.kvh = kvh;
  blk.h0 = kvh * a.group + (blockIdx.y % subgroups) * a.heads_per_block;
  blk.writer = blockIdx.y % subgroups == 0;
  if (!block_range<T, D>(a, b, blk.split, blk.h0, blk.nh, blk.r)) return false;
  blk.kbase = static_cast<const T *>(a.k_cache) + b * a.k_sb + kvh * a.k_sh;
  blk.vbase = static_cast<const T *>(a.v_cache) + b * a.v_sb + kvh * a.v_sh;
  blk.knew = static_cast<const T *>(a.new_k) + b * a.nk_sb + kvh * a.nk_sh;
  blk.vnew = static_cast<const T *>(a.new_v) + b * a.nv_sb + kvh * a.nv_sh;
  return true;
}

// locate_block, then the fused append (append_new_row): what comes before attending.
template <typename T, int D>
__device__ __forceinline__ bool begin_block(const DecodeArgs &a, DecodeBlock<T> &blk) {
  if (!locate_block<T, D>(a, blk)) return false;
  append_new_row<T, D>(blk.r, blk.writer, const_cast<T *>(blk.kbase + blk.r.pos * a.k_ss),
                       const_cast<T *>(blk.vbase + blk.r.pos * a.v_ss), blk.knew, blk.vnew);
  return true;
}

}  // namespace ffa
