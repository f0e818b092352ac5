// Chunk-attention decode on the GPU: split-K x split-V with a log-sum-exp combine.
//
// Megalodon's heads have a small Q/K width (dz, 256 in the published configs) and a wide V
// (dv, 2048), and a request attends over at most one chunk. Grid (key split, value tile, row*head):
// each block scores its split's keys (one warp per key), takes the split's softmax statistics, and
// accumulates P.V for its own value columns with 16-byte loads. Several blocks per (row, head) keep
// the GPU busy at batch 1; a second kernel merges the splits by log-sum-exp. The split plan comes
// from the chunk capacity, not the fill, so the grid is fixed per batch size (CUDA graphs) and the
// splits past a row's fill exit at once. Fill 0 (a fresh chunk) needs no special case: the one key
// is the new one.
#include <cuda_runtime.h>
#include <math_constants.h>

#include "../common/decode_math.h"
#include "launch.h"
#include "reduce.cuh"

namespace megalodon::cuda {
namespace {

// Load `VPT` consecutive stored values as fp32.
template <typename S, int VPT>
struct VecLoad {
  static __device__ __forceinline__ void load(const typename S::type* src, float* out) {
#pragma unroll
    for (int i = 0; i < VPT; ++i) out[i] = S::load(src[i]);
  }
};

template <>
struct VecLoad<BF16Storage, 8> {
  static __device__ __forceinline__ void load(const uint16_t* src, float* out) {
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // little endian: element 2i is the low half of word i
      out[2 * i] = bits_to_float(words[i] << 16);
      out[2 * i + 1] = bits_to_float(words[i] & 0xffff0000u);
    }
  }
};

template <>
struct VecLoad<F32Storage, 8> {
  static __device__ __forceinline__ void load(const float* src, float* out) {
    const float4 lo = *reinterpret_cast<const float4*>(src);
    const float4 hi = *reinterpret_cast<const float4*>(src + 4);
    out[0] = lo.x, out[1] = lo.y, out[2] = lo.z, out[3] = lo.w;
    out[4] = hi.x, out[5] = hi.y, out[6] = hi.z, out[7] = hi.w;
  }
};

template <typename S, int VPT>
__global__ void __launch_bounds__(kAttentionThreads) attention_split_kernel(const AttentionDecodeParams p) {
  using T = typename S::type;
  extern __shared__ float smem[];  // q [dz], then the split's scores / probabilities [keys_per_split]
  __shared__ float scratch[32];
  const int64_t H = p.heads, C = p.chunk, dz = p.dz, dv = p.dv;
  const int64_t bh = blockIdx.z, b = bh / H, h = bh % H;
  const int64_t split = blockIdx.x, tile = blockIdx.y;
  const int64_t slot = p.slot_ids[b];
  const int64_t fill = p.position[slot] % C;
  const int64_t k0 = split * p.keys_per_split;
  const int64_t k1 = min(k0 + p.keys_per_split, fill + 1);
  const bool partial = p.num_splits > 1;
  float* ml = partial ? p.partial_ml + (bh * p.num_splits + split) * 2 : nullptr;
  if (k0 > fill) {  // block-uniform: the whole block leaves together
    if (partial && tile == 0 && threadIdx.x == 0) {
      ml[0] = -CUDART_INF_F;
      ml[1] = 0.0f;
    }
    return;
  }

  float* q_s = smem;
  float* p_s = smem + dz;
  for (int64_t d = threadIdx.x; d < dz; d += blockDim.x) q_s[d] = p.q[bh * dz + d];
  const T* k_new = static_cast<const T*>(p.k_new) + bh * dz;
  const T* v_new = static_cast<const T*>(p.v_new) + bh * dv;
  T* keys = static_cast<T*>(p.keys);
  T* values = static_cast<T*>(p.values);
  const int64_t col0 = (tile * blockDim.x + threadIdx.x) * VPT;

  // The split that holds `fill` appends the new key/value. Every reader of key `fill` takes it from
  // k_new / v_new instead, so no block depends on another block's write.
  if (fill < k1) {
    if (tile == 0) {
      for (int64_t d = threadIdx.x; d < dz; d += blockDim.x) keys[((slot * C + fill) * H + h) * dz + d] = k_new[d];
    }
    T* vrow = values + ((slot * C + fill) * H + h) * dv;
    for (int i = 0; i < VPT && col0 + i < dv; ++i) vrow[col0 + i] = v_new[col0 + i];
  }
  __syncthreads();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  for (int64_t j = k0 + warp; j < k1; j += warps) {
    const T* krow = j == fill ? k_new : keys + ((slot * C + j) * H + h) * dz;
    float s = 0.0f;
    for (int64_t d = lane; d < dz; d += 32) s += q_s[d] * S::load(krow[d]);
    s = warp_sum(s);
    if (lane == 0) p_s[j - k0] = s;
  }
  __syncthreads();

  const int64_t len = k1 - k0;
  float m = -CUDART_INF_F;
  for (int64_t j = threadIdx.x; j < len; j += blockDim.x) m = fmaxf(m, p_s[j]);
  m = block_reduce<true>(m, scratch);
  float l = 0.0f;
  for (int64_t j = threadIdx.x; j < len; j += blockDim.x) {
    const float e = expf(p_s[j] - m);
    p_s[j] = e;
    l += e;
  }
  l = block_reduce<false>(l, scratch);  // its barriers also publish the p_s writes

  if (col0 < dv) {  // VPT == 8 only when dv % 8 == 0, so a started vector is a whole one
    float acc[VPT];
#pragma unroll
    for (int i = 0; i < VPT; ++i) acc[i] = 0.0f;
    const int64_t row_stride = H * dv;
    const T* vbase = values + (slot * C * H + h) * dv + col0;
#pragma unroll 4
    for (int64_t j = k0; j < k1; ++j) {
      float v[VPT];
      VecLoad<S, VPT>::load(j == fill ? v_new + col0 : vbase + j * row_stride, v);
      const float pj = p_s[j - k0];
#pragma unroll
      for (int i = 0; i < VPT; ++i) acc[i] += pj * v[i];
    }
    float* out = partial ? p.partial_out + (bh * p.num_splits + split) * dv + col0 : p.out + bh * dv + col0;
#pragma unroll
    for (int i = 0; i < VPT; ++i) out[i] = partial ? acc[i] : acc[i] / l;
  }
  if (partial && tile == 0 && threadIdx.x == 0) {
    ml[0] = m;
    ml[1] = l;
  }
}

// out = sum_s exp(m_s - M) o_s / sum_s exp(m_s - M) l_s over the splits that saw keys (l_s > 0).
__global__ void __launch_bounds__(kAttentionThreads) attention_combine_kernel(const AttentionDecodeParams p) {
  const int64_t bh = blockIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= p.dv) return;
  const float* ml = p.partial_ml + bh * p.num_splits * 2;
  float m_max = -CUDART_INF_F;
  for (int64_t s = 0; s < p.num_splits; ++s) m_max = fmaxf(m_max, ml[2 * s]);
  float denom = 0.0f, acc = 0.0f;
  for (int64_t s = 0; s < p.num_splits; ++s) {
    const float l_s = ml[2 * s + 1];
    if (l_s == 0.0f) continue;
    const float w = expf(ml[2 * s] - m_max);
    denom += l_s * w;
    acc += w * p.partial_out[(bh * p.num_splits + s) * p.dv + col];
  }
  p.out[bh * p.dv + col] = acc / denom;
}

