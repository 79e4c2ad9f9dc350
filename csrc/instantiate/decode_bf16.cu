// Decode and combine kernels for __nv_bfloat16 caches (see launch.cuh).
#include "../launch.cuh"

template cudaError_t ffa::launch_decode<__nv_bfloat16>(const DecodeArgs &, int, int, int, int, bool, cudaStream_t);
