// Decode and combine kernels for __half caches (see launch.cuh).
#include "../launch.cuh"

namespace ffa {
template FFA_LAUNCH_DECODE(__half);
}
