// Vector helpers: one 16-byte load or store of a row chunk, converted to or from float.
//
// A "chunk" is 16 bytes of one head_dim row: 8 half/bfloat16 values or 4 floats. All
// kernels move cache rows in chunks so that every global access is a 16-byte vector.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace ffa {

template <typename T>
struct Chunk {
  static constexpr int kElems = 16 / sizeof(T);
};

__device__ __forceinline__ uint4 load_chunk(const void *p) {
  return *reinterpret_cast<const uint4 *>(p);
}

__device__ __forceinline__ void to_float(const uint4 &raw, float (&f)[8], __half) {
  const __half2 *h = reinterpret_cast<const __half2 *>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 v = __half22float2(h[i]);
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}

__device__ __forceinline__ void to_float(const uint4 &raw, float (&f)[8], __nv_bfloat16) {
  const __nv_bfloat162 *h = reinterpret_cast<const __nv_bfloat162 *>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float2 v = __bfloat1622float2(h[i]);
    f[2 * i] = v.x;
    f[2 * i + 1] = v.y;
  }
}

__device__ __forceinline__ void to_float(const uint4 &raw, float (&f)[4], float) {
  f[0] = __uint_as_float(raw.x);
  f[1] = __uint_as_float(raw.y);
  f[2] = __uint_as_float(raw.z);
  f[3] = __uint_as_float(raw.w);
}

// Store n floats (n = 16 / sizeof(T)) as one chunk of T.
template <typename T>
__device__ __forceinline__ void store_chunk(void *p, const float *f);

template <>
__device__ __forceinline__ void store_chunk<__half>(void *p, const float *f) {
  uint4 raw;
  __half2 *h = reinterpret_cast<__half2 *>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
  *reinterpret_cast<uint4 *>(p) = raw;
}

template <>
__device__ __forceinline__ void store_chunk<__nv_bfloat16>(void *p, const float *f) {
  uint4 raw;
  __nv_bfloat162 *h = reinterpret_cast<__nv_bfloat162 *>(&raw);
#pragma unroll
  for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  *reinterpret_cast<uint4 *>(p) = raw;
}

template <>
__device__ __forceinline__ void store_chunk<float>(void *p, const float *f) {
  *reinterpret_cast<float4 *>(p) = make_float4(f[0], f[1], f[2], f[3]);
}

}  // namespace ffa
