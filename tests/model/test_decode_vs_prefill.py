"""One forward contract: any split of the tokens, and batched decode, give the one-pass result."""

from __future__ import annotations

import itertools

import pytest
import torch

from megalodon_infer import ModelConfig
from megalodon_infer.model.init import random_model
from megalodon_infer.worker.decode_ops import build_decode_ops

CONFIGS = [
    dict(num_heads=1, swiglu=False, scale_emb=False, share_emb=False, rescale_nffn=False, chunk_size=4),
    dict(num_heads=2, swiglu=True, scale_emb=True, share_emb=False, rescale_nffn=True, chunk_size=8),
    dict(num_heads=4, swiglu=False, scale_emb=False, share_emb=True, rescale_nffn=False, chunk_size=16),
    dict(num_heads=2, swiglu=True, scale_emb=True, share_emb=True, rescale_nffn=True, chunk_size=64),
]


def make_config(**overrides) -> ModelConfig:
    base = dict(num_layers=2, model_dim=32, z_dim=16, value_dim=32, ffn_hidden_dim=48, cema_ndim=4,
                norm_num_groups=4, vocab_size=61, norm_affine=True)
    base.update(overrides)
    return ModelConfig(**base)


def full_and_stepwise(model, tokens, decode_ops=None):
    """One pass vs one token per call: through `forward` (the reference), or through `decode_step`
    with the worker's decode ops."""
    full, full_state = model(tokens, model.allocate_state(tokens.shape[0]))
    state = model.allocate_state(tokens.shape[0])
    if decode_ops is None:
        steps = torch.cat([model(tokens[:, t:t + 1], state)[0] for t in range(tokens.shape[1])], dim=1)
    else:
        slot_ids = torch.arange(tokens.shape[0])
        steps = torch.stack([model.decode_step(tokens[:, t], state, slot_ids, decode_ops)
                             for t in range(tokens.shape[1])], dim=1)
    return full, full_state, steps, state


def assert_states_close(a, b, atol):
    for name, ta in a.tensors().items():
        tb = b.tensors()[name]
        if name in ("keys", "values"):
            # only entries below the fill count are meaningful
            fill = int(a.position[0]) % ta.shape[2]
            ta, tb = ta[:, :, :fill], tb[:, :, :fill]
        torch.testing.assert_close(ta, tb, atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize("overrides", CONFIGS, ids=lambda o: f"H{o['num_heads']}-C{o['chunk_size']}")
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-9), (torch.float32, 1e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("path", ["forward", "decode_ops"])
def test_token_by_token_equals_prefill(overrides, dtype, atol, path):
    cfg = make_config(**overrides)
    model = random_model(cfg, seed=3, dtype=dtype)
    C = cfg.chunk_size
    T = 3 * C + C // 2 + 1  # crosses three chunk boundaries and ends mid-chunk
    tokens = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(0))
    # "auto": the fused kernels for float32, their reference twins for float64
    ops = build_decode_ops(model, mode="auto") if path == "decode_ops" else None
    full, full_state, steps, step_state = full_and_stepwise(model, tokens, ops)
    torch.testing.assert_close(steps, full, atol=atol, rtol=0)
    assert_states_close(full_state, step_state, atol)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-9), (torch.float32, 1e-4)], ids=["f64", "f32"])
def test_any_split_gives_same_logits_and_state(dtype, atol):
    cfg = make_config(num_heads=2, chunk_size=8, swiglu=True)
    model = random_model(cfg, seed=5, dtype=dtype)
    T = 29
    tokens = torch.randint(0, cfg.vocab_size, (1, T), generator=torch.Generator().manual_seed(1))
    full, full_state = model(tokens, model.allocate_state(1))
    rng = torch.Generator().manual_seed(2)
    for _ in range(6):
        cuts = sorted(torch.randperm(T - 1, generator=rng)[:4].add(1).tolist())
        state = model.allocate_state(1)
        pieces = [model(tokens[:, a:b], state)[0] for a, b in itertools.pairwise([0, *cuts, T])]
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=atol, rtol=0)
        assert_states_close(full_state, state, atol)


