"""The model against logits produced by an independent Megalodon implementation (megalodon-jax)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megalodon_infer import load_model
from megalodon_infer.worker.decode_ops import build_decode_ops


@pytest.fixture(scope="module")
def fixture(parity_dir):
    model = load_model(parity_dir, dtype="float32")
    tokens = torch.tensor([json.loads((parity_dir / "tokens.json").read_text())])
    expected = np.load(parity_dir / "expected.npz")
    greedy = json.loads((parity_dir / "expected_greedy.json").read_text())
    return model, tokens, expected, greedy


def test_full_sequence_logits_match(fixture):
    model, tokens, expected, _ = fixture
    logits, _ = model(tokens, model.allocate_state(1))
    assert logits.dtype == torch.float32
    np.testing.assert_allclose(logits[0].numpy(), expected["logits"], atol=1e-4, rtol=0)


def test_token_by_token_decode_matches_full_logits(fixture):
    model, tokens, expected, _ = fixture
    state = model.allocate_state(1)
    steps = [model(tokens[:, t:t + 1], state)[0][0, 0] for t in range(tokens.shape[1])]
    np.testing.assert_allclose(torch.stack(steps).numpy(), expected["logits"], atol=1e-4, rtol=0)


def test_decode_ops_token_by_token_match_full_logits(fixture):
    """The serving decode path (the worker's decode ops: fused on this CPU) against the fixture."""
    model, tokens, expected, _ = fixture
    ops = build_decode_ops(model, mode="auto")
    state, slot_ids = model.allocate_state(1), torch.tensor([0])
    steps = [model.decode_step(tokens[:, t], state, slot_ids, ops)[0] for t in range(tokens.shape[1])]
    np.testing.assert_allclose(torch.stack(steps).numpy(), expected["logits"], atol=1e-4, rtol=0)


def test_greedy_continuation_matches_exactly(fixture):
    model, tokens, expected, greedy = fixture
    state = model.allocate_state(1)
    logits, _ = model(tokens, state, last_only=True)
    produced, step_logits = [], []
    for _ in range(len(greedy)):
        step_logits.append(logits[0, -1])
        produced.append(int(logits[0, -1].argmax()))
        logits, _ = model(torch.tensor([[produced[-1]]]), state)
    assert produced == greedy
    np.testing.assert_allclose(torch.stack(step_logits).numpy(), expected["greedy_logits"], atol=1e-4, rtol=0)
    # the continuation crossed two chunk boundaries (80, 96); the state must say where it stands
    assert int(state.position[0]) == tokens.shape[1] + len(greedy)


def test_bfloat16_keeps_greedy_path_close(fixture, parity_dir):
    """bf16 weights with fp32 state: logits stay close to the fp32 reference."""
    model, tokens, expected, _ = fixture
    bf16 = load_model(parity_dir, dtype="bfloat16")
    state = bf16.allocate_state(1)
    assert state.norm_mean.dtype == torch.float32 and state.cema_h.dtype == torch.complex64
    assert state.keys.dtype == torch.bfloat16
    logits, _ = bf16(tokens, state)
    err = (logits[0] - torch.from_numpy(expected["logits"])).abs().max().item()
    assert err < 0.35, err
    agree = (logits[0].argmax(-1).numpy() == expected["logits"].argmax(-1)).mean()
    assert agree > 0.85, agree
