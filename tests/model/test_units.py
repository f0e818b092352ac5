"""Float64 unit checks of the two recurrences against their definitions."""

from __future__ import annotations

import torch

from megalodon_infer.kernels.reference import cema_parallel, cema_step, timestep_norm
from megalodon_infer.model.cema import CEMA


def test_timestep_norm_statistics_are_exact_prefix_moments():
    g = torch.Generator().manual_seed(0)
    B, L, D, G = 3, 40, 24, 4
    # a large common offset is where a naive E[x^2] - mean^2 would lose digits
    x = torch.randn(B, L, D, generator=g, dtype=torch.float64) * 3 + 50
    weight = torch.randn(D, generator=g, dtype=torch.float64) * 0.1
    bias = torch.randn(D, generator=g, dtype=torch.float64) * 0.1
    mean0 = torch.zeros(B, G, dtype=torch.float64)
    var0 = torch.ones(B, G, dtype=torch.float64)
    count0 = torch.zeros(B, dtype=torch.int64)
    y, mean, var = timestep_norm(x, count0, mean0, var0, weight, bias, G, eps=1e-5)
    grouped = x.view(B, L, G, D // G)
    for t in range(L):
        seen = grouped[:, : t + 1].permute(0, 2, 1, 3).reshape(B, G, -1)
        m, v = seen.mean(-1), seen.var(-1, unbiased=False)
        expected = (grouped[:, t] - m[..., None]) / torch.sqrt(v[..., None] + 1e-5)
        expected = expected.reshape(B, D) * (1 + weight) + bias
        torch.testing.assert_close(y[:, t], expected, atol=1e-9, rtol=0)
    torch.testing.assert_close(mean, grouped.permute(0, 2, 1, 3).reshape(B, G, -1).mean(-1), atol=1e-9, rtol=0)
    torch.testing.assert_close(var, grouped.permute(0, 2, 1, 3).reshape(B, G, -1).var(-1, unbiased=False),
                               atol=1e-9, rtol=0)


def test_timestep_norm_continues_exactly_from_running_stats():
    g = torch.Generator().manual_seed(1)
    B, L, D, G = 2, 30, 16, 2
    x = torch.randn(B, L, D, generator=g, dtype=torch.float64)
    w, b = torch.zeros(D, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
    m0, v0 = torch.zeros(B, G, dtype=torch.float64), torch.ones(B, G, dtype=torch.float64)
    y_full, m_full, v_full = timestep_norm(x, torch.zeros(B, dtype=torch.long), m0, v0, w, b, G, 1e-5)
    # the same tokens one at a time (the Welford merge of the official kernel), then in two pieces
    m, v, ys = m0, v0, []
    for t in range(L):
        y, m, v = timestep_norm(x[:, t:t + 1], torch.full((B,), t), m, v, w, b, G, 1e-5)
        ys.append(y)
    torch.testing.assert_close(torch.cat(ys, 1), y_full, atol=1e-10, rtol=0)
    torch.testing.assert_close((m, v), (m_full, v_full), atol=1e-12, rtol=0)
    y1, m1, v1 = timestep_norm(x[:, :11], torch.zeros(B, dtype=torch.long), m0, v0, w, b, G, 1e-5)
    y2, m2, v2 = timestep_norm(x[:, 11:], torch.full((B,), 11), m1, v1, w, b, G, 1e-5)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, atol=1e-10, rtol=0)


def _random_cema(D: int, N: int, seed: int) -> CEMA:
    g = torch.Generator().manual_seed(seed)
    cema = CEMA(D, N).double()
    with torch.no_grad():
        for p in cema.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return cema


def test_cema_fft_form_equals_step_recurrence_with_state():
    B, L, D, N = 2, 37, 8, 6
    with torch.no_grad():
        c = _random_cema(D, N, seed=3).compute_coeffs(torch.float64)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, L, D, generator=g, dtype=torch.float64)
    h0 = torch.complex(torch.randn(B, D, N, generator=g, dtype=torch.float64),
                       torch.randn(B, D, N, generator=g, dtype=torch.float64))
    y_par, h_par = cema_parallel(x, h0, c)
    h, ys = h0, []
    for t in range(L):
        y, h = cema_step(x[:, t], h, c)
        ys.append(y)
    torch.testing.assert_close(y_par, torch.stack(ys, 1), atol=1e-9, rtol=0)
    torch.testing.assert_close(h_par, h, atol=1e-9, rtol=0)


def test_cema_coefficients_follow_the_official_definition():
    D, N = 5, 4
    cema = _random_cema(D, N, seed=5)
    with torch.no_grad():
        c = cema.compute_coeffs(torch.float64)
    p = torch.sigmoid(cema.alpha).squeeze(-1)
    mag = 1 - p * torch.sigmoid(cema.delta).squeeze(-1)
    phase = torch.arange(1, N + 1, dtype=torch.float64) * torch.sigmoid(cema.theta).view(D, 1) * 2 * torch.pi / N
    torch.testing.assert_close(c.p, p.detach())
    torch.testing.assert_close(c.q, (mag * torch.exp(1j * phase)).detach())
    torch.testing.assert_close(c.eta, (torch.complex(cema.gamma[..., 0], cema.gamma[..., 1]) / N**0.5).detach())
    assert bool((c.q.abs() < 1).all())
