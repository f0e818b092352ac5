"""Decode from captured CUDA graphs == eager decode (GPU only; scripts/gpu_check.sh runs these)."""

from __future__ import annotations

import pytest
import torch

from megalodon_infer import ModelConfig
from megalodon_infer.kernels import load_cuda_extension
from megalodon_infer.model.init import random_model
from megalodon_infer.worker.cuda_graphs import DecodeGraphRunner
from megalodon_infer.worker.decode_ops import build_decode_ops
from tests.kernels.conftest import NO_CUDA

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]

CFG = ModelConfig(num_layers=2, model_dim=64, z_dim=32, value_dim=256, num_heads=2, ffn_hidden_dim=96, cema_ndim=8,
                  norm_num_groups=4, vocab_size=97, chunk_size=16)
NUM_SLOTS, PAD_SLOT = 9, 8


def models_and_states():
    """Two identical models with primed pools: decode ops with the fused kernels, and the reference."""
    load_cuda_extension()
    out = []
    for mode in ("fused", "reference"):
        model = random_model(CFG, seed=2, dtype=torch.float32, device="cuda")
        ops = build_decode_ops(model, mode=mode)
        state = model.allocate_state(NUM_SLOTS)
        g = torch.Generator().manual_seed(1)
        for slot, length in [(0, 3), (2, 16), (5, 21), (6, 9)]:
            prompt = torch.randint(0, CFG.vocab_size, (1, length), generator=g)
            model(prompt, state, slot_ids=torch.tensor([slot]))
        out.append((model, state, ops))
    return out


def test_graph_replay_matches_eager_reference_across_chunk_boundaries():
    (model, state, ops), (ref, ref_state, ref_ops) = models_and_states()
    runner = DecodeGraphRunner(model, state, PAD_SLOT, ops, buckets=(1, 2, 4, 8))
    runner.capture()
    assert runner.captured_buckets == (1, 2, 4, 8)
    g = torch.Generator().manual_seed(3)
    batches = [[5, 0, 2], [6], [0, 2, 5, 6], [2, 6]]  # buckets 4 (padded), 1, 4, 2
    for step in range(2 * CFG.chunk_size):
        slots = torch.tensor(batches[step % len(batches)])
        tokens = torch.randint(0, CFG.vocab_size, (len(slots),), generator=g)
        got = runner.step(tokens, slots).clone()
        expected = ref.decode_step(tokens.cuda(), ref_state, slots.cuda(), ref_ops)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    live = [0, 2, 5, 6]
    torch.testing.assert_close(state.position[live], ref_state.position[live])
    torch.testing.assert_close(state.cema_h[:, live], ref_state.cema_h[:, live], rtol=0, atol=1e-4)
    torch.testing.assert_close(state.norm_var[:, live], ref_state.norm_var[:, live], rtol=0, atol=1e-4)


def test_batches_above_the_largest_bucket_run_eagerly():
    (model, state, ops), (ref, ref_state, ref_ops) = models_and_states()
    runner = DecodeGraphRunner(model, state, PAD_SLOT, ops, buckets=(1, 2))
    runner.capture()
    slots = torch.tensor([0, 2, 5])
    tokens = torch.tensor([1, 2, 3])
    assert runner.bucket_for(3) is None
    torch.testing.assert_close(runner.step(tokens, slots),
                               ref.decode_step(tokens.cuda(), ref_state, slots.cuda(), ref_ops), rtol=0, atol=1e-4)
