"""The recurrent state of a batch of requests, slot-major, and its exact size in bytes.

A request's whole memory of its context is: per layer the TimestepNorm statistics (mean, var per
group), the CEMA state (D x N complex) and the keys/values of its current chunk only; the final
norm's statistics; and its token position (which gives every TimestepNorm count and the chunk fill,
position mod C). Nothing here grows with context length.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from ..config import ModelConfig


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

    def select(self, rows: Tensor | list[int]) -> MegalodonState:
        """A new state holding copies of the given rows (a value, never a view)."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.position.device)
        return MegalodonState(
            position=self.position[idx].clone(),
            norm_mean=self.norm_mean[:, idx].clone(),
            norm_var=self.norm_var[:, idx].clone(),
            cema_h=self.cema_h[:, idx].clone(),
            keys=self.keys[:, idx].clone(),
            values=self.values[:, idx].clone(),
        )

    def copy_rows_from(self, src: MegalodonState, dst_rows: Tensor | list[int], src_rows: Tensor | list[int]) -> None:
        """Overwrite rows `dst_rows` of this state with rows `src_rows` of `src` (same shapes per row)."""
        dst = torch.as_tensor(dst_rows, dtype=torch.long, device=self.position.device)
        srci = torch.as_tensor(src_rows, dtype=torch.long, device=src.position.device)
        self.position[dst] = src.position[srci].to(self.position.device)
        for name in ("norm_mean", "norm_var", "cema_h", "keys", "values"):
            getattr(self, name)[:, dst] = getattr(src, name)[:, srci].to(self.position.device)


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
    complex_dtype = torch.complex128 if stat_dtype == torch.float64 else torch.complex64
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
