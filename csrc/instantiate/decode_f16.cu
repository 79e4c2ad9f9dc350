// Decode and combine kernels for __half caches (see launch.cuh).
#include "../launch.cuh"

template cudaError_t ffa::launch_decode<__half>(const DecodeArgs &, int, int, int, int, bool, cudaStream_t);
