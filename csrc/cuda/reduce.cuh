// Warp and block reductions shared by the CUDA decode kernels (blockDim.x a multiple of 32).
#pragma once

#include <cuda_runtime.h>
#include <math_constants.h>

namespace megalodon::cuda {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Sum (or max) over the block, returned to every thread. `scratch` is 32 floats of shared memory;
// the leading barrier lets consecutive reductions reuse it.
template <bool kMax>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
  v = kMax ? warp_max(v) : warp_sum(v);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : (kMax ? -CUDART_INF_F : 0.0f);
  return kMax ? warp_max(v) : warp_sum(v);
}

}  // namespace megalodon::cuda
