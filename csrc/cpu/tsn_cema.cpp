// TimestepNorm + CEMA decode step on the CPU: one task per (row, norm group).
//
// A group is the natural unit: its statistics need all g features of the token, and the CEMA
// channels of the group only need the group's normalised values. Each task reads the slot's stats
// and g x N complex states once and writes them back in place.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../common/decode_math.h"
#include "kernels.h"

namespace megalodon::cpu {
namespace {

// Normalise one (row, group) and, with CEMA, advance its channels. `xs` is scratch of g floats.
template <typename S>
MEGA_ALWAYS_INLINE void group_task(const TsnCemaParams& p, int64_t task, float* __restrict xs) {
  using T = typename S::type;
  const int64_t D = p.dim, G = p.groups, g = D / G, N = p.ndim;
  const int64_t b = task / G, grp = task % G;
  const int64_t slot = p.slot_ids[b];
  const int64_t d0 = grp * g;
  const T* __restrict x = static_cast<const T*>(p.x) + b * D + d0;

  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < g; ++c) {
    xs[c] = S::load(x[c]);
    sum += xs[c];
  }
  const float tok_mean = sum / static_cast<float>(g);
  float sq = 0.0f;
#pragma omp simd reduction(+ : sq)
  for (int64_t c = 0; c < g; ++c) {
    const float dev = xs[c] - tok_mean;
    sq += dev * dev;
  }
  const float tok_var = sq / static_cast<float>(g);

  float* mean = p.mean + slot * G + grp;
  float* var = p.var + slot * G + grp;
  const GroupStats st =
      timestep_stats_update(p.position[slot] + p.prior_count, *mean, *var, tok_mean, tok_var);
  *mean = st.mean;
  *var = st.var;
  const float rstd = 1.0f / std::sqrt(st.var + p.eps);

  const float* __restrict scale = p.affine + d0;
  const float* __restrict shift = p.affine + D + d0;
  T* __restrict x_hat = static_cast<T*>(p.x_hat) + b * D + d0;
#pragma omp simd
  for (int64_t c = 0; c < g; ++c) {
    const T stored = S::store((xs[c] - st.mean) * rstd * scale[c] + shift[c]);
    x_hat[c] = stored;
    xs[c] = S::load(stored);  // CEMA consumes x_hat as the model dtype holds it
  }
  if (p.cema_h == nullptr) return;

  T* __restrict y = static_cast<T*>(p.y) + b * D + d0;
  for (int64_t c = 0; c < g; ++c) {
    const int64_t d = d0 + c;
    const float* __restrict coef = p.coeffs + d * 5 * N;
    float* __restrict h = p.cema_h + (slot * D + d) * N * 2;
    const float xv = xs[c];
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t n = 0; n < N; ++n) {
      acc += cema_update(coef[n], coef[N + n], coef[2 * N + n], coef[3 * N + n], coef[4 * N + n], xv,
                         h[2 * n], h[2 * n + 1]);
    }
    y[c] = S::store(acc + p.omega[d] * xv);
  }
}

MEGA_CPU_CLONES void group_tasks_f32(const TsnCemaParams& p, int64_t begin, int64_t end, float* xs) {
  for (int64_t t = begin; t < end; ++t) group_task<F32Storage>(p, t, xs);
}

MEGA_CPU_CLONES void group_tasks_bf16(const TsnCemaParams& p, int64_t begin, int64_t end, float* xs) {
  for (int64_t t = begin; t < end; ++t) group_task<BF16Storage>(p, t, xs);
}

}  // namespace

void tsn_cema_step(const TsnCemaParams& p) {
  const int64_t g = p.dim / p.groups;
  // NOTE: a group task is small (g x N complex updates); chunks of ~32k updates keep the threading
  // overhead below the work, so batch 1 of a small model runs on one thread.
  const int64_t work = g * std::max<int64_t>(p.cema_h ? p.ndim : 1, 1);
  const int64_t grain = std::max<int64_t>(1, 32768 / work);
  at::parallel_for(0, p.batch * p.groups, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> xs(static_cast<size_t>(g));
    if (p.dtype == DType::kBFloat16) {
      group_tasks_bf16(p, begin, end, xs.data());
    } else {
      group_tasks_f32(p, begin, end, xs.data());
    }
  });
}

}  // namespace megalodon::cpu