def test_last_only_returns_the_last_logits():
    cfg = make_config(chunk_size=8)
    model = random_model(cfg, seed=1)
    tokens = torch.randint(0, cfg.vocab_size, (3, 21), generator=torch.Generator().manual_seed(0))
    full, _ = model(tokens, model.allocate_state(3))
    last, _ = model(tokens, model.allocate_state(3), last_only=True)
    assert last.shape == (3, 1, cfg.vocab_size)
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-9), (torch.float32, 1e-4)], ids=["f64", "f32"])
def test_batched_decode_at_different_positions_equals_each_alone(dtype, atol):
    """Rows of one state at different positions (different chunk fills) decode as one batch."""
    cfg = make_config(num_heads=2, chunk_size=8, swiglu=False, scale_emb=True)
    model = random_model(cfg, seed=7, dtype=dtype)
    rng = torch.Generator().manual_seed(3)
    prompt_lengths = [1, 5, 8, 9, 14, 16, 23]  # fills 1, 5, 0, 1, 6, 0, 7
    B = len(prompt_lengths)
    prompts = [torch.randint(0, cfg.vocab_size, (1, n), generator=rng) for n in prompt_lengths]
    steps = 12
    decode_tokens = torch.randint(0, cfg.vocab_size, (B, steps), generator=rng)

    # alone: each request in its own state
    alone = []
    for b in range(B):
        state = model.allocate_state(1)
        model(prompts[b], state)
        alone.append(torch.cat([model(decode_tokens[b:b + 1, t:t + 1], state)[0] for t in range(steps)], dim=1))
    alone = torch.cat(alone)

    # together: one pool, rows in a shuffled order, batched one-token steps
    pool = model.allocate_state(B + 3)
    slots = torch.tensor([9, 2, 0, 5, 7, 1, 4])  # slot ids deliberately not equal to batch rows
    for b in range(B):
        model(prompts[b], pool, slot_ids=slots[b:b + 1])
    together = torch.cat([model(decode_tokens[:, t:t + 1], pool, slot_ids=slots)[0] for t in range(steps)], dim=1)
    torch.testing.assert_close(together, alone, atol=atol, rtol=0)
    assert pool.position[slots].tolist() == [n + steps for n in prompt_lengths]


def test_untouched_slots_are_not_modified():
    cfg = make_config(chunk_size=4)
    model = random_model(cfg, seed=2)
    pool = model.allocate_state(4)
    model(torch.randint(0, cfg.vocab_size, (1, 6)), pool, slot_ids=torch.tensor([3]))
    before = {k: v.clone() for k, v in pool.tensors().items()}
    model(torch.randint(0, cfg.vocab_size, (2, 1)), pool, slot_ids=torch.tensor([0, 2]))
    for name, tensor in pool.tensors().items():
        rows = [1, 3]
        if name == "position":
            assert torch.equal(tensor[rows], before[name][rows])
        else:
            assert torch.equal(tensor[:, rows], before[name][:, rows]), name


def test_out_of_range_token_is_rejected():
    cfg = make_config()
    model = random_model(cfg)
    with pytest.raises(ValueError, match="token ids"):
        model(torch.tensor([[cfg.vocab_size]]), model.allocate_state(1))


@pytest.mark.parametrize("overrides", CONFIGS[:3], ids=lambda o: f"H{o['num_heads']}-C{o['chunk_size']}")
def test_training_forward_equals_inference_forward(overrides):
    cfg = make_config(**overrides)
    model = random_model(cfg, seed=11, dtype=torch.float64)
    T = 4 * cfg.chunk_size
    tokens = torch.randint(0, cfg.vocab_size, (2, T), generator=torch.Generator().manual_seed(5))
    with torch.enable_grad():
        model.requires_grad_(True)
        train_logits = model.forward_train(tokens)
        train_logits.logsumexp(-1).mean().backward()
    infer_logits, _ = model(tokens, model.allocate_state(2))
    torch.testing.assert_close(train_logits.detach(), infer_logits, atol=1e-9, rtol=0)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads) and all(torch.isfinite(g).all() for g in grads)
