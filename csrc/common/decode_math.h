// Math shared by the CPU and CUDA decode kernels: dtype conversions, the TimestepNorm statistics
// update, the CEMA recurrence and the key-split plan. Every function is written once and compiled
// for host and device, so both backends round the same way in the same places.
//
// The formulas mirror the torch reference (megalodon_infer/model/norms.py `timestep_norm` at L == 1
// and megalodon_infer/model/cema.py `cema_step`) operation by operation; the tests hold the kernels
// to that reference.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MEGA_HD __host__ __device__ __forceinline__
#else
#define MEGA_HD inline
#endif

namespace megalodon {

// ----------------------------------------------------------------------------------- storage types

MEGA_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

MEGA_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

MEGA_HD float bf16_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

// Round to nearest even, NaN to the canonical quiet NaN: the rounding torch's `.to(bfloat16)` does,
// so an activation written by a kernel is bit-identical to the reference's cast of the same float.
MEGA_HD uint16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// Storage traits: `type` is what lives in memory, load/store convert to and from fp32.
struct F32Storage {
  using type = float;
  static MEGA_HD float load(float v) { return v; }
  static MEGA_HD float store(float v) { return v; }
};

struct BF16Storage {
  using type = uint16_t;
  static MEGA_HD float load(uint16_t v) { return bf16_to_float(v); }
  static MEGA_HD uint16_t store(float v) { return float_to_bf16(v); }
};

// Value as it reads back after a store: the reference casts x_hat to the model dtype before CEMA
// consumes it, so the kernels must feed CEMA the rounded value, not the fp32 one.
template <typename S>
MEGA_HD float round_trip(float v) {
  return S::load(S::store(v));
}

// ------------------------------------------------------------------------------- TimestepNorm step

struct GroupStats {
  float mean;
  float var;
};

// Fold one token's within-group moments (tok_mean, tok_var over the group's g features) into the
// running statistics of `count` earlier tokens. Shifted-data form, as in the reference: sums are
// taken relative to the previous mean (or, on a fresh state, to the token's own mean), so a large
// mean does not cancel the variance. Algebraically the official Welford merge with c = 1/(n+1).
MEGA_HD GroupStats timestep_stats_update(int64_t count, float mean0, float var0, float tok_mean,
                                         float tok_var) {
  const float n0 = static_cast<float>(count);
  const float shift = count > 0 ? mean0 : tok_mean;
  const float prior_dev = mean0 - shift;
  const float dev = tok_mean - shift;
  const float total = n0 + 1.0f;
  const float sum_dev = n0 * prior_dev + dev;
  const float sum_sq = n0 * (var0 + prior_dev * prior_dev) + (tok_var + dev * dev);
  const float mean_dev = sum_dev / total;
  GroupStats s;
  s.mean = shift + mean_dev;
  const float var = sum_sq / total - mean_dev * mean_dev;
  s.var = var > 0.0f ? var : 0.0f;
  return s;
}

// ---------------------------------------------------------------------------------------- CEMA step

// h <- p x + q h (q complex, p real); returns the contribution Re(eta h') to y.
MEGA_HD float cema_update(float p, float q_re, float q_im, float eta_re, float eta_im, float x,
                          float& h_re, float& h_im) {
  const float re = p * x + (q_re * h_re - q_im * h_im);
  const float im = q_re * h_im + q_im * h_re;
  h_re = re;
  h_im = im;
  return eta_re * re - eta_im * im;
}

// ------------------------------------------------------------------------------ attention key plan

// Minimum keys per split: fewer keys make the per-split partial (dv floats) cost as much as the
// keys it summarises.
constexpr int64_t kMinKeysPerSplit = 64;
// Upper bound on keys per split: the split's scores live in shared memory (16 KiB at 4096).
constexpr int64_t kMaxKeysPerSplit = 4096;

struct SplitPlan {
  int64_t num_splits;
  int64_t keys_per_split;
};

// Plan key splits from the chunk capacity C, never from the live fill: the grid is then a function
// of the batch size alone, so one captured CUDA graph serves every fill (splits past a row's fill
// exit early). `ctas_per_split` is how many thread blocks one (row, head, split) already gets from
// tiling the value width; `target_ctas` is the number of blocks that keeps the device busy.
inline SplitPlan plan_key_splits(int64_t batch, int64_t heads, int64_t chunk, int64_t ctas_per_split,
                                 int64_t target_ctas) {
  const int64_t base = batch * heads * ctas_per_split;
  int64_t splits = base >= target_ctas ? 1 : (target_ctas + base - 1) / base;
  const int64_t max_splits = (chunk + kMinKeysPerSplit - 1) / kMinKeysPerSplit;
  const int64_t min_splits = (chunk + kMaxKeysPerSplit - 1) / kMaxKeysPerSplit;
  splits = splits > max_splits ? max_splits : splits;
  splits = splits < min_splits ? min_splits : splits;
  splits = splits < 1 ? 1 : splits;
  SplitPlan plan;
  plan.keys_per_split = (chunk + splits - 1) / splits;
  plan.num_splits = (chunk + plan.keys_per_split - 1) / plan.keys_per_split;
  return plan;
}

}  // namespace megalodon
