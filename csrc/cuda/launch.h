// Host-side launch interface of the CUDA decode kernels: plain C++ and the CUDA runtime, no torch,
// so the .cu files compile with nvcc alone and the torch bindings (bindings.cpp) call these.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/decode_params.h"

namespace megalodon::cuda {

constexpr int kTsnThreads = 128;
constexpr int kAttentionThreads = 128;
// Largest TimestepNorm group the kernel stages in (default-sized) shared memory.
constexpr int64_t kMaxGroupSize = 12288;

// Value columns one thread of the attention kernel accumulates: 8 (16-byte vector loads) when every
// V row of the pool and of v_new starts 16-byte aligned, else 1.
inline int attention_values_per_thread(int64_t dv, const void* values, const void* v_new) {
  const bool aligned = reinterpret_cast<uintptr_t>(values) % 16 == 0 && reinterpret_cast<uintptr_t>(v_new) % 16 == 0;
  return dv % 8 == 0 && aligned ? 8 : 1;
}

// Thread blocks that tile one (row, head, key split) along the value width.
inline int64_t attention_value_tiles(int64_t dv, int values_per_thread) {
  const int64_t cols = static_cast<int64_t>(kAttentionThreads) * values_per_thread;
  return (dv + cols - 1) / cols;
}

// All rows in one launch; never syncs with the host. Returns the launch error, if any.
cudaError_t launch_tsn_cema_step(const TsnCemaParams& p, cudaStream_t stream);

// p.num_splits / p.keys_per_split come from plan_key_splits (common/decode_math.h); with more than
// one split p.partial_out and p.partial_ml must be allocated. Two launches: partials, then combine.
cudaError_t launch_attention_decode(const AttentionDecodeParams& p, int values_per_thread, cudaStream_t stream);

}  // namespace megalodon::cuda
