"""The serving engine with decode replayed from CUDA graphs == eager decode (GPU only)."""

from __future__ import annotations

import pytest
import torch

from megalodon_infer import ModelConfig, SamplingParams
from megalodon_infer.config import EngineConfig
from megalodon_infer.engine.llm_engine import LLMEngine
from megalodon_infer.model.init import random_model
from tests.kernels.conftest import NO_CUDA

CFG = ModelConfig(num_layers=2, model_dim=64, z_dim=32, value_dim=64, num_heads=2, ffn_hidden_dim=96, cema_ndim=8,
                  norm_num_groups=4, vocab_size=97, chunk_size=16)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]


def greedy_outputs(cuda_graphs: bool) -> tuple[dict[str, list[int]], LLMEngine]:
    model = random_model(CFG, seed=3, device="cuda")
    engine = LLMEngine(model, None, EngineConfig(max_num_seqs=12, cuda_graphs=cuda_graphs))
    g = torch.Generator().manual_seed(0)
    for i in range(12):  # odd batch sizes land in padded buckets; lengths cross chunk boundaries
        prompt = torch.randint(0, CFG.vocab_size, (int(torch.randint(1, 40, (1,), generator=g)),), generator=g)
        engine.add_request(f"r{i}", prompt.tolist(), SamplingParams(temperature=0, max_tokens=5 + 3 * i))
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(t for d in out.outputs for t in d.token_ids)
    return tokens, engine


def test_engine_decode_from_cuda_graphs_equals_eager():
    graphed, engine = greedy_outputs(cuda_graphs=True)
    assert engine.runner.graphs is not None and engine.runner.graphs.captured_buckets
    eager, eager_engine = greedy_outputs(cuda_graphs=False)
    assert eager_engine.runner.graphs is None
    assert graphed == eager
    assert engine.pool.num_free == engine.pool.num_slots  # the pad slot was never handed out
