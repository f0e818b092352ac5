"""The MEGA sub-layer: TimestepNorm -> CEMA -> RMSNorm -> normalised chunked attention -> gated output.

Attention is block-diagonal over chunks of C tokens counted from the start of the request: a token
attends causally to the keys of its own chunk only, so the per-request KV is at most one chunk.
RoPE positions restart every chunk. Q/K are RMS-normalised per head, scaled by (1 + gamma)/sqrt(dz),
shifted by beta, and the logits have no 1/sqrt(d) scale (the official kernel is called with 1.0).

NOTE: the sub-layer's math is written once (`MovingAverageGatedAttention.forward`). Prefill, training
and decode differ only in how the stateful parts are computed -- TimestepNorm + CEMA, the chunk
attention with its KV append, and the final TimestepNorm -- which a `StepOps` supplies:
`SegmentOps` (a segment from a state, the torch reference), `TrainOps` (whole sequences from a fresh
state, differentiable, SDPA) and the worker's decode ops (one token per row, fused kernels or their
reference twins, tested against `SegmentOps`).
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megalodon_infer.config import ModelConfig
from megalodon_infer.kernels.decode import chunk_attention
from megalodon_infer.kernels.reference import cema_parallel, complex_dtype_for, stat_dtype_for
from megalodon_infer.model.cema import CEMA
from megalodon_infer.model.norms import RMSNorm, TimestepNorm, head_rms_norm
from megalodon_infer.model.state import StepView


class RotaryEmbedding(nn.Module):
    """Interleaved-pair RoPE over the whole head (features 2i, 2i+1 form one complex number).

    `freqs` [dz/2] is the official persistent buffer; it stays fp32 whatever the model dtype, and is
    rounded to bf16 first only when `round_to_bf16` is set (what the official bf16 reload does).
    """

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("freqs", inv.float())
        self.round_to_bf16 = False

    def rotate(self, x: Tensor, positions: Tensor) -> Tensor:
        """x: [B, L, H, dz]; positions: [B, L] within-chunk positions. Returns x rotated, stat dtype."""
        sd = stat_dtype_for(x.dtype)
        freqs = self.freqs.float()
        if self.round_to_bf16:
            freqs = freqs.bfloat16().float()
        angles = positions.to(sd)[..., None] * freqs.to(sd)  # [B, L, dz/2]
        cos, sin = torch.cos(angles)[:, :, None], torch.sin(angles)[:, :, None]  # [B, L, 1, dz/2]
        xf = x.to(sd)
        even, odd = xf[..., 0::2], xf[..., 1::2]
        return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)


class StepOps(Protocol):
    """How a step computes the stateful parts of the model. Rows are addressed as `step.slot_ids` in
    `step.layer(layer)` (the pool); x, q, k, v are [B, L, ...] with L = step.length."""

    def tsn_cema(self, x: Tensor, step: StepView, layer: int, norm: TimestepNorm, cema: CEMA
                 ) -> tuple[Tensor, Tensor]:
        """x: [B, L, D] block input -> (x_hat, CEMA output), [B, L, D] each in x's dtype; advances the
        layer's norm statistics and CEMA state."""
        ...

    def attention(self, q: Tensor, k: Tensor, v: Tensor, step: StepView, layer: int) -> Tensor:
        """q, k: [B, L, H, dz] stat dtype (after RoPE); v: [B, L, H, dv]. Appends k/v to each row's chunk
        and attends causally within it. Returns [B, L, H * dv]."""
        ...

    def final_norm(self, x: Tensor, step: StepView, norm: TimestepNorm) -> Tensor:
        """x: [B, L, D] -> [B, L, D]; advances the final norm's statistics."""
        ...


