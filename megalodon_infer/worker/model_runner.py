"""Turns a step plan into model calls over the slot pool; returns logits. Nothing else.

Inputs are assembled as host lists and copied to the device once per call (from pinned memory,
without a sync, on CUDA). Decode calls the model's `decode_step` with the decode ops chosen once at
construction, and never reads a device value back: the only device-to-host transfer the engine
makes per decode step is the sampled ids (in the sampler). A prefill segment (the scheduler never
lets one cross a chunk boundary, and the engine has validated its ids) runs as one model segment.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from megalodon_infer.model.megalodon import Megalodon
from megalodon_infer.model.state import MegalodonState
from megalodon_infer.worker.cuda_graphs import DecodeGraphRunner
from megalodon_infer.worker.decode_ops import DecodeOps, build_decode_ops

logger = logging.getLogger(__name__)


class ModelRunner:
    """Runs prefill segments and batched decode steps over `state`, a pool on the model's device.

    `kernels` ("auto" | "reference" | "fused") chooses the decode ops once, here (see
    `worker.decode_ops`). `use_cuda_graphs`: on a CUDA device with fused kernels, decode replays
    graphs captured per batch-size bucket (the pool must reserve `pad_slot`); otherwise every step
    runs eagerly.
    """

    def __init__(self, model: Megalodon, state: MegalodonState, pad_slot: int | None = None,
                 use_cuda_graphs: bool = False, kernels: str = "auto") -> None:
        self.model = model
        self.state = state
        self.device = model.device
        if state.position.device != self.device:
            raise ValueError(f"the state pool is on {state.position.device} but the model on {self.device}")
        self.ops: DecodeOps = build_decode_ops(model, state.keys.dtype, kernels)
        self.graphs: DecodeGraphRunner | None = None
        if use_cuda_graphs and self.device.type == "cuda" and pad_slot is not None:
            self.graphs = DecodeGraphRunner(model, state, pad_slot, self.ops)
            self.graphs.capture()

    @property
    def decode_backend(self) -> str:
        """"fused" or "reference": the decode kernels every decode step runs."""
        return self.ops.name

    @torch.inference_mode()
    def decode(self, slot_ids: list[int], token_ids: list[int]) -> Tensor:
        """One token for each of B sequences (distinct slots). Returns logits [B, V] float32 on the device."""
        tokens, slots = self._host_ids(token_ids), self._host_ids(slot_ids)
        if self.graphs is not None:
            # the graph's output buffer is reused by the next replay of this bucket: copy it out
            return self.graphs.step(tokens, slots).clone()
        return self.model.decode_step(self._to_device(tokens), self.state, self._to_device(slots), self.ops)

    @torch.inference_mode()
    def prefill(self, slot_id: int, token_ids: list[int], all_logits: bool) -> Tensor:
        """A prompt segment for one sequence, inside one chunk. Returns logits [L, V] (all_logits) or [1, V]."""
        tokens = self._to_device(self._host_ids(token_ids)).view(1, -1)
        slots = self._to_device(self._host_ids([slot_id]))
        logits = self.model.forward_segment(tokens, self.state, slots, logits="all" if all_logits else "last")
        return logits[0]

    def _host_ids(self, values: list[int]) -> Tensor:
        """[N] int64 on the host; pinned when the model is on CUDA, so the copy to it is asynchronous."""
        host = torch.tensor(values, dtype=torch.long)
        return host.pin_memory() if self.device.type == "cuda" else host

    def _to_device(self, host: Tensor) -> Tensor:
        return host.to(self.device, non_blocking=True)
