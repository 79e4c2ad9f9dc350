// Decode and combine kernels for float caches (see launch.cuh).
#include "../launch.cuh"

template cudaError_t ffa::launch_decode<float>(const DecodeArgs &, int, int, int, int, bool, cudaStream_t);
