"""Megalodon decode-step ops: each fused op beside its pure-torch reference twin (`*_ref`).

The twins take the same arguments and return the same values; the reference is the specification
and the tests hold the fused kernels (torch.ops.megalodon.*, built from csrc/) to it. Every op reads
and writes the state *pool* tensors of a MegalodonState layer directly: batch row b uses pool row
`slot_ids[b]`, never row b, and slot ids must be distinct. Nothing here syncs with the host except
where a reference says so.

The reference math is the model's own: TimestepNorm and CEMA come from `reference` (which the
model's modules call too), and `chunk_attention` below is the one definition of chunk attention,
used by the model's prefill path as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from megalodon_infer.kernels.reference import CemaCoeffs, cema_step, timestep_norm


class _TimestepNormLike(Protocol):
    weight: Tensor
    bias: Tensor
    prior_count: Tensor
    num_groups: int
    eps: float


class _CemaLike(Protocol):
    def compute_coeffs(self, real_dtype: torch.dtype) -> CemaCoeffs: ...


@dataclass(frozen=True, eq=False)
class TsnWeights:
    """One TimestepNorm, as the decode ops use it; built once per model (`worker.decode_ops`).

    weight, bias: [D] the parameters as stored (offsets from 1 / additive), for the reference.
    affine: [2, D] fp32 rows (1 + weight, bias), for the kernels.
    """

    weight: Tensor
    bias: Tensor
    affine: Tensor
    num_groups: int
    eps: float
    prior_count: int

    @classmethod
    def from_module(cls, norm: _TimestepNormLike, stat_dtype: torch.dtype) -> TsnWeights:
        affine = torch.stack((1.0 + norm.weight.to(stat_dtype), norm.bias.to(stat_dtype))).float().contiguous()
        return cls(weight=norm.weight, bias=norm.bias, affine=affine, num_groups=norm.num_groups, eps=norm.eps,
                   prior_count=int(norm.prior_count))


@dataclass(frozen=True, eq=False)
class CemaWeights:
    """One CEMA's coefficients, computed once from the parameters.

    coeffs: the reference coefficients in the stat dtype (p, q, eta [D, N]; omega [D]).
    packed: [D, 5, N] fp32 rows p, Re q, Im q, Re eta, Im eta, for the kernels (n fastest, so one
        channel's coefficients are contiguous and the CUDA lanes of a channel read consecutive n).
    omega: [D] fp32.
    """

    coeffs: CemaCoeffs
    packed: Tensor
    omega: Tensor

    @classmethod
    def from_module(cls, cema: _CemaLike, stat_dtype: torch.dtype) -> CemaWeights:
        with torch.no_grad():
            c = cema.compute_coeffs(stat_dtype)
        packed = torch.stack((c.p, c.q.real, c.q.imag, c.eta.real, c.eta.imag), dim=1).float().contiguous()
        return cls(coeffs=c, packed=packed, omega=c.omega.float().contiguous())


# ------------------------------------------------------------------------------ TimestepNorm + CEMA


def tsn_cema_decode_step_ref(x: Tensor, slot_ids: Tensor, position: Tensor, mean: Tensor, var: Tensor,
                             cema_h: Tensor, tsn: TsnWeights, cema: CemaWeights) -> tuple[Tensor, Tensor]:
    """One token of TimestepNorm then CEMA, for B rows addressed by slot.

    Args:
        x: [B, D] block input (model dtype).
        slot_ids: [B] int64 pool rows.
        position: [S] int64 tokens each slot has processed before this one (read only).
        mean, var: [S, G] the layer's running statistics (stat dtype), updated in place at slot_ids.
        cema_h: [S, D, N] complex CEMA state, updated in place at slot_ids.
    Returns:
        x_hat: [B, D] normalised x and y: [B, D] CEMA output, both in x's dtype.
    """
    count = position[slot_ids] + tsn.prior_count
    x_hat, new_mean, new_var = timestep_norm(x[:, None], count, mean[slot_ids], var[slot_ids], tsn.weight,
                                             tsn.bias, tsn.num_groups, tsn.eps)
    mean[slot_ids] = new_mean
    var[slot_ids] = new_var
    x_hat = x_hat[:, 0]
    y, h = cema_step(x_hat.to(mean.dtype), cema_h[slot_ids], cema.coeffs)
    cema_h[slot_ids] = h
    return x_hat, y.to(x.dtype)


def tsn_cema_decode_step(x: Tensor, slot_ids: Tensor, position: Tensor, mean: Tensor, var: Tensor,
                         cema_h: Tensor, tsn: TsnWeights, cema: CemaWeights) -> tuple[Tensor, Tensor]:
    """Fused `tsn_cema_decode_step_ref` (same arguments and results; fp32 stats, complex64 state)."""
    return torch.ops.megalodon.tsn_cema_step(x, slot_ids, position, mean, var, torch.view_as_real(cema_h),
                                             tsn.affine, cema.packed, cema.omega, tsn.prior_count, tsn.eps)


def final_norm_step_ref(x: Tensor, slot_ids: Tensor, position: Tensor, mean: Tensor, var: Tensor,
                        tsn: TsnWeights) -> Tensor:
    """One token of the final TimestepNorm. x: [B, D]; mean, var: [S, G] updated in place. Returns [B, D]."""
    count = position[slot_ids] + tsn.prior_count
    y, new_mean, new_var = timestep_norm(x[:, None], count, mean[slot_ids], var[slot_ids], tsn.weight, tsn.bias,
                                         tsn.num_groups, tsn.eps)
    mean[slot_ids] = new_mean
    var[slot_ids] = new_var
    return y[:, 0]


def final_norm_step(x: Tensor, slot_ids: Tensor, position: Tensor, mean: Tensor, var: Tensor,
                    tsn: TsnWeights) -> Tensor:
    """Fused `final_norm_step_ref`."""
    return torch.ops.megalodon.tsn_step(x, slot_ids, position, mean, var, tsn.affine, tsn.prior_count, tsn.eps)


# -------------------------------------------------------------------------------- chunk attention


def chunk_attention(q: Tensor, k: Tensor, v: Tensor, fills: Tensor, keys: Tensor, values: Tensor,
                    slot_ids: Tensor) -> Tensor:
    """Append k/v at each row's fill position, then attend over the row's chunk so far.

    Args:
        q: [B, L, H, dz] stat dtype (after RoPE).
        k: [B, L, H, dz], v: [B, L, H, dv] in the KV dtype.
        fills: [B] int64 keys already in each row's chunk; fills + L <= C.
        keys: [S, C, H, dz], values: [S, C, H, dv] the layer's KV pool, written at slot_ids.
    Returns:
        [B, L, H * dv] in the stat dtype. Query t of row b sees keys 0 .. fills[b] + t; no logit
        scale, fp32 (stat dtype) softmax. Syncs once with the host to size the key range.
    """
    B, L, H, _ = q.shape
    write_pos = fills[:, None] + torch.arange(L, device=q.device)  # [B, L]
    rows = slot_ids[:, None].expand(B, L)
    keys[rows, write_pos] = k
    values[rows, write_pos] = v
    num_keys = int(fills.max()) + L
    k_all = keys[slot_ids, :num_keys].to(q.dtype)  # [B, K, H, dz]
    v_all = values[slot_ids, :num_keys].to(q.dtype)  # [B, K, H, dv]
    scores = torch.einsum("blhd,bkhd->bhlk", q, k_all)
    key_idx = torch.arange(num_keys, device=q.device)
    visible = key_idx[None, None, :] <= write_pos[:, :, None]  # [B, L, K]
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhlk,bkhd->blhd", probs, v_all)
    return out.reshape(B, L, -1)


def attention_decode_ref(q: Tensor, k_new: Tensor, v_new: Tensor, keys: Tensor, values: Tensor, slot_ids: Tensor,
                         position: Tensor, num_splits: int = 0) -> Tensor:
    """Append one key/value per row at its slot's fill (position mod C) and attend over that chunk.

    Args:
        q: [B, H, dz] stat dtype; k_new: [B, H, dz] and v_new: [B, H, dv] in the KV dtype.
        keys: [S, C, H, dz], values: [S, C, H, dv] the layer's pool, written at [slot, fill].
        position: [S] int64 tokens processed before this one; fill 0 starts a fresh chunk.
        num_splits: a launch parameter of the CUDA kernel (ignored here).
    Returns:
        [B, H * dv] in the stat dtype.
    """
    fills = position[slot_ids] % keys.shape[1]
    return chunk_attention(q[:, None], k_new[:, None], v_new[:, None], fills, keys, values, slot_ids)[:, 0]


def attention_decode(q: Tensor, k_new: Tensor, v_new: Tensor, keys: Tensor, values: Tensor, slot_ids: Tensor,
                     position: Tensor, num_splits: int = 0) -> Tensor:
    """Fused `attention_decode_ref` (fp32 q; fp32 or bf16 K/V). num_splits: CUDA key splits, 0 = plan from C."""
    return torch.ops.megalodon.attention_decode(q, k_new, v_new, keys, values, slot_ids, position, num_splits)
