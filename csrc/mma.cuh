// Tensor-core building blocks (sm_80 and newer): the m16n8k16 matrix multiply-accumulate with
// fp16 or bf16 operands and fp32 accumulators, and ldmatrix, which loads its operands from
// shared memory.
//
// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4; each 32-bit register holds two
// consecutive 16-bit elements, the lower column in the low half):
//   A, 16 x 16 row-major, 4 registers: a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..],
//                                      a3 = A[g+8][2t+8..]
//   B, 16 x 8 (k x n), 2 registers:    b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   C, 16 x 8 fp32, 4 registers:       c0, c1 = C[g][2t], C[g][2t+1];  c2, c3 = C[g+8][2t], C[g+8][2t+1]
// So the C fragments of two adjacent n-tiles (columns 0-7 and 8-15), rounded to 16 bits, are the
// A fragment of one 16-wide k step: {pack(c0,c1) of tile 0, pack(c2,c3) of tile 0, pack(c0,c1)
// of tile 1, pack(c2,c3) of tile 1}.
// ldmatrix.x4 loads four 8 x 8 matrices of 16-bit elements, matrix i from the 8 row addresses
// given by lanes 8i .. 8i+7; register i of lane L receives row L/4, columns 2(L%4) and 2(L%4)+1
// of matrix i (with .trans: column L/4, rows 2(L%4) and 2(L%4)+1), which is a B fragment
// register when the matrix rows are B's columns (without .trans) or B's rows (with .trans).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace ffa {

__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, __half) {
#if __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                          __nv_bfloat16) {
#if __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void *row) {
#if __CUDA_ARCH__ >= 800
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
#endif
}

// The transpose of an 8 x 8 matrix of 16-bit elements held one register per lane (lane L: row
// L/4, columns 2(L%4) and 2(L%4)+1), returned in the same layout.
__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t y = 0;
#if __CUDA_ARCH__ >= 800
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
#endif
  return y;
}

// Two floats rounded to one register of two 16-bit elements (x in the low half).
__device__ __forceinline__ uint32_t pack2(float x, float y, __half) {
  const __half2 h = __floats2half2_rn(x, y);
  return *reinterpret_cast<const uint32_t *>(&h);
}

__device__ __forceinline__ uint32_t pack2(float x, float y, __nv_bfloat16) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
  return *reinterpret_cast<const uint32_t *>(&h);
}

// The sum / max of x over the 8 lanes that hold one column of a C fragment (lanes t, t + 4,
// ..., t + 28: the same lane % 4), left in each of them.
__device__ __forceinline__ float column_sum(float x) {
#pragma unroll
  for (int off = 4; off < 32; off *= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

__device__ __forceinline__ float column_max(float x) {
#pragma unroll
  for (int off = 4; off < 32; off *= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}

// One register of two 16-bit elements as two floats (the low half first).
__device__ __forceinline__ float2 unpack2(uint32_t x, __half) {
  return __half22float2(*reinterpret_cast<const __half2 *>(&x));
}

__device__ __forceinline__ float2 unpack2(uint32_t x, __nv_bfloat16) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(&x));
}

}  // namespace ffa
