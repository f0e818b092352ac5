"""The recurrent state of a batch of requests, slot-major, and its exact size in bytes.

A request's whole memory of its context is: per layer the TimestepNorm statistics (mean, var per
group), the CEMA state (D x N complex) and the keys/values of its current chunk only; the final
norm's statistics; and its token position (which gives every TimestepNorm count and the chunk fill,
position mod C). Nothing here grows with context length.

`StepView` is the one per-step view every layer reads: the pool, the rows' slot ids and where each
row stands. Layers address the pool as `step.layer(i)` indexed by `step.slot_ids`, in prefill and
decode alike.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from megalodon_infer.config import ModelConfig
from megalodon_infer.kernels.reference import complex_dtype_for


@dataclass
class MegalodonState:
    """State tensors for S slots (rows). Layer-major so each layer reads one contiguous block.

    position:  [S] int64, tokens processed so far.
    norm_mean: [Lyr + 1, S, G] stat dtype (fp32; fp64 for a float64 model); row Lyr is the final norm.
    norm_var:  [Lyr + 1, S, G] population variance.
    cema_h:    [Lyr, S, D, N] complex64 (complex128 for a float64 model).
    keys:      [Lyr, S, C, H, dz] KV dtype; only entries < position mod C are meaningful.
    values:    [Lyr, S, C, H, dv]
    """

    position: Tensor
    norm_mean: Tensor
    norm_var: Tensor
    cema_h: Tensor
    keys: Tensor
    values: Tensor

    @property
    def batch_size(self) -> int:
        return self.position.shape[0]

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def layer(self, index: int) -> LayerPool:
        """Views of layer `index`'s pool tensors (every slot)."""
        return LayerPool(self.norm_mean[index], self.norm_var[index], self.cema_h[index], self.keys[index],
                         self.values[index])

    def final_norm_stats(self) -> tuple[Tensor, Tensor]:
        """Views of the final TimestepNorm's (mean, var): [S, G] each."""
        return self.norm_mean[-1], self.norm_var[-1]


@dataclass(frozen=True, eq=False)
class LayerPool:
    """One layer's slice of the state pool, every slot (views, written in place by slot id).

    mean, var: [S, G]; cema_h: [S, D, N] complex; keys: [S, C, H, dz]; values: [S, C, H, dv].
    """

    mean: Tensor
    var: Tensor
    cema_h: Tensor
    keys: Tensor
    values: Tensor


@dataclass(frozen=True, eq=False)
class StepView:
    """What every layer reads for one step of B rows with L tokens each.

    state: the pool the rows live in; None for training (a fresh state that is never stored).
    slot_ids: [B] int64 distinct pool rows (0..B-1 for training).
    positions: [B] int64 tokens each row had processed before this step.
    fills: [B] int64 keys already in each row's current chunk (positions mod C).
    rope_positions: [B, L] int64 within-chunk position of every token of the step.
    length: L. Outside training a row's step never crosses a chunk boundary (fills + L <= C).
    """

    state: MegalodonState | None
    slot_ids: Tensor
    positions: Tensor
    fills: Tensor
    rope_positions: Tensor
    length: int

    @classmethod
    def at(cls, state: MegalodonState, slot_ids: Tensor, length: int) -> StepView:
        """L tokens for the rows `slot_ids` [B] of `state`, from where each row stands. No host sync."""
        positions = state.position[slot_ids]
        return cls._build(state, slot_ids, positions, length, chunk_size=state.keys.shape[2])

    @classmethod
    def fresh(cls, batch_size: int, length: int, chunk_size: int, device: torch.device) -> StepView:
        """Whole sequences of `length` tokens from a fresh state, with no pool (training)."""
        zeros = torch.zeros(batch_size, dtype=torch.int64, device=device)
        return cls._build(None, torch.arange(batch_size, device=device), zeros, length, chunk_size)

    @classmethod
    def _build(cls, state: MegalodonState | None, slot_ids: Tensor, positions: Tensor, length: int,
               chunk_size: int) -> StepView:
        fills = positions % chunk_size
        offsets = torch.arange(length, device=positions.device)
        rope_positions = (fills[:, None] + offsets) % chunk_size  # [B, L]; the mod only matters for training
        return cls(state, slot_ids, positions, fills, rope_positions, length)

    def layer(self, index: int) -> LayerPool:
        """Layer `index`'s pool; rows are addressed by `slot_ids`."""
        return self._pool().layer(index)

    def final_norm_stats(self) -> tuple[Tensor, Tensor]:
        return self._pool().final_norm_stats()

    @property
    def pool_position(self) -> Tensor:
        """[S] int64 every slot's position until the step ends (ops that index it by slot read this)."""
        return self._pool().position

    def advance(self) -> None:
        """Record that every row has processed the step's tokens (no-op without a pool)."""
        if self.state is not None:
            self.state.position[self.slot_ids] = self.positions + self.length

    def _pool(self) -> MegalodonState:
        if self.state is None:
            raise RuntimeError("this step has no state pool (a training step)")
        return self.state


