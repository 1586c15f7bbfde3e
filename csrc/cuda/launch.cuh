// Launch discipline shared by lipfast's CUDA kernels: a device guard for the tensor's
// device, the current stream (never the legacy default stream), grid sizes that never exceed the
// hardware limits, an early return on zero work, and a launch check after every launch.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace lipfast {
namespace cuda {

// Threads per block of the element-wise kernels (one thread per row). 256 keeps every SM busy from a
// few thousand rows on and divides the warp size.
constexpr int kThreadsPerBlock = 256;
// Threads per block of the per-sample reduction kernels (one block per sample): 4 warps is enough
// parallelism over the feature dimensions m, n of a Linear layer (hundreds to a few thousands)
// while leaving room for many resident blocks per SM.
constexpr int kReduceThreads = 128;
constexpr int kWarpSize = 32;
// gridDim.x may be up to 2^31 - 1; the kernels loop (grid-stride) over anything larger.
constexpr int64_t kMaxGridX = (int64_t{1} << 31) - 1;

// Blocks for `n` independent work items at `threads` per block, capped at the grid limit.
inline unsigned int blocks_for(int64_t n, int threads = kThreadsPerBlock) {
  const int64_t blocks = (n + threads - 1) / threads;
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), kMaxGridX));
}

// Threads per block for a per-item reduction over rows of length `width`: whole warps, no more than
// kReduceThreads, and no idle warps on narrow layers (a 10-wide output layer gets one warp).
inline int reduce_threads_for(int64_t width) {
  const int64_t warps = (std::max<int64_t>(width, 1) + kWarpSize - 1) / kWarpSize;
  return static_cast<int>(std::min<int64_t>(warps, kReduceThreads / kWarpSize) * kWarpSize);
}

// Blocks for one block per item (`n` items), capped at the grid limit (the kernel loops past it).
inline unsigned int blocks_per_item(int64_t n) {
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(n, 1), kMaxGridX));
}

// The stream every lipfast kernel launches on: the caller's current stream on the tensor's device.
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace cuda
}  // namespace lipfast

// Launch `kernel<<<grid, block, shmem, current stream>>>(args...)` and check the launch: a bad
// configuration surfaces here as a c10::Error naming this file and line, not at the next sync.
#define LIPFAST_CUDA_LAUNCH(kernel, grid, block, shmem, ...)                                  \
  do {                                                                                        \
    kernel<<<(grid), (block), (shmem), ::lipfast::cuda::current_stream()>>>(__VA_ARGS__);     \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                           \
  } while (0)
