"""Megalodon's normalisations: grouped TimestepNorm (stateful), RMSNorm and LayerNorm ("+1" weights).

Every scale is stored as an offset from 1 (zero-initialised), as in the official `layer_norm.py` and
`timestep_norm.py`, so a checkpoint's `weight` means `1 + weight` here too. The math runs in the
statistics dtype (fp32, or fp64 for a float64 model) and the result is cast back to the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def stat_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The dtype of norm statistics and CEMA math for a given compute dtype (fp32 unless fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def timestep_norm(
    x: Tensor,
    count0: Tensor,
    mean0: Tensor,
    var0: Tensor,
    weight: Tensor,
    bias: Tensor,
    num_groups: int,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Grouped TimestepNorm over a segment, continuing from running statistics.

    The statistics after token t are the exact mean and population variance of every scalar of the
    group seen so far (prefix included), so y_t is GroupNorm over the whole causal prefix.

    Args:
        x: [B, L, D] input.
        count0: [B] int64, timesteps already folded into (mean0, var0).
        mean0, var0: [B, G] running group mean and population variance (stat dtype).
        weight, bias: [D] affine, applied as (1 + weight) and bias.
    Returns:
        y: [B, L, D] in x's dtype; mean, var: [B, G] statistics after the last token.
    """
    B, L, D = x.shape
    G = num_groups
    sd = mean0.dtype
    xs = x.to(sd).view(B, L, G, D // G)
    tok_mean = xs.mean(dim=-1)  # [B, L, G]
    tok_var = xs.var(dim=-1, unbiased=False)
    n0 = count0.to(sd)[:, None, None]  # [B, 1, 1]
    # NOTE: shifted-data accumulation. Sums are taken relative to a shift close to the running mean
    # (the previous mean, or the first token's mean on a fresh state), so E[x^2] - mean^2 does not
    # cancel catastrophically. For L == 1 this is algebraically the Welford merge of the official
    # kernel: mean += (m - mean) / n; var = (1-c) var + c v + c (1-c) (m - mean)^2 with c = 1/n.
    shift = torch.where(n0 > 0, mean0[:, None, :], tok_mean[:, :1, :])  # [B, 1, G]
    prior_dev = mean0[:, None, :] - shift
    dev = tok_mean - shift
    total = n0 + torch.arange(1, L + 1, dtype=sd, device=x.device)[None, :, None]  # [B, L, 1]
    sum_dev = n0 * prior_dev + torch.cumsum(dev, dim=1)
    sum_sq = n0 * (var0[:, None, :] + prior_dev * prior_dev) + torch.cumsum(tok_var + dev * dev, dim=1)
    mean_dev = sum_dev / total
    mean = shift + mean_dev  # [B, L, G]
    var = (sum_sq / total - mean_dev * mean_dev).clamp_min(0.0)
    y = (xs - mean[..., None]) * torch.rsqrt(var[..., None] + eps)
    y = y.reshape(B, L, D) * (1.0 + weight.to(sd)) + bias.to(sd)
    return y.to(x.dtype), mean[:, -1], var[:, -1]


class TimestepNorm(nn.Module):
    """Parameters and prior buffers of one grouped TimestepNorm (official key names)."""

    def __init__(self, dim: int, num_groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_groups = num_groups
        self.eps = eps
        self.register_buffer("prior_count", torch.zeros((), dtype=torch.int64))
        self.register_buffer("prior_mean", torch.zeros(num_groups))
        self.register_buffer("prior_logv", torch.zeros(num_groups))
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, count0: Tensor, mean0: Tensor, var0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: [B, L, D]; count0: [B] tokens seen (priors excluded); mean0, var0: [B, G]."""
        count = count0 + self.prior_count
        return timestep_norm(x, count, mean0, var0, self.weight, self.bias, self.num_groups, self.eps)

    def initial_stats(self, batch_size: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The prior (mean, var) a fresh request starts from: [B, G] each."""
        mean = self.prior_mean.to(dtype).expand(batch_size, -1).clone()
        var = self.prior_logv.to(dtype).exp().expand(batch_size, -1).clone()
        return mean, var


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * (1 + weight); no weight when not affine."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        sd = stat_dtype_for(x.dtype)
        xf = x.to(sd)
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * (1.0 + self.weight.to(sd))
        return y.to(x.dtype)


class LayerNorm(nn.Module):
    """Standard LayerNorm with the "+1" weight convention; no affine when not affine."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        sd = stat_dtype_for(x.dtype)
        xf = x.to(sd)
        mean = xf.mean(dim=-1, keepdim=True)
        var = xf.var(dim=-1, unbiased=False, keepdim=True)
        y = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * (1.0 + self.weight.to(sd)) + self.bias.to(sd)
        return y.to(x.dtype)


def head_rms_norm(z: Tensor, eps: float) -> Tensor:
    """Per-head RMS normalisation without affine (the official `znorm`). z: [..., dz]."""
    sd = stat_dtype_for(z.dtype)
    zf = z.to(sd)
    return zf * torch.rsqrt(zf.pow(2).mean(dim=-1, keepdim=True) + eps)
