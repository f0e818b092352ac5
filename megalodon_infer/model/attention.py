"""The MEGA sub-layer: TimestepNorm -> CEMA -> RMSNorm -> normalised chunked attention -> gated output.

Attention is block-diagonal over chunks of C tokens counted from the start of the request: a token
attends causally to the keys of its own chunk only, so the per-request KV is at most one chunk.
RoPE positions restart every chunk. Q/K are RMS-normalised per head, scaled by (1 + gamma)/sqrt(dz),
shifted by beta, and the logits have no 1/sqrt(d) scale (the official kernel is called with 1.0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig
from ..kernels.decode import CemaWeights, TsnWeights, chunk_attention
from ..kernels.dispatch import DecodeKernels
from ..kernels.reference import cema_parallel, stat_dtype_for
from .cema import CEMA
from .norms import RMSNorm, TimestepNorm, head_rms_norm
from .state import MegalodonState


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


class LayerState:
    """Views of one layer's slice of the request state, for the rows being computed.

    mean, var: [B, G]; cema_h: [B, D, N] complex; keys: [S, C, H, dz] and values: [S, C, H, dv] are
    the whole pool's KV for this layer, addressed by `slot_ids` [B].
    """

    __slots__ = ("mean", "var", "cema_h", "keys", "values", "slot_ids")

    def __init__(self, mean: Tensor, var: Tensor, cema_h: Tensor, keys: Tensor, values: Tensor,
                 slot_ids: Tensor) -> None:
        self.mean, self.var, self.cema_h = mean, var, cema_h
        self.keys, self.values, self.slot_ids = keys, values, slot_ids


class MovingAverageGatedAttention(nn.Module):
    """The official `mega` sub-module (same parameter names)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        D, Z, E = cfg.model_dim, cfg.z_dim, cfg.value_dim
        self.num_heads = cfg.num_heads
        self.head_z_dim = cfg.head_z_dim
        self.head_value_dim = cfg.head_value_dim
        self.chunk_size = cfg.chunk_size
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

    def forward(self, x: Tensor, count0: Tensor, fills: Tensor, st: LayerState, rope: RotaryEmbedding) -> Tensor:
        """One segment of L tokens per row; each row's segment stays inside its current chunk.

        Args:
            x: [B, L, D] block input.
            count0: [B] int64 tokens each row has processed before this segment.
            fills: [B] int64 keys already in each row's current chunk (count0 mod C); fills + L <= C.
            st: this layer's state for the B rows; updated in place (stats, CEMA state, KV).
        Returns:
            Y = X + Hout: [B, L, D].
        """
        L = x.shape[1]
        x_hat, st.mean, st.var = self.timenorm(x, count0, st.mean, st.var)
        sd = st.mean.dtype
        cema_out, st.cema_h = cema_parallel(x_hat.to(sd), st.cema_h, self.cema.coeffs(sd))
        mx = self.rmsnorm(cema_out.to(x.dtype))  # [B, L, D]

        positions = fills[:, None] + torch.arange(L, device=x.device)  # [B, L]
        q, k, v, r = self._project(x_hat, mx, positions, rope)
        out = self._chunk_attention(q, k.to(st.keys.dtype), v.to(st.values.dtype), fills, st)
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

    def forward_train(self, x: Tensor, rope: RotaryEmbedding) -> Tensor:
        """Differentiable forward of a whole sequence from a fresh state (the official uncached path).

        x: [B, T, D] with T <= C or T a multiple of C. Returns Y = X + Hout [B, T, D].
        """
        B, T, D = x.shape
        C = min(self.chunk_size, T)
        if T % C:
            raise ValueError(f"training sequences must be shorter than or a multiple of chunk_size, got {T}")
        sd = stat_dtype_for(x.dtype)
        fresh = torch.zeros(B, dtype=torch.int64, device=x.device)
        mean0, var0 = self.timenorm.initial_stats(B, sd)
        x_hat, _, _ = self.timenorm(x, fresh, mean0, var0)
        h0 = torch.zeros(B, D, self.cema.ndim, dtype=torch.complex128 if sd == torch.float64 else torch.complex64,
                         device=x.device)
        cema_out, _ = cema_parallel(x_hat.to(sd), h0, self.cema.compute_coeffs(sd))
        mx = self.rmsnorm(cema_out.to(x.dtype))
        positions = (torch.arange(T, device=x.device) % C).expand(B, T)
        q, k, v, r = self._project(x_hat, mx, positions, rope)
        H, n = self.num_heads, T // C

        def chunked(t: Tensor) -> Tensor:  # [B, T, H, d] -> [B * n, H, C, d]
            return t.reshape(B * n, C, H, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(chunked(q), chunked(k), chunked(v.to(q.dtype)), is_causal=True,
                                             scale=1.0)
        out = out.transpose(1, 2).reshape(B, T, -1)
        return x + self.wh1(mx) + self.wh2(out.to(x.dtype) * r)

    def _chunk_attention(self, q: Tensor, k: Tensor, v: Tensor, fills: Tensor, st: LayerState) -> Tensor:
        """Prefill attention: q [B, L, H, dz], k/v in the KV dtype; see `kernels.decode.chunk_attention`."""
        return chunk_attention(q, k, v, fills, st.keys, st.values, st.slot_ids)

    def decode_step(self, x: Tensor, state: MegalodonState, layer: int, slot_ids: Tensor, rope: RotaryEmbedding,
                    kernels: DecodeKernels, tsn: TsnWeights, cema: CemaWeights) -> Tensor:
        """One token per row, reading and writing layer `layer` of the state pool by slot.

        The same math as `forward` at L == 1, with TimestepNorm + CEMA and the attention (KV append
        included) done by `kernels` (fused, or their reference twins). No host sync on the fused path.

        Args:
            x: [B, D] block input; slot_ids: [B] int64 distinct pool rows.
            tsn, cema: this layer's precomputed decode weights.
        Returns:
            Y = X + Hout: [B, D].
        """
        x_hat, cema_out = kernels.tsn_cema_step(x, slot_ids, state.position, state.norm_mean[layer],
                                                state.norm_var[layer], state.cema_h[layer], tsn, cema)
        mx = self.rmsnorm(cema_out)
        fills = state.position[slot_ids] % self.chunk_size  # [B]
        q, k, v, r = self._project(x_hat[:, None], mx[:, None], fills[:, None], rope)
        keys, values = state.keys[layer], state.values[layer]
        out = kernels.attention_decode(q[:, 0], k[:, 0].to(keys.dtype), v[:, 0].to(values.dtype), keys, values,
                                       slot_ids, state.position)
        hout = self.wh1(mx) + self.wh2(out.to(x.dtype) * r[:, 0])
        return x + hout
