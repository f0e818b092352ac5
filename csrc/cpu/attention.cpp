// Chunk-attention decode on the CPU: append the new K/V at each slot's fill, then attend over the
// slot's current chunk (keys 0..fill).
//
// One parallel region per call. With at least as many (row, head) pairs as threads, a task owns a
// whole (row, head): scores, softmax and P.V over contiguous key rows, the dv-wide accumulator in
// L1. With fewer pairs (batch 1 of a 1-head model), each pair's keys are split across tasks that
// return (max, sum of exponentials, unnormalised P.V) partials, merged by log-sum-exp afterwards,
// as the CUDA kernel does. Fewer regions matter on a small shared machine: every region ends in a
// barrier that waits for the slowest thread.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "../common/decode_math.h"
#include "kernels.h"

namespace megalodon::cpu {
namespace {

// Attention of one (row, head) over its keys [k0, k1): the split's max `m`, sum of exp(s - m) `l`,
// and acc[dv] = sum_j exp(s_j - m) V_j. The task whose range holds `fill` appends the new key and
// value; every reader of key `fill` takes it from k_new / v_new, so no task waits for that write.
template <typename S>
MEGA_ALWAYS_INLINE void attend_range(const AttentionDecodeParams& p, int64_t bh, int64_t k0, int64_t k1,
                                     float* __restrict scores, float* __restrict acc, float& m_out, float& l_out) {
  using T = typename S::type;
  const int64_t H = p.heads, C = p.chunk, dz = p.dz, dv = p.dv;
  const int64_t b = bh / H, h = bh % H;
  const int64_t slot = p.slot_ids[b];
  const int64_t fill = p.position[slot] % C;
  const T* k_new = static_cast<const T*>(p.k_new) + bh * dz;
  const T* v_new = static_cast<const T*>(p.v_new) + bh * dv;
  T* key_base = static_cast<T*>(p.keys) + (slot * C * H + h) * dz;
  T* value_base = static_cast<T*>(p.values) + (slot * C * H + h) * dv;
  if (fill >= k0 && fill < k1) {
    std::memcpy(key_base + fill * H * dz, k_new, sizeof(T) * dz);
    std::memcpy(value_base + fill * H * dv, v_new, sizeof(T) * dv);
  }

  const float* __restrict q = p.q + bh * dz;
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t j = k0; j < k1; ++j) {
    const T* __restrict k = j == fill ? k_new : key_base + j * H * dz;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < dz; ++d) s += q[d] * S::load(k[d]);
    scores[j - k0] = s;
    m = std::max(m, s);
  }
  float l = 0.0f;
  for (int64_t j = k0; j < k1; ++j) {
    scores[j - k0] = std::exp(scores[j - k0] - m);
    l += scores[j - k0];
  }

  std::fill(acc, acc + dv, 0.0f);
  auto row = [&](int64_t j) -> const T* { return j == fill ? v_new : value_base + j * H * dv; };
  int64_t j = k0;
  for (; j + 4 <= k1; j += 4) {  // four keys per pass over the accumulator
    const T* __restrict v0 = row(j);
    const T* __restrict v1 = row(j + 1);
    const T* __restrict v2 = row(j + 2);
    const T* __restrict v3 = row(j + 3);
    const float p0 = scores[j - k0], p1 = scores[j + 1 - k0], p2 = scores[j + 2 - k0], p3 = scores[j + 3 - k0];
#pragma omp simd
    for (int64_t c = 0; c < dv; ++c) {
      acc[c] += p0 * S::load(v0[c]) + p1 * S::load(v1[c]) + p2 * S::load(v2[c]) + p3 * S::load(v3[c]);
    }
  }
  for (; j < k1; ++j) {
    const T* __restrict v0 = row(j);
    const float p0 = scores[j - k0];
#pragma omp simd
    for (int64_t c = 0; c < dv; ++c) acc[c] += p0 * S::load(v0[c]);
  }
  m_out = m;
  l_out = l;
}

