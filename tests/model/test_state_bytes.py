from __future__ import annotations

import torch

from megalodon_infer import ModelConfig, request_state_bytes, slot_bytes
from megalodon_infer.model.init import random_model

MEGA7_1B = dict(num_layers=32, model_dim=4096, z_dim=1024, value_dim=8192, num_heads=4, ffn_hidden_dim=11264,
                cema_ndim=16, norm_num_groups=64, vocab_size=32000)


def test_official_7b_state_size_follows_the_spec_formula():
    for chunk in (2048, 4096):
        cfg = ModelConfig(**MEGA7_1B, chunk_size=chunk)
        # spec 4.6 with fp32 stats and bf16 KV; our state keeps one position instead of a count per norm
        per_layer = (chunk - 1) * (1024 + 8192) * 2 + 4096 * 16 * 8 + 2 * 64 * 4
        assert request_state_bytes(cfg) == 32 * per_layer + 2 * 64 * 4 + 8
    cfg = ModelConfig(**MEGA7_1B, chunk_size=4096)
    assert request_state_bytes(cfg, num_kv=0) == 32 * (4096 * 16 * 8 + 512) + 512 + 8  # ~16 MiB, any context


def test_allocated_state_matches_slot_bytes():
    cfg = ModelConfig(num_layers=3, model_dim=32, z_dim=16, value_dim=24, num_heads=2, ffn_hidden_dim=8,
                      cema_ndim=4, chunk_size=8, norm_num_groups=4, vocab_size=11)
    for dtype in (torch.float32, torch.bfloat16):
        model = random_model(cfg, dtype=dtype)
        assert model.allocate_state(5).nbytes() == 5 * slot_bytes(cfg, kv_dtype=dtype)


def test_readme_table_is_the_functions_output():
    """The README's per-request memory table is computed, not typed: it must equal the function's."""
    from pathlib import Path

    from tools.memory_table import state_size_table

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start, end = "<!-- state-table:start -->\n", "\n<!-- state-table:end -->"
    assert readme[readme.index(start) + len(start):readme.index(end)] == state_size_table()
