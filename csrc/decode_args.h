// The arguments every decode and combine kernel receives, already validated by ffa_api.cu.
#pragma once

#include <math.h>
#include <stdint.h>

namespace ffa {

constexpr double kLog2e = 1.4426950408889634;  // logits are kept in base-2 units: s_2 = s_e log2 e

struct DecodeArgs {
  const void *q, *new_k, *new_v;
  void *k_cache, *v_cache, *out;
  int64_t q_sb, q_sh, nk_sb, nk_sh, nv_sb, nv_sh;   // element strides
  int64_t k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, o_sb, o_sh;

  const void *pos_ptr, *start_ptr;  // device arrays or nullptr (then the scalars hold)
  int64_t pos_scalar, start_scalar;
  int pos_is64, start_is64;

  float scale_log2;  // softmax_scale * log2(e): logits are kept in base-2 units
  float cap_log2, inv_cap_log2;  // softcap * log2(e) and its inverse; 0, 0: no softcap (cap_logit)
  float prune_p;
  const void *sinks;  // [heads] sink logits of the kernel's dtype T, or nullptr (denominator, combine.cuh)
  int heads, group, heads_per_block, max_len;
  int split_len, num_splits;  // split_len == 0: one block per sequence, no combine
  int stages, tile_rows;      // the TMA kernel's ring: stages of tile_rows positions (decode_tma.cuh)
  int cluster;                // the TMA kernel's split blocks per thread block cluster (1: none)
  float *part_out;            // [batch, heads, num_splits, head_dim] normalized partial outputs of each split
                              // (of each cluster in a cluster launch: rows 0 .. ceil(num_splits / cluster) - 1)
  float *part_lse;            // [batch, heads, num_splits] their log2-sum-exps
  int *counters;              // [batch, heads / heads_per_block] finished split blocks; zero between launches
};

// Position `b` of an index array, or the scalar when no array was given.
__device__ __forceinline__ int64_t read_index(const void *p, int is64, int64_t scalar, int b) {
  if (p == nullptr) return scalar;
  return is64 ? static_cast<const int64_t *>(p)[b] : static_cast<const int32_t *>(p)[b];
}

// Attention-logit softcapping of a base-2 logit s: c * tanh(s / c) with c = softcap * log2(e), which is
// softcap * tanh(s_e / softcap) in natural units (s = s_e * log2 e). Both decode kernels cap every
// logit, the pruning bounds' first-position logits included, so those bounds stay valid.
__device__ __forceinline__ float cap_logit(const DecodeArgs &a, float s) {
  return a.cap_log2 > 0.f ? a.cap_log2 * tanhf(s * a.inv_cap_log2) : s;
}

// The positions sequence b attends to are [start, pos]. Returns false for a position
// outside the cache or a start beyond it: such a sequence gets NaN output and no cache write.
__device__ __forceinline__ bool sequence_range(const DecodeArgs &a, int b, int64_t &start,
                                               int64_t &pos) {
  pos = read_index(a.pos_ptr, a.pos_is64, a.pos_scalar, b);
  start = read_index(a.start_ptr, a.start_is64, a.start_scalar, b);
  return pos >= 0 && pos < a.max_len && start >= 0 && start <= pos;
}

}  // namespace ffa
