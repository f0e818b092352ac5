"""Whole-model decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of B rows runs in the smallest captured bucket >= B. The step's inputs (token ids and
slot ids) live in static device buffers that the graph reads; positions, fills and chunk resets are
computed on the device from the state pool, and the attention kernel's split plan depends on the
bucket alone, so one graph serves every request mix and every fill. Padding rows point at
`pad_slot`, a pool row the caller never gives to a request: its state is scratch. Batches above
the largest bucket, and every step when capture is unavailable, run eagerly.

Knows the model's `decode_step`, the decode ops and the state pool, nothing of requests or scheduling.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from megalodon_infer.model.megalodon import Megalodon
    from megalodon_infer.model.state import MegalodonState
    from megalodon_infer.worker.decode_ops import DecodeOps

logger = logging.getLogger(__name__)

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class _CapturedStep:
    graph: torch.cuda.CUDAGraph
    tokens: Tensor  # [bucket] int64, static input
    slot_ids: Tensor  # [bucket] int64, static input
    logits: Tensor  # [bucket, V] float32, static output


class DecodeGraphRunner:
    """Capture `model.decode_step` over `state` with `ops` per bucket, then replay it.

    Args:
        model: a Megalodon on a CUDA device.
        state: the state pool the graphs read and write (captured by address: keep it alive and
            never reallocate it while the runner is in use).
        pad_slot: a pool row reserved for padding rows.
        ops: the decode ops; only fused ones can be captured (the reference syncs with the host).
            Their derived weights are built already, so nothing in a capture syncs.
        buckets: batch sizes to capture; sizes above the pool's slot count are dropped.
    """

    def __init__(self, model: Megalodon, state: MegalodonState, pad_slot: int, ops: DecodeOps,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> None:
        if model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a model on a CUDA device, got {model.device}")
        if not 0 <= pad_slot < state.batch_size:
            raise ValueError(f"pad_slot {pad_slot} is not a row of a {state.batch_size}-slot state")
        self.model, self.state, self.pad_slot, self.ops = model, state, pad_slot, ops
        self.buckets = tuple(sorted(b for b in set(buckets) if 0 < b <= state.batch_size))
        self._graphs: dict[int, _CapturedStep] = {}

    @property
    def captured_buckets(self) -> tuple[int, ...]:
        return tuple(sorted(self._graphs))

    @torch.no_grad()
    def capture(self) -> None:
        """Capture every bucket (largest first, one shared memory pool). On failure, log and stay eager."""
        if not self.ops.is_fused:
            logger.error("CUDA graphs disabled: decode kernels are %s (%s)", self.ops.name, self.ops.kernels.reason)
            return
        pool = torch.cuda.graph_pool_handle()
        # NOTE: capture on a stream of the model's device, with that device current: torch.cuda.graph's
        # default capture stream belongs to the device current when it was first used (cuda:0 unless set),
        # and a capture there records none of the work of a model on another device (cuda:1, ...).
        stream = torch.cuda.Stream(self.model.device)
        try:
            with torch.cuda.device(self.model.device):
                for bucket in reversed(self.buckets):
                    self._graphs[bucket] = self._capture_one(bucket, pool, stream)
        except RuntimeError as exc:
            # NOTE: a failed capture must not take the server down: decode still works eagerly.
            logger.error("CUDA graph capture failed at batch %d, decoding eagerly: %s", bucket, exc)
            self._graphs.clear()
            return
        logger.info("captured decode CUDA graphs for batch sizes %s", self.captured_buckets)

    def _capture_one(self, bucket: int, pool: tuple[int, int], stream: torch.cuda.Stream) -> _CapturedStep:
        device = self.model.device
        tokens = torch.zeros(bucket, dtype=torch.long, device=device)
        slot_ids = torch.full((bucket,), self.pad_slot, dtype=torch.long, device=device)
        # Warm up on a side stream (lazy initialisation must not land in the graph); every row is
        # padding, so only the pad slot's state changes.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.model.decode_step(tokens, self.state, slot_ids, self.ops)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            logits = self.model.decode_step(tokens, self.state, slot_ids, self.ops)
        return _CapturedStep(graph, tokens, slot_ids, logits)

    def bucket_for(self, batch_size: int) -> int | None:
        """The smallest captured bucket holding `batch_size` rows, or None (eager)."""
        return next((b for b in self.captured_buckets if b >= batch_size), None)

    @torch.no_grad()
    def step(self, tokens: Tensor, slot_ids: Tensor) -> Tensor:
        """One decode step. tokens, slot_ids: [B] int64 (any device; copied once, without a sync from
        pinned host memory).

        Returns logits [B, V] float32. From a graph this is a view of its static output buffer,
        valid until the next step of the same bucket: copy what must outlive it.
        """
        batch = tokens.shape[0]
        bucket = self.bucket_for(batch)
        if bucket is None:
            device = self.model.device
            return self.model.decode_step(tokens.to(device, non_blocking=True), self.state,
                                          slot_ids.to(device, non_blocking=True), self.ops)
        captured = self._graphs[bucket]
        captured.tokens[:batch].copy_(tokens, non_blocking=True)
        captured.slot_ids[:batch].copy_(slot_ids, non_blocking=True)
        if batch < bucket:
            captured.tokens[batch:].zero_()
            captured.slot_ids[batch:].fill_(self.pad_slot)
        captured.graph.replay()
        return captured.logits[:batch]
