// Op registration (TORCH_LIBRARY) and the CPU implementations of the Megalodon decode ops.
//
// Built as the CPU extension; the CUDA extension (csrc/cuda/bindings.cpp) registers CUDA kernels
// for the same schemas, so it is loaded after this one. Python reaches the ops as
// torch.ops.megalodon.<name>, and the dispatcher picks CPU or CUDA from the tensors' device.
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "cpu/kernels.h"
#include "ops.h"

namespace megalodon {
namespace {

// Slot ids index the pool directly: a bad one is an out-of-bounds write, and two equal ones would
// race on the same state. On the CPU checking both costs O(B), so check.
void check_slots(const at::Tensor& slot_ids, const at::Tensor& position) {
  const int64_t S = position.size(0);
  const int64_t* ids = slot_ids.data_ptr<int64_t>();
  const int64_t* pos = position.data_ptr<int64_t>();
  std::vector<bool> seen(static_cast<size_t>(S), false);
  for (int64_t b = 0; b < slot_ids.size(0); ++b) {
    const int64_t s = ids[b];
    TORCH_CHECK(s >= 0 && s < S, "megalodon decode kernels: slot id ", s, " out of range [0, ", S, ")");
    TORCH_CHECK(!seen[s], "megalodon decode kernels: slot id ", s, " appears twice in one batch");
    TORCH_CHECK(pos[s] >= 0, "megalodon decode kernels: slot ", s, " has negative position ", pos[s]);
    seen[s] = true;
  }
}

std::tuple<at::Tensor, at::Tensor> tsn_cema_step_cpu(const at::Tensor& x, const at::Tensor& slot_ids,
                                                     const at::Tensor& position, at::Tensor& mean, at::Tensor& var,
                                                     at::Tensor& cema_h, const at::Tensor& affine,
                                                     const at::Tensor& coeffs, const at::Tensor& omega,
                                                     int64_t prior_count, double eps) {
  at::Tensor x_hat, y;
  const at::Tensor xc = x.contiguous();
  TsnCemaParams p =
      make_tsn_params(xc, slot_ids, position, mean, var, affine, cema_h, coeffs, omega, prior_count, eps, x_hat, y);
  check_slots(slot_ids, position);
  cpu::tsn_cema_step(p);
  return {x_hat, y};
}

at::Tensor tsn_step_cpu(const at::Tensor& x, const at::Tensor& slot_ids, const at::Tensor& position,
                        at::Tensor& mean, at::Tensor& var, const at::Tensor& affine, int64_t prior_count,
                        double eps) {
  at::Tensor x_hat, unused;
  const at::Tensor xc = x.contiguous();
  TsnCemaParams p = make_tsn_params(xc, slot_ids, position, mean, var, affine, at::Tensor(), at::Tensor(),
                                    at::Tensor(), prior_count, eps, x_hat, unused);
  check_slots(slot_ids, position);
  cpu::tsn_cema_step(p);
  return x_hat;
}

// num_splits is a CUDA launch parameter; the CPU kernel splits its own work.
at::Tensor attention_decode_cpu(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                                at::Tensor& keys, at::Tensor& values, const at::Tensor& slot_ids,
                                const at::Tensor& position, int64_t /*num_splits*/) {
  const at::Tensor qc = q.contiguous(), kc = k_new.contiguous(), vc = v_new.contiguous();
  AttentionDecodeParams p = make_attention_params(qc, kc, vc, keys, values, slot_ids, position);
  check_slots(slot_ids, position);
  at::Tensor out = at::empty({p.batch, p.heads * p.dv}, q.options());
  p.out = out.data_ptr<float>();
  cpu::attention_decode(p);
  return out;
}

}  // namespace
}  // namespace megalodon

TORCH_LIBRARY(megalodon, m) {
  m.def(megalodon::kTsnCemaSchema);
  m.def(megalodon::kTsnSchema);
  m.def(megalodon::kAttentionSchema);
}

TORCH_LIBRARY_IMPL(megalodon, CPU, m) {
  m.impl("tsn_cema_step", &megalodon::tsn_cema_step_cpu);
  m.impl("tsn_step", &megalodon::tsn_step_cpu);
  m.impl("attention_decode", &megalodon::attention_decode_cpu);
}
