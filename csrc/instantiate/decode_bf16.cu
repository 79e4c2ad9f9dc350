// Decode and combine kernels for __nv_bfloat16 caches (see launch.cuh).
#include "../launch.cuh"

namespace ffa {
template FFA_LAUNCH_DECODE(__nv_bfloat16);
}