def tsn_cema_from(x: Tensor, count: Tensor, mean: Tensor, var: Tensor, h: Tensor, norm: TimestepNorm, cema: CEMA
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """TimestepNorm then CEMA over a segment from the given state (the reference math).

    x: [B, L, D]; count: [B] tokens seen; mean, var: [B, G]; h: [B, D, N] complex.
    Returns x_hat, y ([B, L, D], x's dtype) and the new mean, var, h.
    """
    x_hat, mean, var = norm(x, count, mean, var)
    sd = mean.dtype
    y, h = cema_parallel(x_hat.to(sd), h, cema.compute_coeffs(sd))
    return x_hat, y.to(x.dtype), mean, var, h


class SegmentOps:
    """A segment of L tokens per row from its slot's state, in torch (the reference; any L)."""

    def tsn_cema(self, x: Tensor, step: StepView, layer: int, norm: TimestepNorm, cema: CEMA
                 ) -> tuple[Tensor, Tensor]:
        pool, ids = step.layer(layer), step.slot_ids
        x_hat, y, mean, var, h = tsn_cema_from(x, step.positions, pool.mean[ids], pool.var[ids], pool.cema_h[ids],
                                               norm, cema)
        pool.mean[ids], pool.var[ids], pool.cema_h[ids] = mean, var, h
        return x_hat, y

    def attention(self, q: Tensor, k: Tensor, v: Tensor, step: StepView, layer: int) -> Tensor:
        pool = step.layer(layer)
        return chunk_attention(q, k.to(pool.keys.dtype), v.to(pool.values.dtype), step.fills, pool.keys,
                               pool.values, step.slot_ids)

    def final_norm(self, x: Tensor, step: StepView, norm: TimestepNorm) -> Tensor:
        (pool_mean, pool_var), ids = step.final_norm_stats(), step.slot_ids
        y, mean, var = norm(x, step.positions, pool_mean[ids], pool_var[ids])
        pool_mean[ids], pool_var[ids] = mean, var
        return y


class TrainOps:
    """Whole sequences from a fresh state, differentiable; nothing is stored. The sequence length T is
    <= C or a multiple of C; attention runs per chunk through SDPA."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size

    def tsn_cema(self, x: Tensor, step: StepView, layer: int, norm: TimestepNorm, cema: CEMA
                 ) -> tuple[Tensor, Tensor]:
        B, _, D = x.shape
        mean0, var0 = norm.initial_stats(B, stat_dtype_for(x.dtype))
        h0 = torch.zeros(B, D, cema.ndim, dtype=complex_dtype_for(mean0.dtype), device=x.device)
        x_hat, y, *_ = tsn_cema_from(x, step.positions, mean0, var0, h0, norm, cema)
        return x_hat, y

    def attention(self, q: Tensor, k: Tensor, v: Tensor, step: StepView, layer: int) -> Tensor:
        B, T, H, _ = q.shape
        C = min(self.chunk_size, T)

        def chunked(t: Tensor) -> Tensor:  # [B, T, H, d] -> [B * T/C, H, C, d]
            return t.reshape(B * (T // C), C, H, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(chunked(q), chunked(k), chunked(v.to(q.dtype)), is_causal=True,
                                             scale=1.0)
        return out.transpose(1, 2).reshape(B, T, -1)

    def final_norm(self, x: Tensor, step: StepView, norm: TimestepNorm) -> Tensor:
        mean0, var0 = norm.initial_stats(x.shape[0], stat_dtype_for(x.dtype))
        y, _, _ = norm(x, step.positions, mean0, var0)
        return y


class MovingAverageGatedAttention(nn.Module):
    """The official `mega` sub-module (same parameter names)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, Z, E = cfg.model_dim, cfg.z_dim, cfg.value_dim
        self.num_heads = cfg.num_heads
        self.head_z_dim = cfg.head_z_dim
        self.head_value_dim = cfg.head_value_dim
        self.eps = cfg.norm_eps
        self.timenorm = TimestepNorm(D, cfg.norm_num_groups, cfg.norm_eps)
        self.cema = CEMA(D, cfg.cema_ndim)
        self.rmsnorm = RMSNorm(D, cfg.norm_eps, affine=cfg.norm_affine)
        self.wz = nn.Linear(D, Z)
        self.wv = nn.Linear(D, E)
        self.wr = nn.Linear(D, E)
        self.wh1 = nn.Linear(D, D)
        self.wh2 = nn.Linear(E, D, bias=False)
        self.gamma = nn.Parameter(torch.zeros(2, Z))
        self.beta = nn.Parameter(torch.zeros(2, Z))

    def forward(self, x: Tensor, step: StepView, layer: int, ops: StepOps, rope: RotaryEmbedding) -> Tensor:
        """The sub-layer for one step of every row (spec 2.1-2.5).

        Args:
            x: [B, L, D] block input.
            step: the rows, their positions and the pool; `layer` is this layer's index in it.
            ops: how TimestepNorm + CEMA and the chunk attention are computed (and state updated).
        Returns:
            Y = X + Hout: [B, L, D].
        """
        x_hat, cema_out = ops.tsn_cema(x, step, layer, self.timenorm, self.cema)
        mx = self.rmsnorm(cema_out)  # [B, L, D], feeds z, r and wh1
        q, k, v, r = self._project(x_hat, mx, step.rope_positions, rope)
        out = ops.attention(q, k, v, step, layer)  # [B, L, E]
        hout = self.wh1(mx) + self.wh2(out.to(x.dtype) * r)
        return x + hout

    def _project(self, x_hat: Tensor, mx: Tensor, positions: Tensor, rope: RotaryEmbedding
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Q, K (normalised, affine, RoPE at `positions` [B, L]; stat dtype) [B, L, H, dz], V [B, L, H, dv]
        (from the TimestepNorm output, not CEMA) and the gate R [B, L, E]."""
        B, L, _ = x_hat.shape
        H, dz, dv = self.num_heads, self.head_z_dim, self.head_value_dim
        z = head_rms_norm(self.wz(mx).view(B, L, H, dz), self.eps)  # stat dtype
        sd = z.dtype
        gamma = (1.0 + self.gamma.to(sd)).view(2, H, dz) / math.sqrt(dz)
        beta = self.beta.to(sd).view(2, H, dz)
        q = rope.rotate(z * gamma[0] + beta[0], positions)
        k = rope.rotate(z * gamma[1] + beta[1], positions)
        v = F.silu(self.wv(x_hat)).view(B, L, H, dv)
        r = F.silu(self.wr(mx))
        return q, k, v, r
