// Warp and block sums in double for the per-sample reduction kernels.
#pragma once

#include <cuda_runtime.h>

namespace lipfast {
namespace cuda {

// Sum of v over the 32 lanes of a full warp; the result is valid in lane 0.
__device__ __forceinline__ double warp_sum(double v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sums of (u, v) over the block; the results are valid in thread 0. blockDim.x must be a multiple of 32
// (at most 1024) and every thread of the block must call it. Ends with a barrier, so it may be called
// again (the kernels loop over samples) and global writes made before it are visible after it.
__device__ __forceinline__ void block_sum2(double& u, double& v) {
  __shared__ double su[32], sv[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  u = warp_sum(u);
  v = warp_sum(v);
  if (lane == 0) {
    su[warp] = u;
    sv[warp] = v;
  }
  __syncthreads();
  if (warp == 0) {
    u = lane < warps ? su[lane] : 0.0;
    v = lane < warps ? sv[lane] : 0.0;
    u = warp_sum(u);
    v = warp_sum(v);
  }
  __syncthreads();
}

}  // namespace cuda
}  // namespace lipfast
