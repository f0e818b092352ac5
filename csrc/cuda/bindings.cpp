// CUDA implementations of the megalodon decode ops (schemas defined by the CPU extension).
//
// Checks and packs tensors (ops.h), plans the attention key splits from the chunk capacity and the
// device's multiprocessor count, allocates outputs and scratch on the current stream's allocator
// (inside a CUDA graph capture that is the graph's pool), and launches. Nothing here reads device
// memory from the host, so the ops are capture-safe. Slot ids are not range-checked on the GPU
// (that would need a sync): callers pass distinct ids in [0, S).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "common/decode_math.h"
#include "cuda/launch.h"
#include "ops.h"

namespace megalodon {
namespace {

std::tuple<at::Tensor, at::Tensor> tsn_cema_step_cuda(const at::Tensor& x, const at::Tensor& slot_ids,
                                                      const at::Tensor& position, at::Tensor& mean, at::Tensor& var,
                                                      at::Tensor& cema_h, const at::Tensor& affine,
                                                      const at::Tensor& coeffs, const at::Tensor& omega,
                                                      int64_t prior_count, double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor x_hat, y;
  const at::Tensor xc = x.contiguous();
  const TsnCemaParams p =
      make_tsn_params(xc, slot_ids, position, mean, var, affine, cema_h, coeffs, omega, prior_count, eps, x_hat, y);
  TORCH_CHECK(p.dim / p.groups <= cuda::kMaxGroupSize, "megalodon decode kernels: group size ", p.dim / p.groups,
              " exceeds ", cuda::kMaxGroupSize);
  C10_CUDA_CHECK(cuda::launch_tsn_cema_step(p, at::cuda::getCurrentCUDAStream()));
  return {x_hat, y};
}

at::Tensor tsn_step_cuda(const at::Tensor& x, const at::Tensor& slot_ids, const at::Tensor& position,
                         at::Tensor& mean, at::Tensor& var, const at::Tensor& affine, int64_t prior_count,
                         double eps) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor x_hat, unused;
  const at::Tensor xc = x.contiguous();
  const TsnCemaParams p = make_tsn_params(xc, slot_ids, position, mean, var, affine, at::Tensor(), at::Tensor(),
                                          at::Tensor(), prior_count, eps, x_hat, unused);
  TORCH_CHECK(p.dim / p.groups <= cuda::kMaxGroupSize, "megalodon decode kernels: group size ", p.dim / p.groups,
              " exceeds ", cuda::kMaxGroupSize);
  C10_CUDA_CHECK(cuda::launch_tsn_cema_step(p, at::cuda::getCurrentCUDAStream()));
  return x_hat;
}

// num_splits: key splits per (row, head); 0 plans them from the chunk size and the device.
at::Tensor attention_decode_cuda(const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new,
                                 at::Tensor& keys, at::Tensor& values, const at::Tensor& slot_ids,
                                 const at::Tensor& position, int64_t num_splits) {
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qc = q.contiguous(), kc = k_new.contiguous(), vc = v_new.contiguous();
  AttentionDecodeParams p = make_attention_params(qc, kc, vc, keys, values, slot_ids, position);
  TORCH_CHECK(p.dz <= 4096, "megalodon decode kernels: head Q/K width ", p.dz, " exceeds 4096");
  TORCH_CHECK(p.batch * p.heads <= 65535, "megalodon decode kernels: batch * heads must be <= 65535");
  const int vpt = cuda::attention_values_per_thread(p.dv, p.values, p.v_new);
  SplitPlan plan;
  if (num_splits > 0) {
    const int64_t splits = std::max<int64_t>(num_splits, (p.chunk + kMaxKeysPerSplit - 1) / kMaxKeysPerSplit);
    plan.keys_per_split = (p.chunk + splits - 1) / splits;
    plan.num_splits = (p.chunk + plan.keys_per_split - 1) / plan.keys_per_split;
  } else {
    // Two blocks per multiprocessor: enough to hide latency, few enough that partials stay cheap.
    const int64_t target = 2 * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    plan = plan_key_splits(p.batch, p.heads, p.chunk, cuda::attention_value_tiles(p.dv, vpt), target);
  }
  p.num_splits = plan.num_splits;
  p.keys_per_split = plan.keys_per_split;
  at::Tensor out = at::empty({p.batch, p.heads * p.dv}, q.options());
  at::Tensor partial_out, partial_ml;
  if (p.num_splits > 1) {
    partial_out = at::empty({p.batch, p.heads, p.num_splits, p.dv}, q.options());
    partial_ml = at::empty({p.batch, p.heads, p.num_splits, 2}, q.options());
    p.partial_out = partial_out.data_ptr<float>();
    p.partial_ml = partial_ml.data_ptr<float>();
  }
  p.out = out.data_ptr<float>();
  C10_CUDA_CHECK(cuda::launch_attention_decode(p, vpt, at::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace
}  // namespace megalodon

TORCH_LIBRARY_IMPL(megalodon, CUDA, m) {
  m.impl("tsn_cema_step", &megalodon::tsn_cema_step_cuda);
  m.impl("tsn_step", &megalodon::tsn_step_cuda);
  m.impl("attention_decode", &megalodon::attention_decode_cuda);
}
