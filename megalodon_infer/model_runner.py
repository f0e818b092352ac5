"""Turns a step plan into model calls over the slot pool; returns logits. Nothing else.

Inputs are assembled as host lists and copied to the device once per call; the only device-to-host
transfer the engine makes per step is the sampled ids (in the sampler).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from .cuda_graphs import DecodeGraphRunner
from .model.megalodon import Megalodon
from .state_pool import StatePool

logger = logging.getLogger(__name__)


class ModelRunner:
    """`use_cuda_graphs`: on a CUDA device with fused kernels, decode replays graphs captured per
    batch-size bucket (the pool must reserve a pad slot); otherwise every step runs eagerly."""

    def __init__(self, model: Megalodon, pool: StatePool, use_cuda_graphs: bool = False) -> None:
        self.model = model
        self.pool = pool
        self.device = model.device
        self.graphs: DecodeGraphRunner | None = None
        if use_cuda_graphs and self.device.type == "cuda" and pool.pad_slot is not None:
            self.graphs = DecodeGraphRunner(model, pool.state, pool.pad_slot)
            self.graphs.capture()
            logger.info("CUDA graphs captured for decode batch sizes %s", self.graphs.captured_buckets)

    @torch.inference_mode()
    def decode(self, slot_ids: list[int], token_ids: list[int]) -> Tensor:
        """One token for each of B sequences. Returns logits [B, V] float32."""
        if self.graphs is not None:
            tokens = torch.tensor(token_ids, dtype=torch.long).pin_memory()
            slots = torch.tensor(slot_ids, dtype=torch.long).pin_memory()
            # the graph's output buffer is reused by the next replay of this bucket: copy it out
            return self.graphs.step(tokens, slots).clone()
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
