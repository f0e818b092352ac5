// Plain-old-data arguments of the Megalodon decode kernels: pointers, sizes and the dtype tag.
//
// No torch types here: the CUDA sources include this header and must compile with nvcc alone, and
// the CPU kernels see exactly the same structs. Every tensor is contiguous (the bindings check it),
// so strides follow from the sizes. Rows of a batch address the state pool through `slot_ids`: batch
// row b reads and writes pool row slot_ids[b], never row b.
#pragma once

#include <cstdint>

namespace megalodon {

// Storage type of activations (x, x_hat, y) or of the K/V cache. Math is always fp32.
enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1 };

// One TimestepNorm step, optionally followed by one CEMA step, for B rows.
//   x        [B, D]        model dtype   the token's hidden vector (block input)
//   slot_ids [B]           int64         pool row of each batch row (distinct, in [0, S))
//   position [S]           int64         tokens each slot has processed before this one
//   mean/var [S, G]        fp32          running group statistics, updated in place
//   affine   [2, D]        fp32          (1 + weight, bias) of the TimestepNorm
//   cema_h   [S, D, N, 2]  fp32          complex CEMA state as (re, im) pairs, updated in place;
//                                        nullptr for a plain TimestepNorm (the final norm)
//   coeffs   [D, 5, N]     fp32          rows p, Re q, Im q, Re eta, Im eta (eta includes sqrt(1/N))
//   omega    [D]           fp32          CEMA skip weight
//   x_hat    [B, D]        model dtype   out: normalised x
//   y        [B, D]        model dtype   out: CEMA output (unused without CEMA)
struct TsnCemaParams {
  const void* x = nullptr;
  const int64_t* slot_ids = nullptr;
  const int64_t* position = nullptr;
  float* mean = nullptr;
  float* var = nullptr;
  const float* affine = nullptr;
  float* cema_h = nullptr;
  const float* coeffs = nullptr;
  const float* omega = nullptr;
  void* x_hat = nullptr;
  void* y = nullptr;
  int64_t batch = 0;
  int64_t dim = 0;
  int64_t groups = 0;
  int64_t ndim = 0;
  int64_t prior_count = 0;
  float eps = 1e-5f;
  DType dtype = DType::kFloat32;
};

// Append one key/value per row at the slot's fill position (position mod C) and attend over the
// slot's current chunk, keys 0..fill inclusive. No logit scale, fp32 softmax.
//   q        [B, H, dz]     fp32
//   k_new    [B, H, dz]     kv dtype
//   v_new    [B, H, dv]     kv dtype
//   keys     [S, C, H, dz]  kv dtype   updated in place at [slot, fill]
//   values   [S, C, H, dv]  kv dtype   updated in place at [slot, fill]
//   out      [B, H * dv]    fp32
// Key-split scratch (CUDA, num_splits > 1): partial_out [B, H, splits, dv] and partial_ml
// [B, H, splits, 2] (split max, sum of exponentials). The CPU kernel plans and owns its scratch.
struct AttentionDecodeParams {
  const float* q = nullptr;
  const void* k_new = nullptr;
  const void* v_new = nullptr;
  void* keys = nullptr;
  void* values = nullptr;
  const int64_t* slot_ids = nullptr;
  const int64_t* position = nullptr;
  float* out = nullptr;
  float* partial_out = nullptr;
  float* partial_ml = nullptr;
  int64_t batch = 0;
  int64_t heads = 0;
  int64_t chunk = 0;
  int64_t dz = 0;
  int64_t dv = 0;
  int64_t num_splits = 1;
  int64_t keys_per_split = 0;
  DType kv_dtype = DType::kFloat32;
};

}  // namespace megalodon
