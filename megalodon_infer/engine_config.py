"""Engine configuration: one validated, frozen object (the server's CLI and env vars fill it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class EngineConfig(BaseModel):
    """How the engine schedules and sizes its state pool."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_num_seqs: int = Field(16, ge=1, description="State slots: sequences that can be in flight at once.")
    max_num_batched_tokens: int = Field(
        2048, ge=1, description="Tokens per engine step: one per decoding sequence, the rest spent on prefill.")
    max_waiting_requests: int = Field(
        256, ge=0, description="Requests allowed to queue for a slot; more are refused as overloaded.")
    max_model_len: int = Field(
        32768, ge=2, description="Longest prompt + completion accepted. Memory does not depend on it.")
    state_memory_limit_bytes: int | None = Field(
        None, ge=1, description="Refuse to start when the slot pool would need more than this.")
    prefix_cache_bytes: int = Field(
        0, ge=0, description="Device-memory budget of the recurrent-state prefix cache (0 disables it).")
    prefix_cache_host_bytes: int = Field(
        0, ge=0, description="Host-memory tier of the prefix cache: evicted snapshots move here first.")

    cuda_graphs: bool = Field(
        True, description="On a CUDA device with fused kernels, replay decode steps from CUDA graphs.")

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.max_num_batched_tokens < self.max_num_seqs:
            # every running sequence decodes each step; prefill needs room left over
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs})")
        return self