def allocate_state(
    cfg: ModelConfig,
    batch_size: int,
    kv_dtype: torch.dtype,
    stat_dtype: torch.dtype,
    device: torch.device | str,
) -> MegalodonState:
    """Uninitialised state tensors for `batch_size` slots (callers reset rows before use)."""
    Lyr, G, D, N, C = cfg.num_layers, cfg.norm_num_groups, cfg.model_dim, cfg.cema_ndim, cfg.chunk_size
    H, dz, dv = cfg.num_heads, cfg.head_z_dim, cfg.head_value_dim
    complex_dtype = complex_dtype_for(stat_dtype)
    return MegalodonState(
        position=torch.zeros(batch_size, dtype=torch.int64, device=device),
        norm_mean=torch.zeros(Lyr + 1, batch_size, G, dtype=stat_dtype, device=device),
        norm_var=torch.ones(Lyr + 1, batch_size, G, dtype=stat_dtype, device=device),
        cema_h=torch.zeros(Lyr, batch_size, D, N, dtype=complex_dtype, device=device),
        keys=torch.zeros(Lyr, batch_size, C, H, dz, dtype=kv_dtype, device=device),
        values=torch.zeros(Lyr, batch_size, C, H, dv, dtype=kv_dtype, device=device),
    )


def request_state_bytes(
    cfg: ModelConfig,
    kv_dtype: torch.dtype = torch.bfloat16,
    stat_dtype: torch.dtype = torch.float32,
    num_kv: int | None = None,
) -> int:
    """Bytes of one request's state holding `num_kv` keys/values (default: the worst case, C - 1).

    Between calls a request holds at most C - 1 keys (a full chunk is dropped when it completes).
    This counts what the state must hold; a slot pool reserves C entries per slot (see
    `slot_bytes`), since a chunk is full for an instant while its last token is computed.
    """
    n_kv = cfg.chunk_size - 1 if num_kv is None else num_kv
    if not 0 <= n_kv <= cfg.chunk_size:
        raise ValueError(f"num_kv must be in [0, {cfg.chunk_size}], got {n_kv}")
    kv_size = torch.empty((), dtype=kv_dtype).element_size()
    st_size = torch.empty((), dtype=stat_dtype).element_size()
    complex_size = 2 * st_size
    kv = n_kv * (cfg.z_dim + cfg.value_dim) * kv_size
    cema = cfg.model_dim * cfg.cema_ndim * complex_size
    norm_stats = 2 * cfg.norm_num_groups * st_size
    position = 8
    return cfg.num_layers * (kv + cema + norm_stats) + norm_stats + position


def slot_bytes(cfg: ModelConfig, kv_dtype: torch.dtype = torch.bfloat16,
               stat_dtype: torch.dtype = torch.float32) -> int:
    """Bytes one pool slot reserves: the state with room for a whole chunk of keys/values."""
    return request_state_bytes(cfg, kv_dtype, stat_dtype, num_kv=cfg.chunk_size)
