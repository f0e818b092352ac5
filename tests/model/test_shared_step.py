"""One MEGA computation for every path: prefill segments, decode ops and training differ only in their StepOps."""

from __future__ import annotations

import pytest
import torch

from megalodon_infer import ModelConfig
from megalodon_infer.model.attention import MovingAverageGatedAttention
from megalodon_infer.model.init import random_model
from megalodon_infer.worker.decode_ops import build_decode_ops

CFG = ModelConfig(num_layers=2, model_dim=32, z_dim=16, value_dim=32, num_heads=2, ffn_hidden_dim=48, cema_ndim=4,
                  norm_num_groups=4, vocab_size=61, chunk_size=8, swiglu=True, scale_emb=True)
SLOTS = [4, 0, 2, 5]
PROMPT_LENGTHS = [8, 3, 7, 13]  # fills 0 (a fresh chunk), mid-chunk, C-1 (the step completes it), past a boundary


def primed_pool(model):
    """A pool whose slots stand at the positions above, plus untouched slots 1 and 3."""
    pool = model.allocate_state(6)
    g = torch.Generator().manual_seed(0)
    for slot, n in zip(SLOTS, PROMPT_LENGTHS, strict=True):
        model(torch.randint(0, CFG.vocab_size, (1, n), generator=g), pool, slot_ids=torch.tensor([slot]))
    return pool


def clone(state):
    return type(state)(**{name: t.clone() for name, t in state.tensors().items()})


@pytest.mark.parametrize("dtype,mode,atol", [
    (torch.float64, "reference", 1e-12),
    (torch.float32, "reference", 1e-6),
    (torch.float32, "fused", 1e-4),
], ids=["f64-reference", "f32-reference", "f32-fused"])
def test_a_one_token_segment_equals_the_decode_ops(dtype, mode, atol):
    model = random_model(CFG, seed=4, dtype=dtype)
    ops = build_decode_ops(model, mode=mode)
    assert ops.name == mode
    segment_pool = primed_pool(model)
    decode_pool = clone(segment_pool)
    slot_ids = torch.tensor(SLOTS)
    g = torch.Generator().manual_seed(1)
    for _ in range(CFG.chunk_size + 2):  # every slot crosses a chunk boundary
        tokens = torch.randint(0, CFG.vocab_size, (len(SLOTS),), generator=g)
        segment = model.forward_segment(tokens[:, None], segment_pool, slot_ids)[:, 0]
        decoded = model.decode_step(tokens, decode_pool, slot_ids, ops)
        torch.testing.assert_close(decoded, segment, atol=atol, rtol=0)
    for name, expected in segment_pool.tensors().items():
        torch.testing.assert_close(decode_pool.tensors()[name], expected, atol=atol, rtol=0, msg=name)


def test_every_path_runs_the_one_mega_forward(monkeypatch):
    """Prefill, decode with the worker's ops and training all go through `MovingAverageGatedAttention.forward`."""
    model = random_model(CFG, seed=5)
    calls: list[int] = []
    original = MovingAverageGatedAttention.forward

    def counting(self, x, *args, **kwargs):
        calls.append(x.shape[1])
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(MovingAverageGatedAttention, "forward", counting)
    tokens = torch.randint(0, CFG.vocab_size, (2, 2 * CFG.chunk_size), generator=torch.Generator().manual_seed(2))
    state = model.allocate_state(2)
    model(tokens[:, :5], state)
    assert calls == [5] * CFG.num_layers
    calls.clear()
    model.decode_step(tokens[:, 5], state, torch.arange(2), build_decode_ops(model))
    assert calls == [1] * CFG.num_layers
    calls.clear()
    model.forward_train(tokens)
    assert calls == [2 * CFG.chunk_size] * CFG.num_layers
