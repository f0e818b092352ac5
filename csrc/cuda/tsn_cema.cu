// TimestepNorm + CEMA decode step on the GPU: one thread block per (norm group, row).
//
// Grid (G, B): at batch 1 the 7B shape still launches G = 64 blocks, each streaming its g x N
// complex states once (read, update, write back in place). The group's features are staged in
// shared memory: first raw, for the within-token moments, then as the normalised values rounded to
// the model dtype, which is what CEMA consumes in the reference. Four adjacent lanes share a channel
// and split its N components, so a warp reads whole 32-byte sectors of the state.
#include <cuda_runtime.h>

#include "../common/decode_math.h"
#include "launch.h"
#include "reduce.cuh"

namespace megalodon::cuda {
namespace {

constexpr int kLanesPerChannel = 4;

template <typename S, bool kCema>
__global__ void __launch_bounds__(kTsnThreads) tsn_cema_kernel(const TsnCemaParams p) {
  using T = typename S::type;
  extern __shared__ float xs[];  // [g]
  __shared__ float scratch[32];
  __shared__ float norm[2];  // mean, 1/sqrt(var + eps)
  const int64_t D = p.dim, G = p.groups, g = D / G, N = p.ndim;
  const int64_t grp = blockIdx.x, b = blockIdx.y;
  const int64_t slot = p.slot_ids[b];
  const int64_t d0 = grp * g;
  const T* x = static_cast<const T*>(p.x) + b * D + d0;

  float sum = 0.0f;
  for (int64_t c = threadIdx.x; c < g; c += blockDim.x) {
    xs[c] = S::load(x[c]);
    sum += xs[c];
  }
  const float tok_mean = block_reduce<false>(sum, scratch) / static_cast<float>(g);
  float sq = 0.0f;
  for (int64_t c = threadIdx.x; c < g; c += blockDim.x) {
    const float dev = xs[c] - tok_mean;
    sq += dev * dev;
  }
  const float tok_var = block_reduce<false>(sq, scratch) / static_cast<float>(g);
  if (threadIdx.x == 0) {
    float* mean = p.mean + slot * G + grp;
    float* var = p.var + slot * G + grp;
    const GroupStats st = timestep_stats_update(p.position[slot] + p.prior_count, *mean, *var, tok_mean, tok_var);
    *mean = st.mean;
    *var = st.var;
    norm[0] = st.mean;
    norm[1] = rsqrtf(st.var + p.eps);
  }
  __syncthreads();
  const float mean = norm[0], rstd = norm[1];
  T* x_hat = static_cast<T*>(p.x_hat) + b * D + d0;
  for (int64_t c = threadIdx.x; c < g; c += blockDim.x) {
    const T stored = S::store((xs[c] - mean) * rstd * p.affine[d0 + c] + p.affine[D + d0 + c]);
    x_hat[c] = stored;
    xs[c] = S::load(stored);
  }
  if constexpr (kCema) {
    __syncthreads();
    T* y = static_cast<T*>(p.y) + b * D + d0;
    const int lane = threadIdx.x % kLanesPerChannel;
    const int channels_per_pass = blockDim.x / kLanesPerChannel;
    // The loop bound is block-uniform, so every lane reaches the shuffles below.
    for (int64_t c0 = 0; c0 < g; c0 += channels_per_pass) {
      const int64_t c = c0 + threadIdx.x / kLanesPerChannel;
      float acc = 0.0f;
      if (c < g) {
        const int64_t d = d0 + c;
        const float* coef = p.coeffs + d * 5 * N;
        float2* h = reinterpret_cast<float2*>(p.cema_h) + (slot * D + d) * N;
        const float xv = xs[c];
        for (int64_t n = lane; n < N; n += kLanesPerChannel) {
          float2 hv = h[n];
          acc += cema_update(coef[n], coef[N + n], coef[2 * N + n], coef[3 * N + n], coef[4 * N + n], xv, hv.x, hv.y);
          h[n] = hv;
        }
      }
#pragma unroll
      for (int offset = kLanesPerChannel / 2; offset > 0; offset >>= 1) {
        acc += __shfl_xor_sync(0xffffffffu, acc, offset);
      }
      if (c < g && lane == 0) y[c] = S::store(acc + p.omega[d0 + c] * xs[c]);
    }
  }
}

template <typename S>
cudaError_t launch_typed(const TsnCemaParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.groups), static_cast<unsigned>(p.batch));
  const size_t smem = sizeof(float) * static_cast<size_t>(p.dim / p.groups);
  if (p.cema_h != nullptr) {
    tsn_cema_kernel<S, true><<<grid, kTsnThreads, smem, stream>>>(p);
  } else {
    tsn_cema_kernel<S, false><<<grid, kTsnThreads, smem, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_tsn_cema_step(const TsnCemaParams& p, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  if (p.dim / p.groups > kMaxGroupSize) return cudaErrorInvalidValue;
  return p.dtype == DType::kBFloat16 ? launch_typed<BF16Storage>(p, stream) : launch_typed<F32Storage>(p, stream);
}

}  // namespace megalodon::cuda
