"""The whole model with fused decode kernels == the reference path: logits, state, greedy tokens."""

from __future__ import annotations

import pytest
import torch

from megalodon_infer import ModelConfig
from megalodon_infer.model.init import random_model
from megalodon_infer.model.state import allocate_state
from megalodon_infer.worker.decode_ops import build_decode_ops

CFG = ModelConfig(num_layers=2, model_dim=64, z_dim=32, value_dim=64, num_heads=2, ffn_hidden_dim=96, cema_ndim=8,
                  norm_num_groups=4, vocab_size=97, chunk_size=16)
NUM_SLOTS = 8
SLOTS = [5, 1, 6]  # not 0..B-1
PROMPT_LENGTHS = [5, 16, 23]  # mid-chunk, exactly one chunk (next fill 0), past a boundary


def fused_and_reference(device: str, kv_dtype: torch.dtype):
    """Two identical models and pools; decode ops with the fused kernels for one, the reference for the other."""
    models, states, ops = [], [], []
    for mode in ("fused", "reference"):
        model = random_model(CFG, seed=11, dtype=torch.float32, device=device)
        state = allocate_state(CFG, NUM_SLOTS, kv_dtype, torch.float32, device)
        model.reset_rows(state, torch.arange(NUM_SLOTS, device=device))
        models.append(model)
        states.append(state)
        ops.append(build_decode_ops(model, kv_dtype, mode))
    return models, states, ops


def prefill(model, state, prompts: list[torch.Tensor]) -> torch.Tensor:
    """Each prompt into its slot (rows at different lengths); returns the last logits [B, V]."""
    last = [model(p[None].to(model.device), state, slot_ids=torch.tensor([s]), last_only=True)[0][0, -1]
            for p, s in zip(prompts, SLOTS, strict=True)]
    return torch.stack(last)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16], ids=["kv-f32", "kv-bf16"])
def test_greedy_decode_fused_equals_reference(device, kv_dtype):
    (fused, ref), (fused_state, ref_state), (fused_ops, ref_ops) = fused_and_reference(device, kv_dtype)
    assert fused_ops.is_fused and not ref_ops.is_fused
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, CFG.vocab_size, (n,), generator=g) for n in PROMPT_LENGTHS]
    slot_ids = torch.tensor(SLOTS, device=device)
    logits_f, logits_r = prefill(fused, fused_state, prompts), prefill(ref, ref_state, prompts)
    tokens_f, tokens_r = [], []
    for _ in range(2 * CFG.chunk_size + 3):  # every row crosses at least two chunk boundaries
        next_f, next_r = logits_f.argmax(-1), logits_r.argmax(-1)
        tokens_f.append(next_f.tolist())
        tokens_r.append(next_r.tolist())
        logits_f = fused.decode_step(next_f, fused_state, slot_ids, fused_ops)
        logits_r = ref.decode_step(next_r, ref_state, slot_ids, ref_ops)
        torch.testing.assert_close(logits_f, logits_r, rtol=0, atol=1e-4)
    assert tokens_f == tokens_r
    for name, tensor in fused_state.tensors().items():
        expected = ref_state.tensors()[name]
        if name in ("keys", "values"):
            # entries at or past a slot's fill are stale leftovers; compare the live ones
            for s in SLOTS:
                fill = int(fused_state.position[s]) % CFG.chunk_size
                torch.testing.assert_close(tensor[:, s, :fill], expected[:, s, :fill], rtol=0, atol=1e-4)
        else:
            torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-4, msg=name)


def test_decode_step_leaves_other_slots_alone(device):
    (fused, _), (state, _), (fused_ops, _) = fused_and_reference(device, torch.float32)
    before = {k: v.clone() for k, v in state.tensors().items()}
    slot_ids = torch.tensor(SLOTS, device=device)
    fused.decode_step(torch.tensor([3, 4, 5], device=device), state, slot_ids, fused_ops)
    others = [s for s in range(NUM_SLOTS) if s not in SLOTS]
    for name, tensor in state.tensors().items():
        row_dim = 0 if name == "position" else 1
        assert torch.equal(tensor.index_select(row_dim, torch.tensor(others, device=device)),
                           before[name].index_select(row_dim, torch.tensor(others, device=device))), name
    assert state.position[SLOTS].tolist() == [1, 1, 1]
