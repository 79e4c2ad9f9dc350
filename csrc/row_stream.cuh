// Streaming a key group's cache rows from global memory to its lanes, two ways.
//
// A key group takes rows j = 0 .. rows-1 of a sub-chunk. For each lane, `src(j, c)` gives the
// address of chunk c (< CPL) of row j and whether to read it (a chunk not read is zeros, and
// its address need not be valid);
// `use(j, chunk)` consumes the lane's CPL chunks of row j. `rows` is the same for every thread
// of the block and every thread calls `use` for the same j in the same order, so `use` may
// shuffle across the warp. Both ways may call `use` for a few j >= rows (zero chunks).
//
// RegisterRows: U rows are loaded into registers, then used; U loads in flight per lane.
// RingRows: asynchronous copies into a per-thread ring of R slots of shared memory, R - 1 rows
//   ahead of the row in use. More loads in flight at no register cost, which the multi-head
//   kernels need: their q and accumulators fill the register file. On an H100 the ring made
//   the 4-head kernel 6-16% faster and the one-head kernel 5-15% slower, whose lean loop
//   issues fewer instructions per byte with plain loads (bench/results/kernel-ring-h100.md).
#pragma once

#include "async_copy.cuh"
#include "vec.cuh"

namespace ffa {

struct ChunkSrc {
  const void *ptr;
  bool read;
};

template <int CPL, int U>
struct RegisterRows {
  template <typename Src, typename Use>
  __device__ __forceinline__ static void stream(const void *, int rows, Src src, Use use) {
    for (int j0 = 0; j0 < rows; j0 += U) {
      uint4 raw[U][CPL];
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int c = 0; c < CPL; ++c) {
          const ChunkSrc s = src(j0 + u, c);
          raw[u][c] = s.read ? load_chunk(s.ptr) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
      for (int u = 0; u < U; ++u) use(j0 + u, raw[u]);
    }
  }
};

template <int CPL, int R>
struct RingRows {
  static_assert(R >= 2 && (R & (R - 1)) == 0, "the ring holds a power of two rows, at least 2");

  // `ring`: dynamic shared memory of R x CPL x 16 bytes per thread, laid out [slot][chunk][thread]
  // so that a warp's 16-byte accesses are consecutive. `valid`: any readable global address,
  // given to the copies of chunks not read (a zero-filling copy still takes an address).
  template <typename Src, typename Use>
  __device__ __forceinline__ static void stream(uint4 *ring, const void *valid, int rows, Src src, Use use) {
    const int nt = blockDim.x, tid = threadIdx.x;
#pragma unroll
    for (int j = 0; j < R - 1; ++j) issue(ring, nt, tid, valid, rows, src, j);
    for (int j = 0; j < rows; ++j) {
      issue(ring, nt, tid, valid, rows, src, j + R - 1);
      async_wait<R - 1>();  // row j has landed (this thread's own copies: no barrier needed)
      uint4 chunk[CPL];
#pragma unroll
      for (int c = 0; c < CPL; ++c) chunk[c] = *slot(ring, nt, tid, j, c);
      use(j, chunk);
    }
  }

 private:
  // Thread tid's slot of chunk c of row j (nt threads).
  __device__ __forceinline__ static uint4 *slot(uint4 *ring, int nt, int tid, int j, int c) {
    return ring + ((j % R) * CPL + c) * nt + tid;
  }
  // Issues the copies of row j (none past the last row) as one commit group: an empty group past
  // the end keeps the wait count uniform.
  template <typename Src>
  __device__ __forceinline__ static void issue(uint4 *ring, int nt, int tid, const void *valid, int rows, Src &src,
                                               int j) {
    if (j < rows)
#pragma unroll
      for (int c = 0; c < CPL; ++c) {
        const ChunkSrc s = src(j, c);
        copy_chunk_async(slot(ring, nt, tid, j, c), s.read ? s.ptr : valid, s.read);
      }
    async_commit();
  }
};

}  // namespace ffa
