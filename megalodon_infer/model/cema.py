"""Complex exponential moving average (CEMA): coefficients, FFT parallel form, one-step recurrence.

    h_t = p * x_t + q * h_{t-1}          (complex state, D x N per request)
    y_t = Re(sum_k eta_k h_{t,k}) + omega * x_t

p is real, q = |q| e^{i phi} with |q| = 1 - sigmoid(alpha) sigmoid(delta) < 1, phi_k = k sigmoid(theta)
2 pi / N. All coefficient math is fp32/complex64 (fp64/complex128 for a float64 model), computed
from the stored parameters whatever their dtype, as the official `_calc_coeffs` does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megalodon_infer.kernels.reference import CemaCoeffs


class CEMA(nn.Module):
    """Parameters of the complex EMA with the official key names and shapes."""

    def __init__(self, dim: int, ndim: int) -> None:
        super().__init__()
        self.dim = dim
        self.ndim = ndim
        self.alpha = nn.Parameter(torch.zeros(dim, ndim, 1))
        self.delta = nn.Parameter(torch.zeros(dim, ndim, 1))
        self.theta = nn.Parameter(torch.zeros(dim, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(dim, ndim, 2))
        self.omega = nn.Parameter(torch.zeros(dim, 1))

    def compute_coeffs(self, real_dtype: torch.dtype) -> CemaCoeffs:
        """Coefficients in `real_dtype` (fp32 or fp64), differentiable. Nothing is cached here: a
        caller that needs them every step (the decode ops) computes them once and keeps them."""
        alpha = torch.sigmoid(self.alpha.to(real_dtype)).squeeze(-1)  # [D, N]
        delta = torch.sigmoid(self.delta.to(real_dtype)).squeeze(-1)
        theta = torch.sigmoid(self.theta.to(real_dtype)).view(self.dim, 1)  # [D, 1]
        harmonics = torch.arange(1, self.ndim + 1, dtype=real_dtype, device=alpha.device)
        phase = harmonics * theta * (2.0 * math.pi / self.ndim)  # [D, N]
        magnitude = 1.0 - alpha * delta
        # log q written out (not q.log()): same powers, no branch cut when phase > pi.
        log_q = torch.complex(magnitude.log(), phase)
        gamma = self.gamma.to(real_dtype)
        eta = torch.complex(gamma[..., 0], gamma[..., 1]) * math.sqrt(1.0 / self.ndim)
        return CemaCoeffs(p=alpha, log_q=log_q, q=torch.polar(magnitude, phase), eta=eta,
                          omega=self.omega.to(real_dtype).view(self.dim))
