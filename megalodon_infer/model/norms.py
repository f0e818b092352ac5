"""Megalodon's normalisations: grouped TimestepNorm (stateful), RMSNorm and LayerNorm ("+1" weights).

Every scale is stored as an offset from 1 (zero-initialised), as in the official `layer_norm.py` and
`timestep_norm.py`, so a checkpoint's `weight` means `1 + weight` here too. The math runs in the
statistics dtype (fp32, or fp64 for a float64 model) and the result is cast back to the input dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from megalodon_infer.kernels.reference import stat_dtype_for, timestep_norm


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
