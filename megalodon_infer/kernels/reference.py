"""The pure-torch math the decode ops and the model's modules share: the specification.

TimestepNorm over a segment from running statistics, and the complex EMA in its one-step and FFT
parallel forms. The model's modules (`model.norms.TimestepNorm`, `model.cema.CEMA`) hold the
parameters and call these; the fused decode ops in `decode` are tested against them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def stat_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The dtype of norm statistics and CEMA math for a given compute dtype (fp32 unless fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def complex_dtype_for(stat_dtype: torch.dtype) -> torch.dtype:
    """The CEMA state dtype for a statistics dtype: complex64, or complex128 for fp64."""
    return torch.complex128 if stat_dtype == torch.float64 else torch.complex64


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


@dataclass(frozen=True)
class CemaCoeffs:
    """p: [D, N] real; log_q: [D, N] complex; q: [D, N] complex; eta: [D, N] complex; omega: [D] real."""

    p: Tensor
    log_q: Tensor
    q: Tensor
    eta: Tensor
    omega: Tensor


def cema_step(x: Tensor, h: Tensor, c: CemaCoeffs) -> tuple[Tensor, Tensor]:
    """One recurrence step. x: [B, D] real (stat dtype); h: [B, D, N] complex. Returns (y [B, D], h')."""
    h = c.p * x[..., None] + c.q * h
    y = torch.einsum("dn,bdn->bd", c.eta, h).real + c.omega * x
    return y, h


# Inductor has no complex codegen and, on torch 2.13, turns this function's training loss into NaN
# from the first step; under torch.compile it runs eager (a graph break) and the rest compiles.
@torch.compiler.disable
def cema_parallel(x: Tensor, h0: Tensor, c: CemaCoeffs) -> tuple[Tensor, Tensor]:
    """CEMA over a segment from an incoming state, in the official parallel form.

    y = causal_conv(x, K) + bias(h0) + omega * x, with kernel K_d[j] = Re sum_k eta p q^j (FFT
    convolution), bias_d[t] = Re sum_k eta q^{t+1} h0, and final state
    h_L = q^L h0 + p sum_j q^{L-1-j} x_j.

    Args:
        x: [B, L, D] real (stat dtype).
        h0: [B, D, N] complex incoming state.
    Returns:
        y: [B, L, D]; h_L: [B, D, N].
    """
    B, L, D = x.shape
    if L == 1:
        y, h = cema_step(x[:, 0], h0, c)
        return y[:, None], h
    steps = torch.arange(L + 1, dtype=x.dtype, device=x.device)
    # q^t = |q|^t e^{i t phi}, in polar form: real exp, cos and sin vectorize, a complex exp does not
    # (5x faster on the CPU; the same values to rounding).
    powers = torch.polar(torch.exp(c.log_q.real[..., None] * steps), c.log_q.imag[..., None] * steps)  # [D, N, L+1]
    kernel = torch.einsum("dn,dnl->dl", c.eta * c.p, powers[..., :L]).real  # [D, L]
    xt = x.transpose(1, 2)  # [B, D, L]
    n_fft = 1 << (2 * L - 1).bit_length()
    y = torch.fft.irfft(torch.fft.rfft(xt, n=n_fft) * torch.fft.rfft(kernel, n=n_fft), n=n_fft)[..., :L]
    y = y + torch.einsum("dn,bdn,dnl->bdl", c.eta, h0, powers[..., 1:]).real
    y = y + c.omega[:, None] * xt
    weighted = torch.einsum("bdl,dnl->bdn", xt.to(powers.dtype), powers[..., :L].flip(-1))
    h = powers[..., L] * h0 + c.p * weighted
    return y.transpose(1, 2), h
