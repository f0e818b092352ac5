"""One Megalodon block: X_next = X + FFN(LN(X + Attn(TSN(X)))), the two-hop residual."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megalodon_infer.config import ModelConfig
from megalodon_infer.model.attention import MovingAverageGatedAttention, RotaryEmbedding, StepOps
from megalodon_infer.model.norms import LayerNorm
from megalodon_infer.model.state import StepView


class NormalizedFeedForwardNetwork(nn.Module):
    """The official `nffn`: LayerNorm, SiLU or SwiGLU MLP (no biases), optional output scale alpha."""

    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        D, Fh = cfg.model_dim, cfg.ffn_hidden_dim
        self.norm = LayerNorm(D, cfg.norm_eps, affine=cfg.norm_affine)
        self.fc1 = nn.Linear(D, Fh, bias=False)
        self.fc2 = nn.Linear(Fh, D, bias=False)
        self.fc3 = nn.Linear(D, Fh, bias=False) if cfg.swiglu else None
        if cfg.rescale_nffn:
            self.alpha = nn.Parameter(torch.full((D,), 0.1 * 0.5**layer_id))
        else:
            self.register_parameter("alpha", None)

    def forward(self, y: Tensor, residual: Tensor) -> Tensor:
        """y: [B, L, D] attention output; residual: [B, L, D] the block input X."""
        u = self.norm(y)
        hidden = F.silu(self.fc1(u))
        if self.fc3 is not None:
            hidden = hidden * self.fc3(u)
        out = self.fc2(hidden)
        if self.alpha is not None:
            out = self.alpha * out
        return residual + out


class MegaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.mega = MovingAverageGatedAttention(cfg)
        self.nffn = NormalizedFeedForwardNetwork(cfg, layer_id)

    def forward(self, x: Tensor, step: StepView, layer: int, ops: StepOps, rope: RotaryEmbedding) -> Tensor:
        """x: [B, L, D] -> [B, L, D]; `ops` updates this layer's state for the step's rows."""
        y = self.mega(x, step, layer, ops, rope)
        return self.nffn(y, residual=x)