template <typename S, int VPT>
cudaError_t launch_typed(const AttentionDecodeParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.num_splits), static_cast<unsigned>(attention_value_tiles(p.dv, VPT)),
                  static_cast<unsigned>(p.batch * p.heads));
  const size_t smem = sizeof(float) * static_cast<size_t>(p.dz + p.keys_per_split);
  attention_split_kernel<S, VPT><<<grid, kAttentionThreads, smem, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const dim3 combine_grid(static_cast<unsigned>((p.dv + kAttentionThreads - 1) / kAttentionThreads),
                          static_cast<unsigned>(p.batch * p.heads));
  attention_combine_kernel<<<combine_grid, kAttentionThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_attention_decode(const AttentionDecodeParams& p, int values_per_thread, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  if (p.keys_per_split > kMaxKeysPerSplit || p.num_splits < 1) return cudaErrorInvalidValue;
  const bool bf16 = p.kv_dtype == DType::kBFloat16;
  if (values_per_thread == 8) {
    return bf16 ? launch_typed<BF16Storage, 8>(p, stream) : launch_typed<F32Storage, 8>(p, stream);
  }
  return bf16 ? launch_typed<BF16Storage, 1>(p, stream) : launch_typed<F32Storage, 1>(p, stream);
}

}  // namespace megalodon::cuda
