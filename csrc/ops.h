// Tensor checks and parameter packing shared by the CPU and CUDA bindings.
//
// This header and the two bindings files are the only code that knows about at::Tensor: they turn
// checked tensors into the POD structs of common/decode_params.h and allocate outputs, so the
// kernels never see a torch type.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

#include "common/decode_params.h"

namespace megalodon {

// Schemas of the ops, registered once by the CPU extension (csrc/bindings.cpp); the CUDA extension
// only adds CUDA implementations. "(a!)" marks tensors written in place.
constexpr const char* kTsnCemaSchema =
    "tsn_cema_step(Tensor x, Tensor slot_ids, Tensor position, Tensor(a!) mean, Tensor(b!) var, "
    "Tensor(c!) cema_h, Tensor affine, Tensor coeffs, Tensor omega, int prior_count, float eps) "
    "-> (Tensor, Tensor)";
constexpr const char* kTsnSchema =
    "tsn_step(Tensor x, Tensor slot_ids, Tensor position, Tensor(a!) mean, Tensor(b!) var, "
    "Tensor affine, int prior_count, float eps) -> Tensor";
constexpr const char* kAttentionSchema =
    "attention_decode(Tensor q, Tensor k_new, Tensor v_new, Tensor(a!) keys, Tensor(b!) values, "
    "Tensor slot_ids, Tensor position, int num_splits) -> Tensor";

inline DType storage_dtype(const at::Tensor& t, const char* name) {
  if (t.scalar_type() == at::kFloat) return DType::kFloat32;
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, "megalodon decode kernels: ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
  return DType::kBFloat16;
}

inline void check_tensor(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Tensor& like,
                         c10::optional<at::ScalarType> dtype = c10::nullopt) {
  TORCH_CHECK(t.sizes() == shape, "megalodon decode kernels: ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.device() == like.device(), "megalodon decode kernels: ", name, " is on ", t.device(),
              " but x is on ", like.device());
  TORCH_CHECK(t.is_contiguous(), "megalodon decode kernels: ", name, " must be contiguous");
  if (dtype.has_value()) {
    TORCH_CHECK(t.scalar_type() == *dtype, "megalodon decode kernels: ", name, " must be ", *dtype, ", got ",
                t.scalar_type());
  }
}

// Validate the inputs of tsn_step / tsn_cema_step (cema_h, coeffs, omega undefined for tsn_step)
// and fill the params, allocating x_hat and (with CEMA) y.
inline TsnCemaParams make_tsn_params(const at::Tensor& x, const at::Tensor& slot_ids, const at::Tensor& position,
                                     const at::Tensor& mean, const at::Tensor& var, const at::Tensor& affine,
                                     const at::Tensor& cema_h, const at::Tensor& coeffs, const at::Tensor& omega,
                                     int64_t prior_count, double eps, at::Tensor& x_hat, at::Tensor& y) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "megalodon decode kernels: x must be a contiguous [B, D] tensor");
  const int64_t B = x.size(0), D = x.size(1);
  TORCH_CHECK(mean.dim() == 2, "megalodon decode kernels: mean must be [S, G]");
  const int64_t S = mean.size(0), G = mean.size(1);
  TORCH_CHECK(G > 0 && D % G == 0, "megalodon decode kernels: groups (", G, ") must divide D (", D, ")");
  check_tensor(slot_ids, "slot_ids", {B}, x, at::kLong);
  check_tensor(position, "position", {S}, x, at::kLong);
  check_tensor(mean, "mean", {S, G}, x, at::kFloat);
  check_tensor(var, "var", {S, G}, x, at::kFloat);
  check_tensor(affine, "affine", {2, D}, x, at::kFloat);
  TsnCemaParams p;
  p.dtype = storage_dtype(x, "x");
  p.batch = B;
  p.dim = D;
  p.groups = G;
  p.prior_count = prior_count;
  p.eps = static_cast<float>(eps);
  p.x = x.data_ptr();
  p.slot_ids = slot_ids.data_ptr<int64_t>();
  p.position = position.data_ptr<int64_t>();
  p.mean = mean.data_ptr<float>();
  p.var = var.data_ptr<float>();
  p.affine = affine.data_ptr<float>();
  x_hat = at::empty_like(x);
  p.x_hat = x_hat.data_ptr();
  if (cema_h.defined()) {
    TORCH_CHECK(cema_h.dim() == 4, "megalodon decode kernels: cema_h must be [S, D, N, 2] (torch.view_as_real)");
    const int64_t N = cema_h.size(2);
    check_tensor(cema_h, "cema_h", {S, D, N, 2}, x, at::kFloat);
    check_tensor(coeffs, "coeffs", {D, 5, N}, x, at::kFloat);
    check_tensor(omega, "omega", {D}, x, at::kFloat);
    p.ndim = N;
    p.cema_h = cema_h.data_ptr<float>();
    p.coeffs = coeffs.data_ptr<float>();
    p.omega = omega.data_ptr<float>();
    y = at::empty_like(x);
    p.y = y.data_ptr();
  }
  return p;
}

// Validate the inputs of attention_decode and fill the params (out and scratch are left to the
// caller, which knows its device's split plan).
inline AttentionDecodeParams make_attention_params(const at::Tensor& q, const at::Tensor& k_new,
                                                   const at::Tensor& v_new, const at::Tensor& keys,
                                                   const at::Tensor& values, const at::Tensor& slot_ids,
                                                   const at::Tensor& position) {
  TORCH_CHECK(q.dim() == 3, "megalodon decode kernels: q must be [B, H, dz]");
  TORCH_CHECK(keys.dim() == 4 && values.dim() == 4,
              "megalodon decode kernels: keys/values must be [S, C, H, dz] / [S, C, H, dv]");
  const int64_t B = q.size(0), H = q.size(1), dz = q.size(2);
  const int64_t S = keys.size(0), C = keys.size(1), dv = values.size(3);
  const auto kv_type = keys.scalar_type();
  check_tensor(q, "q", {B, H, dz}, q, at::kFloat);
  check_tensor(k_new, "k_new", {B, H, dz}, q, kv_type);
  check_tensor(v_new, "v_new", {B, H, dv}, q, kv_type);
  check_tensor(keys, "keys", {S, C, H, dz}, q);
  check_tensor(values, "values", {S, C, H, dv}, q, kv_type);
  check_tensor(slot_ids, "slot_ids", {B}, q, at::kLong);
  check_tensor(position, "position", {S}, q, at::kLong);
  AttentionDecodeParams p;
  p.kv_dtype = storage_dtype(keys, "keys");
  p.batch = B;
  p.heads = H;
  p.chunk = C;
  p.dz = dz;
  p.dv = dv;
  p.q = q.data_ptr<float>();
  p.k_new = k_new.data_ptr();
  p.v_new = v_new.data_ptr();
  p.keys = keys.data_ptr();
  p.values = values.data_ptr();
  p.slot_ids = slot_ids.data_ptr<int64_t>();
  p.position = position.data_ptr<int64_t>();
  return p;
}

}  // namespace megalodon
