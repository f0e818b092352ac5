"""Turns a step plan into model calls over the slot pool; returns logits. Nothing else.

Inputs are assembled as host lists and copied to the device once per call; the only device-to-host
transfer the engine makes per step is the sampled ids (in the sampler).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .model.megalodon import Megalodon
from .state_pool import StatePool


class ModelRunner:
    def __init__(self, model: Megalodon, pool: StatePool) -> None:
        self.model = model
        self.pool = pool
        self.device = model.device

    @torch.inference_mode()
    def decode(self, slot_ids: list[int], token_ids: list[int]) -> Tensor:
        """One token for each of B sequences. Returns logits [B, V] float32."""
        tokens = torch.tensor(token_ids, dtype=torch.long).view(-1, 1).to(self.device)
        slots = torch.tensor(slot_ids, dtype=torch.long).to(self.device)
        logits, _ = self.model(tokens, self.pool.state, slot_ids=slots)
        return logits[:, 0]

    @torch.inference_mode()
    def prefill(self, slot_id: int, token_ids: list[int], all_logits: bool) -> Tensor:
        """A prompt segment for one sequence. Returns logits [L, V] (all_logits) or [1, V] (last)."""
        tokens = torch.tensor(token_ids, dtype=torch.long).view(1, -1).to(self.device)
        slots = torch.tensor([slot_id], dtype=torch.long).to(self.device)
        logits, _ = self.model(tokens, self.pool.state, slot_ids=slots, last_only=not all_logits)
        return logits[0]
