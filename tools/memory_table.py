"""Markdown table of per-request state size for the official 7B shape (the README shows it).

Run `python -m tools.memory_table`; tests check the README holds exactly this output.
"""

from __future__ import annotations

from megalodon_infer.config import ModelConfig
from megalodon_infer.model.state import request_state_bytes

MEGA_7B = dict(num_layers=32, model_dim=4096, z_dim=1024, value_dim=8192, num_heads=4, ffn_hidden_dim=11264,
               cema_ndim=16, norm_num_groups=64, vocab_size=32000)


def state_size_table() -> str:
    rows = ["| chunk size C | state at a chunk boundary | worst case (C-1 keys, bf16 KV) | any context length |",
            "|---|---|---|---|"]
    for chunk in (2048, 4096):
        cfg = ModelConfig(**MEGA_7B, chunk_size=chunk)
        empty = request_state_bytes(cfg, num_kv=0)
        full = request_state_bytes(cfg)
        rows.append(f"| {chunk} | {empty:,} B ({empty / 2**20:.1f} MiB) | {full:,} B ({full / 2**30:.2f} GiB) "
                    "| bounded by the worst case |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(state_size_table())
