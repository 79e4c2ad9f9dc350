// Decode and combine kernels for float caches (see launch.cuh).
#include "../launch.cuh"

namespace ffa {
template FFA_LAUNCH_DECODE(float);
}