// Tasks [begin, end) of `splits` per (row, head). A task's scratch is scores[C] + acc[dv] floats.
// With one split the task writes the normalised output; otherwise its partial goes to
// partial[task] = {m, l, acc[dv]}.
template <typename S>
MEGA_ALWAYS_INLINE void attention_tasks(const AttentionDecodeParams& p, int64_t splits, int64_t begin, int64_t end,
                                        float* scratch, float* partial) {
  const int64_t dv = p.dv;
  float* scores = scratch;
  float* acc = scratch + p.chunk;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t bh = task / splits, split = task % splits;
    const int64_t n = p.position[p.slot_ids[bh / p.heads]] % p.chunk + 1;
    const int64_t k0 = n * split / splits, k1 = n * (split + 1) / splits;
    float m = -std::numeric_limits<float>::infinity(), l = 0.0f;
    float* out = splits == 1 ? acc : partial + task * (dv + 2) + 2;
    if (k1 > k0) {
      attend_range<S>(p, bh, k0, k1, scores, out, m, l);
    } else {
      std::fill(out, out + dv, 0.0f);
    }
    if (splits == 1) {
      float* __restrict o = p.out + bh * dv;
#pragma omp simd
      for (int64_t c = 0; c < dv; ++c) o[c] = acc[c] / l;
    } else {
      partial[task * (dv + 2)] = m;
      partial[task * (dv + 2) + 1] = l;
    }
  }
}

MEGA_CPU_CLONES void attention_tasks_f32(const AttentionDecodeParams& p, int64_t splits, int64_t begin, int64_t end,
                                         float* scratch, float* partial) {
  attention_tasks<F32Storage>(p, splits, begin, end, scratch, partial);
}

MEGA_CPU_CLONES void attention_tasks_bf16(const AttentionDecodeParams& p, int64_t splits, int64_t begin, int64_t end,
                                          float* scratch, float* partial) {
  attention_tasks<BF16Storage>(p, splits, begin, end, scratch, partial);
}

// out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s, over the splits that saw keys.
void combine_partials(const AttentionDecodeParams& p, int64_t splits, const float* partial) {
  const int64_t dv = p.dv, rows = p.batch * p.heads;
  for (int64_t bh = 0; bh < rows; ++bh) {
    const float* part = partial + bh * splits * (dv + 2);
    float m_max = -std::numeric_limits<float>::infinity();
    for (int64_t s = 0; s < splits; ++s) m_max = std::max(m_max, part[s * (dv + 2)]);
    float* __restrict o = p.out + bh * dv;
    std::fill(o, o + dv, 0.0f);
    float denom = 0.0f;
    for (int64_t s = 0; s < splits; ++s) {
      const float* __restrict ps = part + s * (dv + 2);
      if (ps[1] == 0.0f) continue;
      const float w = std::exp(ps[0] - m_max);
      denom += w * ps[1];
      for (int64_t c = 0; c < dv; ++c) o[c] += w * ps[2 + c];
    }
    for (int64_t c = 0; c < dv; ++c) o[c] /= denom;
  }
}

}  // namespace

void attention_decode(const AttentionDecodeParams& p) {
  const int64_t rows = p.batch * p.heads;
  const int64_t threads = at::get_num_threads();
  // Split keys only when the (row, head) pairs cannot occupy every thread.
  const int64_t splits = rows >= threads ? 1 : std::min<int64_t>((threads + rows - 1) / rows, p.chunk);
  std::vector<float> partial(splits > 1 ? static_cast<size_t>(rows * splits * (p.dv + 2)) : 0);
  const bool bf16 = p.kv_dtype == DType::kBFloat16;
  at::parallel_for(0, rows * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch(static_cast<size_t>(p.chunk + p.dv));
    if (bf16) {
      attention_tasks_bf16(p, splits, begin, end, scratch.data(), partial.data());
    } else {
      attention_tasks_f32(p, splits, begin, end, scratch.data(), partial.data());
    }
  });
  if (splits > 1) combine_partials(p, splits, partial.data());
}

}  // namespace megalodon::cpu
