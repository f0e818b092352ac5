"""A tiny random Megalodon and a reference greedy decoder that runs one request alone."""

from __future__ import annotations

import pytest
import torch

from megalodon_infer import ModelConfig
from megalodon_infer.model.init import random_model

TINY = ModelConfig(num_layers=2, model_dim=32, z_dim=16, value_dim=32, num_heads=2, ffn_hidden_dim=48,
                   cema_ndim=4, chunk_size=8, norm_num_groups=4, vocab_size=97, swiglu=True)


@pytest.fixture(scope="session")
def tiny_model():
    return random_model(TINY, seed=21, dtype=torch.float64)


def greedy_alone(model, prompt: list[int], max_tokens: int) -> list[int]:
    """The specification: one request, its own fresh state, argmax at every step."""
    state = model.allocate_state(1)
    logits, _ = model(torch.tensor([prompt]), state, last_only=True)
    out = []
    for _ in range(max_tokens):
        out.append(int(logits[0, -1].argmax()))
        logits, _ = model(torch.tensor([[out[-1]]]), state)
    return out


def random_prompts(count: int, seed: int, vocab: int, max_len: int = 40) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (count,), generator=g).tolist()
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]
